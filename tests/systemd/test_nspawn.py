"""The project as a real system service under a real systemd 252 (a booted bookworm container).

The installer runs inside, under systemd as PID 1 (daemon-reload, the timer enabled, dbus
reloaded); Apache runs as apache2.service with mod_md and an MD whose certificate is active; a
renewed set is then staged as mod_md would stage it, and the Apache user asks for a restart
with busctl. What must follow, for real: D-Bus activation of the broker's unit, polkit asked
(its rules grant the Apache user), ReloadUnit("apache2.service") through systemd after the settle
time, mod_md activating the staged set in Apache's graceful restart (same MainPID), the broker
verifying it in the store and over TLS on 127.0.0.1:443 from inside its sandbox, and
LastResult "ok". Another user is refused by the bus before anything is activated. The unit's
sandbox is measured online with systemd-analyze security.

Timings of every phase are printed at the end of the session.
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

from broker import names
from harness import nspawn
from harness.procs import wait_for
from tests import storefactory
from tests.systemd.conftest import note, note_result

pytestmark = pytest.mark.systemd

MD = "test.example"
STORE = "/etc/apache2/md"
UNIT = "apache-restart-broker.service"
TIMER = "apache-restart-broker-check.timer"
MAX_EXPOSURE = 2.0
APACHE_USER = "www-data"

SITE = f"""\
# The MD of the systemd tier: its certificate is put into the store by the test; the CA is
# never reached (the container has no network, and nothing is due for renewal).
MDCertificateAuthority {storefactory.CA_URL}
MDCertificateAgreement accepted
MDomain {MD}
<VirtualHost *:443>
    ServerName {MD}
    SSLEngine on
</VirtualHost>
"""

# Appended to the configuration the installer wrote (its other keys are commented out).
BROKER_CONFIG = """
# systemd tier: short windows, and the TLS probe on the container's loopback.
settle_seconds = 1.0
verify_timeout_seconds = 15.0
# Bounds the wait for systemd's JobRemoved: a lost signal shows in seconds, not in a minute.
command_timeout_seconds = 10.0
probe = ["127.0.0.1:443"]
"""


@dataclass
class System:
    c: nspawn.Container
    install_output: str
    store: Path                      # the host's copy of the MD store (same store key)


def busctl_json(c: nspawn.Container, *args: str, user: str | None = None) -> object:
    r = c.run(["busctl", "--json=short", *args], user=user)
    return json.loads(r.stdout)["data"]


def prop(c: nspawn.Container, name: str) -> object:
    return busctl_json(c, "get-property", names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE, name)


def unit_prop(c: nspawn.Container, unit: str, name: str) -> str:
    return c.run(["systemctl", "show", "--value", "-p", name, unit]).stdout.strip()


def is_active(c: nspawn.Container, unit: str) -> str:
    return c.run(["systemctl", "is-active", unit], check=False).stdout.strip()


@pytest.fixture(scope="module")
def system(booted: nspawn.Container) -> Iterator[System]:
    c = booted
    t0 = time.monotonic()
    r = c.run(["/usr/bin/python3", "/src/scripts/install", "--restart-via", "systemd",
               "--pip-arg=--no-index", "--pip-arg=--find-links=/wheels"], check=False, timeout=300)
    note("scripts/install inside", time.monotonic() - t0)
    output = r.stdout + r.stderr
    print(output)
    assert r.returncode == 0, output

    t0 = time.monotonic()
    # The staged sets below are signed by storefactory's test CA: the broker must trust it.
    anchors = storefactory.ca_file(c.path("/etc"))
    with open(c.path("/etc/apache-restart-broker.toml"), "a") as f:
        f.write(BROKER_CONFIG + f'trust_anchors = ["/etc/{anchors.name}"]\n')
    tmp = Path(tempfile.mkdtemp(prefix="arb-systemd-"))
    try:
        store = storefactory.make_store(tmp)
        storefactory.add_active(store, MD)
        inside = c.path(STORE)
        shutil.rmtree(inside, ignore_errors=True)
        shutil.copytree(store, inside, symlinks=True)
        (c.path("/etc/apache2/sites-available") / "arb-test.conf").write_text(SITE)
        c.sh("a2enmod -q ssl md && a2ensite -q arb-test && a2enconf -q apache-restart-broker\n"
             "apache2ctl configtest 2>&1\n"
             "systemctl restart apache2.service")
        assert is_active(c, "apache2.service") == "active"
        note("Apache with mod_md configured and restarted", time.monotonic() - t0)
        yield System(c, output, store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the installer under a real systemd -------------------------------------------------------


def test_installer_ran_everything_under_systemd(system: System) -> None:
    out, c = system.install_output, system.c
    assert "restart_via = 'systemd'" in out
    # Nothing was skipped: systemd is PID 1 and the bus runs.
    assert "skipped:" not in out, out
    assert "WARNING:" not in out, out
    for step in ("daemon-reload", f"enable --now {TIMER}", f"try-restart {UNIT}"):
        assert re.search(rf"running \S*/systemctl {re.escape(step)}\n", out), step
    assert re.search(r"running \S*/dbus-send .*ReloadConfig\n", out)
    assert c.run(["systemctl", "is-enabled", TIMER]).stdout.strip() == "enabled"
    assert is_active(c, TIMER) == "active"
    assert unit_prop(c, UNIT, "LoadState") == "loaded"
    assert unit_prop(c, UNIT, "FragmentPath") == f"/usr/local/lib/systemd/system/{UNIT}"
    assert unit_prop(c, UNIT, "Type") == "dbus"
    # The unit file parses without a single complaint from systemd 252.
    r = c.run(["systemd-analyze", "verify", UNIT, "apache-restart-broker-check.service", TIMER],
              check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
    # The venv is usable by the Apache user (the hook runs as it).
    c.run(["/usr/local/bin/apache-restart-hook", "--help"], user=APACHE_USER)


# -- callers -----------------------------------------------------------------------------------


def test_nobody_is_refused_by_the_bus_without_activating(system: System) -> None:
    c = system.c
    assert is_active(c, UNIT) == "inactive"
    r = c.run(["dbus-send", "--system", "--print-reply", f"--dest={names.BUS_NAME}",
               names.OBJECT_PATH, f"{names.INTERFACE}.RequestGracefulRestart", f"string:{MD}"],
              user="nobody", check=False)
    assert r.returncode != 0
    assert names.ERROR_ACCESS_DENIED in r.stderr, r.stderr
    assert "Rejected send message" in r.stderr, r.stderr
    assert is_active(c, UNIT) == "inactive"


def _served_sha256(c: nspawn.Container) -> str:
    pem = c.run(["/usr/bin/python3", "-c",
                 "import ssl; print(ssl.get_server_certificate(('127.0.0.1', 443)))"]).stdout
    cert = x509.load_pem_x509_certificate(pem.encode())
    return cert.fingerprint(hashes.SHA256()).hex()


def _count(c: nspawn.Container, path: str, needle: str) -> int:
    try:
        return c.path(path).read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


def test_www_data_request_activates_broker_and_reloads_apache(system: System) -> None:
    c = system.c
    active = storefactory.read_active_fingerprint(c.path(STORE), MD)
    assert active is not None
    assert storefactory.fingerprint_of([_served_sha256(c)]) == active

    # mod_md stages a renewed set as www-data and tells the hook once job.json is written.
    staged = storefactory.add_staged(system.store, MD, job={"finished": True, "notified-renewed": True})
    target = c.path(f"{STORE}/staging/{MD}")
    shutil.copytree(staged.dir, target)
    for p in [target, *target.iterdir()]:
        shutil.chown(p, APACHE_USER, APACHE_USER)

    main_pid = unit_prop(c, "apache2.service", "MainPID")
    assert int(main_pid) > 0
    graceful_before = _count(c, "/var/log/apache2/error.log", "AH00493")
    assert is_active(c, UNIT) == "inactive"
    assert is_active(c, "polkit.service") == "inactive"   # nothing has asked polkit yet

    t0 = time.monotonic()
    r = c.run(["busctl", "call", names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE,
               "RequestGracefulRestart", "s", MD], user=APACHE_USER)
    called = time.monotonic()
    note("request: activation + polkit + reply", called - t0)
    m = re.fullmatch(r"t (\d+)\s*", r.stdout)
    assert m, r.stdout
    planned = int(m.group(1)) / 1e6
    assert abs(planned - (time.time() + 1.0)) < 5
    assert is_active(c, UNIT) == "active"

    def result() -> str:
        value = prop(c, "LastResult")
        assert isinstance(value, str)
        return value

    last = wait_for(result, 30, "LastResult to be set", interval=0.1)
    note("request to LastResult (settle 1 s + reload + verify)", time.monotonic() - t0)
    # "did not finish within": systemd's JobRemoved never reached the broker (on the system
    # bus a deny rule for send_destination also applies to broadcast signals sent to the
    # connection that owns the name: the bus policy must let systemd's signal through).
    assert last == "ok", last
    assert prop(c, "Pending") is False
    last_restart = prop(c, "LastRestart")
    assert isinstance(last_restart, int) and last_restart > 0

    # The reload went through systemd (the broker's unit may not signal Apache itself) ...
    journal = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", "apache2.service"]).stdout
    assert "Reloading apache2.service" in journal or "Reloading The Apache HTTP Server" in journal, journal
    # ... and was graceful: same parent, AH00493 logged once more.
    assert unit_prop(c, "apache2.service", "MainPID") == main_pid
    assert is_active(c, "apache2.service") == "active"
    assert _count(c, "/var/log/apache2/error.log", "AH00493") == graceful_before + 1
    # mod_md activated the staged set, and Apache serves it.
    assert not c.path(f"{STORE}/staging/{MD}").exists()
    assert storefactory.read_active_fingerprint(c.path(STORE), MD) == staged.fingerprint
    assert _served_sha256(c) == staged.sha256()
    # The broker asked polkit: polkitd was activated for it.
    assert is_active(c, "polkit.service") == "active"
    broker_log = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert f"request from uid 33 for {MD} accepted" in broker_log, broker_log


def test_broker_sandbox_exposure_online(system: System) -> None:
    c = system.c
    r = c.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False)
    print(r.stdout)
    note_result(f"systemd-analyze security {UNIT} (online, in the container)", r.stdout.rstrip())
    score = nspawn.exposure(r.stdout)
    assert score <= MAX_EXPOSURE, r.stdout


def test_a_boot_leaves_nothing_behind(rootfs_and_wheels: tuple[Path, Path]) -> None:
    base, _wheels = rootfs_and_wheels
    c = nspawn.Container(base)
    with c:
        assert c.state == "running", c.dump_logs()
        leader = c.leader
        cgroups = list(c.cgroups)
        assert cgroups and all(cg.is_dir() for cg in cgroups)
    note("second boot: start to running", c.timings["boot"])
    note("second boot: poweroff and cleanup", c.timings["teardown"])
    assert c.leftovers == []
    assert c.popen is not None and c.popen.returncode == 0
    assert leader is not None and not Path(f"/proc/{leader}").exists()
    assert not c.dir.exists()
    assert not any(cg.exists() for cg in cgroups)
    assert str(c.dir) not in Path("/proc/self/mountinfo").read_text()
