"""The Debian package on a booted Debian 12 with no network, the way an administrator uses it.

`apt install ./<deb>` takes everything it needs from what the system already has (Debian's own
python3-* libraries; nothing from PyPI, no venv). Then: a2enconf and a reload, pebble (the ACME
test server) inside the container, mod_md obtaining a certificate and calling the packaged hook
as www-data, D-Bus activation of the broker, polkit, ReloadUnit through systemd, the new
certificate served, the broker exiting when idle, `apache-restart status`, the monitoring
plugin run by a member of group nagios (whose bus policy postinst made) and `man
apache-restart`. Then `apt remove`: refused, changing nothing, where Apache would still run the
hook (a broken configuration, another file naming the hook); otherwise the configuration stays,
the snippet is disabled, Apache is reloaded and mod_md renews a certificate that comes due
afterwards, with no veto from the hook that is gone. Last `apt purge` (nothing is left).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from harness import nspawn
from harness.certs import make_server_tls
from harness.pebble import PEBBLE_ENV
from harness.procs import wait_for
from tests.package import debbuild
from harness.storefactory import cert_time
from tests.systemd.conftest import note, skip_or_fail
from tests.systemd.steps import (
    RENEW_IN,
    count_in,
    is_active,
    journal,
    prop,
    reload_apache,
    served_sha256,
    unit_prop,
    veto_count,
    wait_for_renewal_without_veto,
)
from tests.systemd.test_nspawn import BROKER_CONFIG

pytestmark = pytest.mark.systemd

PKG = "apache-restart-broker"
MD = "test.example"
STORE = "/etc/apache2/md"
UNIT = "apache-restart-broker.service"
TIMER = "apache-restart-broker-check.timer"
APACHE_USER = "www-data"
PEBBLE_DIR = "/srv/pebble"
PEBBLE_ROOT = "/etc/ssl/pebble-root.pem"
IDLE_EXIT = 3
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
HOOK = "/usr/bin/apache-restart-hook"
MONITOR_GROUP = "nagios"
MONITOR_USER = "arb-monitor"
MONITOR_POLICY = "/etc/dbus-1/system.d/org.masysma.ApacheRestart-monitor.conf"


def site(ca_file: str) -> str:
    return f"""\
# An MD that mod_md obtains from pebble inside the container.
MDCertificateAuthority https://localhost:14000/dir
MDCACertificateFile {ca_file}
MDCertificateAgreement accepted
MDContactEmail hostmaster@example.test
MDCheckInterval 1s
MDRetryDelay 1s
MDomain {MD}
<VirtualHost *:443>
    ServerName {MD}
    SSLEngine on
</VirtualHost>
"""


@dataclass
class Installed:
    c: nspawn.Container
    apt_output: str
    t_install: float           # monotonic time apt install started


def apt(c: nspawn.Container, *args: str) -> str:
    # The container has no network: anything apt had to fetch would fail the call.
    r = c.run(["apt-get", "-y", "-q", *args], env=APT_ENV, check=False, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return out


def start_pebble(c: nspawn.Container) -> None:
    """pebble as a transient unit inside the container, with its own throwaway TLS files."""
    # minbase has no /etc/hosts, and pebble's URLs (and its certificate) say "localhost".
    hosts = c.path("/etc/hosts")
    if not hosts.exists():
        hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    host = Path(tempfile.mkdtemp(prefix="arb-pebble-"))
    try:
        tls = make_server_tls(host, "localhost")
        inside = c.path(PEBBLE_DIR)
        inside.mkdir(parents=True)
        for f in (tls.ca_cert, tls.cert, tls.key):
            shutil.copy(f, inside / f.name)
        (inside / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
            "certificate": f"{PEBBLE_DIR}/{tls.cert.name}", "privateKey": f"{PEBBLE_DIR}/{tls.key.name}",
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        ca_name = tls.ca_cert.name
    finally:
        shutil.rmtree(host, ignore_errors=True)
    c.run(["chmod", "-R", "a+rX", PEBBLE_DIR])
    c.run(["systemd-run", "--unit=arb-pebble", f"--working-directory={PEBBLE_DIR}",
           *[f"--setenv={k}={v}" for k, v in PEBBLE_ENV.items()],
           "/usr/bin/pebble", "-config", f"{PEBBLE_DIR}/pebble.json"])
    fetch = ("import ssl, sys, urllib.request\n"
             f"ctx = ssl.create_default_context(cafile='{PEBBLE_DIR}/{ca_name}')\n"
             "sys.stdout.write(urllib.request.urlopen(sys.argv[1], context=ctx, timeout=2).read().decode())\n")

    def directory() -> bool:
        return c.run(["/usr/bin/python3", "-c", fetch, "https://localhost:14000/dir"], check=False).returncode == 0

    wait_for(directory, 30, "pebble's directory in the container", interval=0.2)
    # The root pebble issues under: the broker verifies staged chains against its trust anchors.
    root = c.run(["/usr/bin/python3", "-c", fetch, "https://localhost:15000/roots/0"]).stdout
    c.path(PEBBLE_ROOT).write_text(root)
    c.path("/etc/apache2/arb-pebble-ca.pem").write_text(c.path(f"{PEBBLE_DIR}/{ca_name}").read_text())


@pytest.fixture(scope="module")
def installed(booted: nspawn.Container) -> Iterator[Installed]:
    why = debbuild.missing()
    if why:
        skip_or_fail(why)
    t0 = time.monotonic()
    deb = debbuild.built_deb()
    note("package: build (or cached)", time.monotonic() - t0)
    c = booted
    # The image keeps dpkg from unpacking manual pages (they make up much of it); a real
    # system has them, and `man apache-restart` is part of this test.
    c.run(["rm", "-f", nspawn.DPKG_OPTIONS_FILE])
    shutil.copy(deb, c.path(f"/root/{deb.name}"))
    assert is_active(c, "apache2.service") == "active"
    # A monitoring system is installed here already: its group exists, with a user in it.
    c.run(["groupadd", "--system", MONITOR_GROUP])
    c.run(["useradd", "--system", "--no-create-home", "-G", MONITOR_GROUP, MONITOR_USER])
    t_install = time.monotonic()
    out = apt(c, "install", f"/root/{deb.name}")
    note("package: apt install ./<deb>", time.monotonic() - t_install)
    print(out)
    yield Installed(c, out, t_install)


def test_apt_install_needs_nothing_from_outside(installed: Installed) -> None:
    c, out = installed.c, installed.apt_output
    # Only this package was new: every dependency came from the system as it was.
    m = re.search(r"(\d+) newly installed", out)
    assert m and m.group(1) == "1", out
    status = c.run(["dpkg-query", "-W", "-f=${Status} ${Version}", PKG]).stdout
    assert status.startswith("install ok installed"), status
    # No venv and nothing from pip; the code is Debian's python3 with Debian's libraries.
    assert not c.path("/opt/apache-restart-broker").exists()
    probe = c.run(["/usr/bin/python3", "-I", "-c",
                   f"import sys; sys.path.insert(0, '/usr/share/{PKG}'); from broker import dbuslib;"
                   "import cryptography; print(sys.modules[dbuslib.LIB_NAME].__file__, cryptography.__file__)"])
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in probe.stdout.split()), probe.stdout
    # The snippet was enabled by the package, the timer is on, the broker waits for activation.
    assert c.run(["a2query", "-c", PKG], check=False).returncode == 0
    assert c.run(["systemctl", "is-enabled", TIMER]).stdout.strip() == "enabled"
    assert is_active(c, TIMER) == "active"
    assert is_active(c, UNIT) == "inactive"
    assert unit_prop(c, UNIT, "FragmentPath") == f"/lib/systemd/system/{UNIT}"
    # Group nagios exists: postinst gave it the monitoring bus policy, a file of its own.
    assert f'<policy group="{MONITOR_GROUP}">' in c.path(MONITOR_POLICY).read_text()
    r = c.run(["systemd-analyze", "verify", UNIT, "apache-restart-broker-check.service", TIMER], check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


def test_renewal_through_the_packaged_hook_is_activated(installed: Installed) -> None:
    c = installed.c
    conf = c.path("/etc/apache-restart-broker.toml")
    shipped = conf.read_text()
    assert re.search(r"^idle_exit_seconds = 60$", shipped, re.MULTILINE), shipped
    start_pebble(c)
    # The administrator's changes to the conffile: short windows, the probe, pebble's root.
    conf.write_text(shipped.replace("idle_exit_seconds = 60", f"idle_exit_seconds = {IDLE_EXIT}")
                    + BROKER_CONFIG
                    + f'trust_anchors = ["/etc/ssl/certs/ca-certificates.crt", "{PEBBLE_ROOT}"]\n')
    (c.path("/etc/apache2/sites-available") / "arb-test.conf").write_text(site("/etc/apache2/arb-pebble-ca.pem"))
    graceful_before = count_in(c, "/var/log/apache2/error.log", "AH00493")
    # What the README tells the administrator to do after apt install.
    r = c.sh("a2enmod -q ssl md && a2ensite -q arb-test\n"
             f"a2enconf {PKG}\n"
             "apache2ctl configtest 2>&1\n"
             "systemctl restart apache2.service")
    assert "already enabled" in r.stdout, r.stdout
    main_pid = unit_prop(c, "apache2.service", "MainPID")

    def activated() -> bool:
        return f"restart for {MD}: " in journal(c, UNIT)

    wait_for(activated, 90, "mod_md's renewal to be activated by the broker", interval=0.5)
    note("package: apt install to the renewal activated", time.monotonic() - installed.t_install)
    broker_log = journal(c, UNIT)
    assert f"restart for {MD}: ok" in broker_log, broker_log
    # The hook ran as www-data (uid 33) and reached the broker by D-Bus activation.
    assert f"request from uid 33 for {MD} accepted" in broker_log, broker_log
    # Reloaded through systemd, gracefully: same parent, one more AH00493.
    assert "Reloading" in journal(c, "apache2.service")
    assert unit_prop(c, "apache2.service", "MainPID") == main_pid
    assert count_in(c, "/var/log/apache2/error.log", "AH00493") >= graceful_before + 1
    # The certificate mod_md obtained is active and served.
    assert not c.path(f"{STORE}/staging/{MD}").exists()
    active = c.path(f"{STORE}/domains/{MD}/pubcert.pem").read_text()
    leaf = x509.load_pem_x509_certificate(active.encode())
    assert served_sha256(c, MD) == leaf.fingerprint(hashes.SHA256()).hex()
    assert prop(c, "LastResult") == "ok"

    # Idle cost 0: with nothing pending or running, the broker exits by itself.
    t0 = time.monotonic()
    wait_for(lambda: is_active(c, UNIT) == "inactive", IDLE_EXIT + 30, "the broker to exit when idle",
             interval=0.2)
    note("package: broker gone after its idle time (from the last call)", time.monotonic() - t0)
    assert "idle for" in journal(c, UNIT)
    assert unit_prop(c, UNIT, "Result") == "success"


def test_admin_command_and_manual_page(installed: Installed) -> None:
    c = installed.c
    r = c.run(["apache-restart", "status"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert MD in r.stdout and "broker " in r.stdout, r.stdout
    # The monitoring plugin as the monitoring system runs it: a member of group nagios, through
    # the bus policy postinst made and the packaged polkit rule. Not UNKNOWN: the broker answered.
    r = c.run(["runuser", "-u", MONITOR_USER, "--", "apache-restart", "check"], check=False)
    assert r.returncode in (0, 1, 2) and r.stdout.startswith("APACHE-RESTART "), r.stdout + r.stderr
    assert f"'{MD} days_left'=" in r.stdout, r.stdout
    print(f"check as {MONITOR_USER}: {r.stdout.strip()} (exit {r.returncode})")
    # Somebody outside the group is refused (by the bus policy): UNKNOWN, access denied.
    r = c.run(["runuser", "-u", "nobody", "--", "apache-restart", "check"], check=False)
    assert r.returncode == 3 and r.stdout.startswith("APACHE-RESTART UNKNOWN - cannot ask the broker: AccessDenied"), \
        r.stdout + r.stderr
    r = c.run(["man", "-P", "cat", "apache-restart"], env={"MANWIDTH": "80"}, check=False)
    assert r.returncode == 0 and "check-all" in r.stdout, r.stdout + r.stderr
    assert "MONITORING PLUGIN" in r.stdout, r.stdout
    for page in ("apache-restart-broker", "apache-restart-hook", "5 apache-restart-broker.toml"):
        r = c.run(["man", "-w", *page.split()], check=False)
        assert r.returncode == 0, page


def test_remove_keeps_the_config_and_apache_renewing(installed: Installed) -> None:
    """After `apt remove` mod_md still renews: no veto from a hook that is gone (issue 12)."""
    c = installed.c
    error_log = "/var/log/apache2/error.log"
    snippet = c.path(f"/etc/apache2/conf-enabled/{PKG}.conf")
    # The MD's renewal comes due RENEW_IN seconds from now: Apache, with the hook still
    # configured, learns of it in this reload, and is not reloaded by the test after it.
    active = c.path(f"{STORE}/domains/{MD}/pubcert.pem").read_bytes()
    active_before = x509.load_pem_x509_certificate(active).fingerprint(hashes.SHA256()).hex()
    due = time.time() + RENEW_IN
    window = int(cert_time(x509.load_pem_x509_certificate(active), "not_valid_after") - due)
    c.path("/etc/apache2/sites-available/arb-test.conf").write_text(
        site("/etc/apache2/arb-pebble-ca.pem").replace(
            f"MDomain {MD}\n", f"LogLevel warn md:info\n<MDomain {MD}>\n    MDRenewWindow {window}s\n</MDomain>\n"))
    reload_apache(c)  # done with it before a broken file appears below
    vetoes_before = veto_count(c, error_log)

    # Where Apache cannot stop running the hook, the removal is refused and changes nothing.
    for name, text, says in (
            ("arb-broken.conf", "ThisIsNoDirective\n", "Apache's configuration test fails"),
            ("arb-own-hook.conf", f"MDMessageCmd {HOOK} --then /bin/true --\n", f"names {HOOK} in MDMessageCmd")):
        extra = c.path("/etc/apache2/conf-enabled") / name
        extra.write_text(text)
        try:
            r = c.run(["apt-get", "-y", "-q", "remove", PKG], env=APT_ENV, check=False, timeout=300)
        finally:
            extra.unlink()
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert says in out and "nothing was removed" in out, out
        assert c.run(["dpkg-query", "-W", "-f=${Status}", PKG]).stdout == "install ok installed"
        assert c.path(HOOK).is_file() and snippet.exists()

    # A running broker is stopped, not left running code that is gone.
    c.run(["apache-restart", "status"])
    assert is_active(c, UNIT) == "active"
    out = apt(c, "remove", PKG)
    removed = time.time()
    assert f"Apache reloaded without {HOOK}: mod_md keeps renewing" in out, out
    assert removed < due - 5, "the removal took too long for the renewal below to prove anything"
    assert is_active(c, UNIT) == "inactive"
    assert c.run(["dpkg-query", "-W", "-f=${Status}", PKG]).stdout == "deinstall ok config-files"
    assert c.path("/etc/apache-restart-broker.toml").is_file()
    assert c.path(f"/etc/apache2/conf-available/{PKG}.conf").is_file()
    assert not snippet.exists()
    assert c.run(["a2query", "-c", PKG], check=False).returncode != 0
    assert not c.path(HOOK).exists()
    assert c.path("/var/lib/apache-restart-broker").is_dir()     # state stays until purge

    # mod_md comes to the MD when it is due, with no reload by the test in between, and renews
    # it: the removal reloaded Apache without the hook.
    staged_file = f"{STORE}/staging/{MD}/pubcert.pem"
    wait_for_renewal_without_veto(c, error_log, staged_file, vetoes_before, "apt remove")
    note("package: apt remove to renewal staged", time.time() - removed)
    assert c.path(staged_file).stat().st_mtime >= removed
    assert is_active(c, "apache2.service") == "active"
    # The next reload (logrotate's at night, or anyone's) activates it, as before the package.
    c.run(["systemctl", "reload", "apache2.service"])
    wait_for(lambda: not c.path(f"{STORE}/staging/{MD}").exists(), 30,
             "Apache's reload to activate the staged set", interval=0.2)
    active_after = c.path(f"{STORE}/domains/{MD}/pubcert.pem").read_bytes()
    assert x509.load_pem_x509_certificate(active_after).fingerprint(hashes.SHA256()).hex() != active_before


def test_purge_leaves_nothing(installed: Installed) -> None:
    c = installed.c
    apt(c, "purge", PKG)
    r = c.run(["dpkg-query", "-W", PKG], check=False)
    assert r.returncode != 0, r.stdout
    for needle in (PKG, "org.masysma.ApacheRestart", "org.masysma.apacherestart"):
        r = c.run(["dpkg", "-S", needle], check=False)
        assert r.returncode != 0, r.stdout
    r = c.run(["find", "/", "-xdev", "(", "-path", "/proc", "-o", "-path", "/src", "-o", "-path", "/wheels",
               "-o", "-path", "/root", ")", "-prune", "-o",
               "(", "-name", "*apache-restart*", "-o", "-name", "*ApacheRestart*", "-o",
               "-name", "*apacherestart*", ")", "-print"])
    assert r.stdout.split() == [], r.stdout
    assert is_active(c, "apache2.service") == "active"
    c.run(["apache2ctl", "configtest"])
