"""Steps that the container tests share: asking the broker and systemd, reading what is served."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from broker import names
from harness import nspawn
from harness.procs import HarnessError, wait_for

# An MD's certificate comes due this long after it is written: time enough to uninstall or
# remove the package, and then mod_md renews on its own, with no reload the test could cause.
RENEW_IN = 45.0
VETO = "preventing renewal to proceed"
HOOK_FAILED = "failed with exit code"     # AH10109: "MDMessageCmd ... failed with exit code 255."


def busctl_json(c: nspawn.Container, *args: str, user: str | None = None) -> object:
    r = c.run(["busctl", "--json=short", *args], user=user)
    return json.loads(r.stdout)["data"]


def prop(c: nspawn.Container, name: str) -> object:
    return busctl_json(c, "get-property", names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE, name)


def unit_prop(c: nspawn.Container, unit: str, name: str) -> str:
    return c.run(["systemctl", "show", "--value", "-p", name, unit]).stdout.strip()


def is_active(c: nspawn.Container, unit: str) -> str:
    return c.run(["systemctl", "is-active", unit], check=False).stdout.strip()


def served_sha256(c: nspawn.Container, server_name: str | None = None) -> str:
    """SHA-256 of the certificate served on the container's 127.0.0.1:443 (with SNI if given)."""
    script = ("import ssl, socket, sys\n"
              "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
              "ctx.check_hostname = False\n"
              "ctx.verify_mode = ssl.CERT_NONE\n"
              "with socket.create_connection(('127.0.0.1', 443), timeout=5) as s:\n"
              "    with ctx.wrap_socket(s, server_hostname=sys.argv[1] or None) as t:\n"
              "        print(ssl.DER_cert_to_PEM_cert(t.getpeercert(binary_form=True)))\n")
    pem = c.run(["/usr/bin/python3", "-c", script, server_name or ""]).stdout
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.fingerprint(hashes.SHA256()).hex()


def count_in(c: nspawn.Container, path: str, needle: str) -> int:
    try:
        return c.path(path).read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


def journal(c: nspawn.Container, unit: str) -> str:
    return c.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit]).stdout


APACHE_ERROR_LOG = "/var/log/apache2/error.log"
RESUMED = "AH00489"     # "... configured -- resuming normal operations": a generation is up


def reload_apache(c: nspawn.Container) -> None:
    """Reload Apache and wait until it has re-read its configuration.

    `systemctl reload` returns once apachectl has sent SIGUSR1; Apache's parent re-reads the
    configuration after that. A file changed before it has done so (a broken one, say) is read
    by this reload, not by the next.
    """
    generations = count_in(c, APACHE_ERROR_LOG, RESUMED)
    c.sh("apache2ctl configtest 2>&1 && systemctl reload apache2.service")
    wait_for(lambda: count_in(c, APACHE_ERROR_LOG, RESUMED) > generations, 30,
             "Apache to re-read its configuration after the reload", interval=0.1)


def veto_count(c: nspawn.Container, error_log: str) -> int:
    """How often Apache's error log says mod_md's hook failed or vetoed a renewal so far."""
    return count_in(c, error_log, VETO) + count_in(c, error_log, HOOK_FAILED)


def wait_for_renewal_without_veto(c: nspawn.Container, error_log: str, staged_file: str,
                                  vetoes_before: int, after: str) -> None:
    """mod_md, left alone, stages a renewed certificate (`staged_file` appears) and nothing
    vetoes it: what a removed hook must not prevent (mod_md took its exit 255 for a veto)."""
    staged = c.path(staged_file)

    def vetoes() -> list[str]:
        lines = c.path(error_log).read_text(errors="replace").splitlines()
        return [line for line in lines if VETO in line or HOOK_FAILED in line]

    try:
        wait_for(lambda: staged.exists() or len(vetoes()) > vetoes_before, RENEW_IN + 90,
                 f"mod_md to stage a renewed certificate ({staged_file})", interval=0.5)
    except HarnessError:
        pytest.fail("no renewal staged; Apache's error log ends:\n"
                    + c.path(error_log).read_text(errors="replace")[-3000:])
    assert vetoes()[vetoes_before:] == [], f"mod_md's renewal was vetoed after {after}"
