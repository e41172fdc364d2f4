"""Steps that the container tests share: asking the broker and systemd, reading what is served."""

from __future__ import annotations

import json

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from broker import names
from harness import nspawn


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
