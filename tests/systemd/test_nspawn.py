"""The project as a real system service under a real systemd 252 (a booted bookworm container).

The installer runs inside, under systemd as PID 1 (daemon-reload, the timer enabled, dbus
reloaded); Apache runs as apache2.service with mod_md and an MD whose certificate is active; a
renewed set is then staged as mod_md would stage it, and the Apache user asks for a restart
with busctl. What must follow, for real: D-Bus activation of the broker's unit, polkit asked
(its rules grant the Apache user), ReloadUnit("apache2.service") through systemd after the settle
time, mod_md activating the staged set in Apache's graceful restart (same MainPID), the broker
verifying it in the store and over TLS on 127.0.0.1:443 from inside its sandbox, and
LastResult "ok". Another user is refused by the bus before anything is activated. The unit's
sandbox is measured online with systemd-analyze security. Last, scripts/uninstall runs, and
mod_md (with pebble in the container) still renews a certificate that comes due afterwards:
no veto from a hook that is gone.

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

from broker import names
from harness import nspawn
from harness import storefactory
from harness.certs import make_server_tls
from harness.pebble import PEBBLE_ENV, pebble_binary
from harness.procs import wait_for
from tests.systemd.conftest import note, note_result
from tests.systemd.steps import (
    RENEW_IN,
    count_in,
    is_active,
    prop,
    reload_apache,
    served_sha256,
    unit_prop,
    veto_count,
    wait_for_renewal_without_veto,
)

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


def test_www_data_request_activates_broker_and_reloads_apache(system: System) -> None:
    c = system.c
    active = storefactory.read_active_fingerprint(c.path(STORE), MD)
    assert active is not None
    assert storefactory.fingerprint_of([served_sha256(c)]) == active

    # mod_md stages a renewed set as www-data and tells the hook once job.json is written.
    staged = storefactory.add_staged(system.store, MD, job={"finished": True, "notified-renewed": True})
    target = c.path(f"{STORE}/staging/{MD}")
    shutil.copytree(staged.dir, target)
    for p in [target, *target.iterdir()]:
        shutil.chown(p, APACHE_USER, APACHE_USER)

    main_pid = unit_prop(c, "apache2.service", "MainPID")
    assert int(main_pid) > 0
    graceful_before = count_in(c, "/var/log/apache2/error.log", "AH00493")
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
    assert count_in(c, "/var/log/apache2/error.log", "AH00493") == graceful_before + 1
    # mod_md activated the staged set, and Apache serves it.
    assert not c.path(f"{STORE}/staging/{MD}").exists()
    assert storefactory.read_active_fingerprint(c.path(STORE), MD) == staged.fingerprint
    assert served_sha256(c) == staged.sha256()
    # The broker asked polkit: polkitd was activated for it.
    assert is_active(c, "polkit.service") == "active"
    broker_log = c.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
    assert f"request from uid 33 for {MD} accepted" in broker_log, broker_log


def test_self_test_under_systemd(system: System) -> None:
    c = system.c
    gracefuls = count_in(c, "/var/log/apache2/error.log", "AH00493")
    r = c.run(["/usr/local/bin/apache-restart", "test", MD], check=False)
    note_result("apache-restart test (systemd tier)", r.stdout.rstrip())
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "9 of 9 checks passed", lines
    assert f"ok    hook as {APACHE_USER}: /usr/local/bin/apache-restart-hook runs" in r.stdout
    assert (f"ok    bus policy and polkit for {APACHE_USER}: let through (the broker would refuse {MD} now: "
            f"NothingStaged: no certificate set is staged for {MD})") in r.stdout
    assert f"ok    probe 127.0.0.1:443 ({MD}): serves the active certificate" in r.stdout
    # A user the bus policy does not name fails that one step, and says what to fix.
    r = c.run(["/usr/local/bin/apache-restart", "test", "--apache-user", "nobody", MD], check=False)
    note_result("apache-restart test --apache-user nobody (systemd tier)", r.stdout.rstrip())
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  bus policy and polkit for nobody: refused by the bus policy\n" in r.stdout
    assert "      fix: the bus policy (/usr/share/dbus-1/system.d/org.masysma.ApacheRestart.conf)" in r.stdout
    # Nothing was restarted.
    assert count_in(c, "/var/log/apache2/error.log", "AH00493") == gracefuls
    assert prop(c, "Pending") is False


def test_a_config_typo_is_named_and_a_broker_that_cannot_start_is_reported_at_once(system: System) -> None:
    c = system.c
    config = c.path("/etc/apache-restart-broker.toml")
    good = config.read_text()
    c.run(["systemctl", "stop", UNIT])
    try:
        config.write_text(good + "setle_seconds = 10\n")
        r = c.run(["/usr/local/sbin/apache-restart-broker", "--check-config"], check=False)
        assert r.returncode == 2, r
        assert "setle_seconds" in r.stderr and "did you mean settle_seconds?" in r.stderr, r.stderr
        note_result("apache-restart-broker --check-config (a typo)", r.stderr.rstrip())

        t0 = time.monotonic()
        r = c.run(["/usr/local/bin/apache-restart", "status"], check=False)
        took = time.monotonic() - t0
        note("status while the broker cannot start", took)
        note_result("apache-restart status (the broker cannot start)", r.stderr.rstrip())
        assert r.returncode == 3, r
        assert r.stderr.startswith("apache-restart: status: the broker cannot start: "), r.stderr
        assert "apache-restart-broker --check-config" in r.stderr, r.stderr
        # Not the bus daemon's activation timeout (25 s), nor our own 30 s.
        assert took < 10, took
        # A configuration error is not restarted (exit 2 is RestartPreventExitStatus=).
        assert is_active(c, UNIT) == "failed"
        assert unit_prop(c, UNIT, "NRestarts") == "0"
        assert unit_prop(c, UNIT, "ExecMainStatus") == "2"
        # Fixed, but the bus still waits on its first attempt (25 s) and does not ask systemd
        # again: status says so, instead of hanging.
        config.write_text(good)
        c.run(["systemctl", "reset-failed", UNIT])
        t0 = time.monotonic()
        r = c.run(["/usr/local/bin/apache-restart", "status"], check=False)
        assert r.returncode == 3, r
        assert r.stderr.startswith("apache-restart: status: the broker is not running: "), r.stderr
        assert "is inactive and the bus has not started it" in r.stderr, r.stderr
        assert f"systemctl start {UNIT}" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 10
        c.run(["systemctl", "start", UNIT])
    finally:
        config.write_text(good)
        c.run(["systemctl", "reset-failed", UNIT], check=False)
    r = c.run(["/usr/local/sbin/apache-restart-broker", "--check-config"])
    assert ": ok: store /etc/apache2/md, restart via systemd (apache2.service), settle 1 s" in r.stdout, r.stdout
    r = c.run(["/usr/local/bin/apache-restart", "status"])
    note_result("apache-restart status (systemd tier)", r.stdout.rstrip())
    assert f"\n{MD}\n  names:      {MD}\n" in r.stdout, r.stdout
    r = c.run(["/usr/local/bin/apache-restart", "status"], user="nobody", check=False)
    assert r.returncode == 4
    assert r.stderr == ("apache-restart: status: run as root or as a member of the monitoring group (the broker "
                        "answers GetStatus only for root and whom polkit grants "
                        "org.masysma.apacherestart.read-status)\n")


def test_a_failed_install_leaves_no_half_made_venv(system: System) -> None:
    c = system.c
    c.run(["systemctl", "stop", UNIT])
    c.run(["mv", "/opt/apache-restart-broker", "/opt/arb-installed-aside"])
    try:
        # pip finds nothing to install: the venv is made, then filling it fails.
        r = c.run(["/usr/bin/python3", "/src/scripts/install", "--restart-via", "systemd",
                   "--pip-arg=--no-index", "--pip-arg=--find-links=/nonexistent"], check=False, timeout=300)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "created /opt/apache-restart-broker/venv" in " ".join(r.stdout.split()), r.stdout
        assert r.stderr.startswith("install: "), r.stderr
        assert "nothing half-made is left" in r.stdout, r.stdout
        assert not c.path("/opt/apache-restart-broker").exists()
    finally:
        c.run(["rm", "-rf", "/opt/apache-restart-broker"])
        c.run(["mv", "/opt/arb-installed-aside", "/opt/apache-restart-broker"])
    assert c.run(["/usr/local/bin/apache-restart", "--version"]).stdout.startswith("apache-restart ")


def test_broker_sandbox_exposure_online(system: System) -> None:
    c = system.c
    r = c.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False)
    print(r.stdout)
    note_result(f"systemd-analyze security {UNIT} (online, in the container)", r.stdout.rstrip())
    score = nspawn.exposure(r.stdout)
    assert score <= MAX_EXPOSURE, r.stdout


def test_hook_lines_reach_the_journal(system: System) -> None:
    """journald parses the hook's datagrams: identifier, facility, priority, the escaped name."""
    c = system.c
    r = c.run(["/usr/local/bin/apache-restart-hook", "errored", "evil\nname"], user=APACHE_USER, check=False)
    assert r.returncode == 0, r.stderr
    text = r"errored evil\x0aname (not a valid MD name): mod_md reports a renewal error (see its log); nothing to do"
    assert r.stderr == f"apache-restart-hook: {text}\n"

    def entries() -> list[dict]:
        # mod_md's own calls of the hook (`installed` in the test above) are there too.
        out = c.run(["journalctl", "--no-pager", "-o", "json", "-t", "apache-restart-hook"]).stdout
        return [e for e in map(json.loads, filter(None, out.splitlines())) if "evil" in e["MESSAGE"]]

    (entry,) = wait_for(entries, 10, "the hook's line in the journal", interval=0.1)
    assert entry["MESSAGE"] == text
    assert (entry["PRIORITY"], entry["SYSLOG_FACILITY"]) == ("3", "3")   # err, daemon
    assert entry["_UID"] == "33"


# -- uninstalling: Apache must keep renewing ---------------------------------------------------

RENEW_MD = "www.example.test"
PEBBLE_DIR = "/etc/arb-pebble"
HOOK = "/usr/local/bin/apache-restart-hook"


def _start_pebble(c: nspawn.Container) -> None:
    """pebble on the container's loopback, at the CA URL the MDs name (storefactory.CA_URL)."""
    tmp = Path(tempfile.mkdtemp(prefix="arb-pebble-"))
    try:
        tls = make_server_tls(tmp, "localhost")
        inside = c.path(PEBBLE_DIR)
        inside.mkdir(mode=0o755, exist_ok=True)
        for src, name in ((tls.ca_cert, "ca.pem"), (tls.cert, "cert.pem"), (tls.key, "key.pem")):
            shutil.copyfile(src, inside / name)
            (inside / name).chmod(0o644)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.copy2(pebble_binary(), c.path("/usr/local/bin/pebble"))
    hosts = c.path("/etc/hosts")
    if not hosts.exists():  # minbase has none; mod_md and the probe reach pebble as "localhost"
        hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    (inside / "config.json").write_text(json.dumps({"pebble": {
        "listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
        "certificate": f"{PEBBLE_DIR}/cert.pem", "privateKey": f"{PEBBLE_DIR}/key.pem",
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
    c.run(["systemd-run", "--unit=arb-pebble", *[f"--setenv={k}={v}" for k, v in PEBBLE_ENV.items()],
           "/usr/local/bin/pebble", "-config", f"{PEBBLE_DIR}/config.json"])
    probe = ("import ssl, urllib.request; urllib.request.urlopen('https://localhost:14000/dir', timeout=2, "
             f"context=ssl.create_default_context(cafile='{PEBBLE_DIR}/ca.pem')).read()")
    wait_for(lambda: c.run(["/usr/bin/python3", "-c", probe], check=False).returncode == 0, 30,
             "pebble's directory in the container", interval=0.2)


def test_uninstall_leaves_apache_renewing(system: System) -> None:
    """After ./scripts/uninstall mod_md still renews: no veto from a hook that is gone."""
    c = system.c
    _start_pebble(c)
    # An MD whose certificate comes due RENEW_IN seconds after it is written; Apache (with the
    # hook still configured) learns of it now, and is not reloaded by the test after this.
    written = time.time()
    storefactory.add_active(system.store, RENEW_MD, valid_until=written + 86400)
    shutil.copytree(system.store / "domains" / RENEW_MD, c.path(f"{STORE}/domains/{RENEW_MD}"))
    active_before = storefactory.read_active_fingerprint(c.path(STORE), RENEW_MD)
    (c.path("/etc/apache2/sites-available") / "arb-renew.conf").write_text(f"""\
MDCACertificateFile {PEBBLE_DIR}/ca.pem
MDContactEmail hostmaster@example.test
MDCheckInterval 1s
MDRetryDelay 1s
LogLevel warn md:info
<MDomain {RENEW_MD}>
    MDRenewWindow {int(86400 - RENEW_IN)}s
</MDomain>
<VirtualHost *:443>
    ServerName {RENEW_MD}
    SSLEngine on
</VirtualHost>
""")
    c.run(["a2ensite", "-q", "arb-renew"])
    reload_apache(c)  # done with it before a broken file appears below
    due = written + RENEW_IN
    error_log = "/var/log/apache2/error.log"
    vetoes_before = veto_count(c, error_log)

    # Where Apache could not be reloaded without the hook, nothing is removed.
    snippet = c.path("/etc/apache2/conf-enabled/apache-restart-broker.conf")
    for name, text, says in (
            ("arb-broken.conf", "ThisIsNoDirective\n", "Apache's config test fails without"),
            ("arb-own-hook.conf", f"MDMessageCmd {HOOK} --then /bin/true --\n", f"names {HOOK} in MDMessageCmd")):
        extra = c.path("/etc/apache2/conf-enabled") / name
        extra.write_text(text)
        try:
            r = c.run(["/src/scripts/uninstall"], check=False, timeout=120)
        finally:
            extra.unlink()
        assert r.returncode == 1, r.stdout + r.stderr
        assert says in r.stderr and "nothing was removed" in r.stderr, r.stderr
        assert c.path(HOOK).is_symlink() and snippet.is_symlink()
        assert "removed" not in r.stdout, r.stdout

    t0 = time.monotonic()
    r = c.run(["/src/scripts/uninstall"], check=False, timeout=120)
    note("scripts/uninstall inside", time.monotonic() - t0)
    print(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    uninstalled = time.time()
    assert uninstalled < due - 5, "the uninstall took too long for the renewal below to prove anything"
    assert not c.path(HOOK).exists() and not c.path(HOOK).is_symlink()

    # mod_md comes to the MD when it is due, with no reload by the test in between, and renews it.
    staged_file = f"{STORE}/staging/{RENEW_MD}/pubcert.pem"
    wait_for_renewal_without_veto(c, error_log, staged_file, vetoes_before, "the uninstall")
    note("uninstall to renewal staged", time.time() - uninstalled)
    assert c.path(staged_file).stat().st_mtime >= uninstalled
    # How: the snippet disabled, Apache reloaded gracefully before the hook went.
    assert "reloaded Apache, gracefully" in r.stdout, r.stdout
    assert not c.path("/etc/apache2/conf-enabled/apache-restart-broker.conf").exists()
    assert is_active(c, "apache2.service") == "active"

    # The next reload (logrotate's at night, or anyone's) activates it: Apache renews as before.
    c.run(["systemctl", "reload", "apache2.service"])
    wait_for(lambda: not c.path(f"{STORE}/staging/{RENEW_MD}").exists(), 30,
             "Apache's reload to activate the staged set", interval=0.2)
    active_after = storefactory.read_active_fingerprint(c.path(STORE), RENEW_MD)
    assert active_after is not None and active_after != active_before


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
