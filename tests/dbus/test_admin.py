"""apache-restart (the admin command) against the real broker on a private bus."""

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import broker
from broker import names
from harness import busutil, storefactory
from tests import tiers
from harness.busutil import get_property

VENV_BIN = Path(sys.executable).parent
ADMIN_SCRIPT = VENV_BIN / "apache-restart"

BOTH = "both.example.test"            # active and a newer valid staged set, two key types
ACTIVE_ONLY = "active.example.test"   # active, nothing staged
STAGED_ONLY = "first.example.test"    # the very first certificate: staged, nothing active
EXPIRED = "expired.example.test"      # active, and an expired staged set
INCOMPLETE = "partial.example.test"   # a staged set without its pubcert: not complete


@pytest.fixture
def bus_address(open_bus_address):
    """The private bus, reachable by www-data too (overrides conftest's)."""
    return open_bus_address


async def admin(*args: str, user: str | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run apache-restart; (exit status, stdout, stderr)."""
    if user:  # the installed script, as another user
        argv = ["runuser", "-u", user, "--", str(ADMIN_SCRIPT), *args]
        cwd, env = "/", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    else:
        argv = [sys.executable, "-m", "client.admin", *args]
        cwd, env = str(busutil.REPO), busutil.broker_env()
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _usec(t: float) -> int:
    return round(t * 1_000_000)


def _check_certs(got: list[dict], info: storefactory.SetInfo) -> None:
    assert [c["key_type"] for c in got] == list(info.key_types)
    for c in got:
        issued = info.certs[c["key_type"]]
        assert c["serial"] == issued.serial
        assert c["sha256"] == issued.sha256
        assert c["not_before_usec"] == _usec(issued.not_before)
        assert c["not_after_usec"] == _usec(issued.not_after)
        assert "storefactory test CA" in c["issuer"]


@pytest.fixture
def mixed_store(store):
    """A store with active, staged, invalid and incomplete sets; what each add_* wrote."""
    keys = ("rsa", "secp256r1")
    now = time.time()
    sets = {
        "both.active": storefactory.add_active(store, BOTH, [BOTH], keys),
        "both.staged": storefactory.add_staged(store, BOTH, [BOTH], keys),
        "active_only": storefactory.add_active(store, ACTIVE_ONLY, [ACTIVE_ONLY]),
        "staged_only": storefactory.add_staged(store, STAGED_ONLY, [STAGED_ONLY]),
        "expired.active": storefactory.add_active(store, EXPIRED, [EXPIRED]),
        "expired.staged": storefactory.add_staged(store, EXPIRED, [EXPIRED], valid_from=now - 86400,
                                                  valid_until=now - 3600),
        "incomplete": storefactory.add_staged(store, INCOMPLETE, [INCOMPLETE], skip_files=("pubcert.pem",)),
    }
    return store, sets


async def test_status_json_field_by_field(start_broker, bus_address, mixed_store):
    store, sets = mixed_store
    await start_broker()
    rc, out, err = await admin("--bus-address", bus_address, "status", "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["version"] == broker.__version__
    assert status["pending"] is False
    assert status["planned_at_usec"] == 0
    assert status["last_restart_usec"] == 0
    assert status["last_result"] == ""
    assert status["restarting"] is False
    assert status["md_store"] == str(store)
    mds = {m["name"]: m for m in status["mds"]}
    assert list(mds) == sorted([BOTH, ACTIVE_ONLY, STAGED_ONLY, EXPIRED, INCOMPLETE])
    for m in mds.values():
        assert m["pending"] is False and m["failed_before"] is False

    both = mds[BOTH]
    assert both["active"]["fingerprint"] == sets["both.active"].fingerprint
    _check_certs(both["active"]["certs"], sets["both.active"])
    assert both["staged"]["valid"] is True and both["staged"]["problem"] == ""
    assert both["staged"]["fingerprint"] == sets["both.staged"].fingerprint
    _check_certs(both["staged"]["certs"], sets["both.staged"])
    staged_mtime = max((store / "staging" / BOTH / f).stat().st_mtime
                       for f in ("pubcert.pem", "pubcert.secp256r1.pem"))
    assert both["staged"]["since_usec"] == _usec(staged_mtime)

    active_only = mds[ACTIVE_ONLY]
    assert active_only["staged"] is None
    assert active_only["active"]["fingerprint"] == sets["active_only"].fingerprint
    _check_certs(active_only["active"]["certs"], sets["active_only"])

    staged_only = mds[STAGED_ONLY]
    assert staged_only["active"] is None
    assert staged_only["staged"]["valid"] is True
    _check_certs(staged_only["staged"]["certs"], sets["staged_only"])

    expired = mds[EXPIRED]
    _check_certs(expired["active"]["certs"], sets["expired.active"])
    assert expired["staged"]["valid"] is False
    assert expired["staged"]["problem"].startswith("expired")
    assert set(expired["staged"]) == {"valid", "problem"}

    incomplete = mds[INCOMPLETE]
    assert incomplete["active"] is None and incomplete["staged"] is None


async def test_status_per_md(start_broker, bus_address, mixed_store):
    store, sets = mixed_store
    await start_broker()
    rc, out, err = await admin("--bus-address", bus_address, "status")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[:4] == [f"apache-restart-broker {broker.__version__}, store {store}",
                         "restart:      none pending",
                         "last result:  none yet",
                         "last restart: never"]
    blocks = {b.splitlines()[0]: b for b in out.split("\n\n")[1:]}
    assert list(blocks) == sorted([BOTH, ACTIVE_ONLY, STAGED_ONLY, EXPIRED, INCOMPLETE])
    both = blocks[BOTH]
    assert f"  names:      {BOTH}\n" in both
    for kt in ("rsa", "secp256r1"):
        (line,) = [x for x in both.splitlines() if sets["both.active"].serial(kt) in x]
        assert kt in line and "issuer " in line and "storefactory test CA" in line
        assert "days left)" in line
        # The staged set per key type too: serial and expiry, like the active one.
        (line,) = [x for x in both.splitlines() if sets["both.staged"].serial(kt) in x]
        assert line.startswith(f"              {kt}") and "expires " in line and "days left)" in line
    assert "  staged:     valid, since " in both
    assert f"  next:       valid, but no restart pending (the hook's request did not arrive?): " \
           f"apache-restart request {BOTH}" in both
    assert "  staged:     none" in blocks[ACTIVE_ONLY] and "nothing to do" in blocks[ACTIVE_ONLY]
    assert "  active:     none yet" in blocks[STAGED_ONLY]
    expired = blocks[EXPIRED]
    assert "  staged:     INVALID" in expired
    assert "  next:       staged set refused, it will not be activated: expired" in expired


async def test_request_then_status_shows_it_pending(start_broker, client, allow, bus_address, store):
    md = "www.example.test"
    storefactory.add_staged(store, md, [md])
    await start_broker(settle_seconds=30)
    rc, out, err = await admin("--bus-address", bus_address, "request", md)
    assert rc == 0, err
    assert out.startswith(f"{md}: restart planned at the latest at ") and out.endswith(" (in 30 s)\n"), out
    planned = await get_property(client, "PlannedAt")
    rc, out, err = await admin("--bus-address", bus_address, "status", "--json")
    status = json.loads(out)
    assert status["pending"] is True and status["planned_at_usec"] == planned
    (entry,) = status["mds"]
    assert entry["pending"] is True
    rc, out, err = await admin("--bus-address", bus_address, "status")
    assert rc == 0, err
    assert out.splitlines()[1].startswith(f"restart:      pending for {md}, at the latest at "), out
    assert out.splitlines()[1].endswith("settle window (settle_seconds; ends early once mod_md is done)"), out
    assert "  next:       restart at the latest at " in out


@pytest.mark.parametrize("name,error", [
    ("nothing.example.test", names.ERROR_NOTHING_STAGED),
    ("../etc", names.ERROR_INVALID_NAME),
])
async def test_request_refused(start_broker, allow, bus_address, name, error):
    await start_broker()
    rc, out, err = await admin("--bus-address", bus_address, "request", name)
    assert rc == 1
    assert out == ""
    assert err.startswith(f"apache-restart: request {name}: {error}: "), err


async def test_request_denied_and_rate_limited(start_broker, client, polkit, bus_address, store):
    storefactory.add_staged(store, "www.example.test", ["www.example.test"])
    # One request, never refilled; the rate limit is checked after authorization, so the
    # refused call does not use it up.
    await start_broker(rate_burst=1, rate_per_second=0)
    rc, _, err = await admin("--bus-address", bus_address, "request", "www.example.test")
    assert rc == 4 and "access denied" in err and "AccessDenied" in err, err
    await polkit.control(client, "SetAllowed", "as", [[names.POLKIT_ACTION]])
    rc, _, err = await admin("--bus-address", bus_address, "request", "www.example.test")
    assert rc == 0, err
    rc, _, err = await admin("--bus-address", bus_address, "request", "www.example.test")
    assert rc == 3 and "RateLimited" in err and "try again later" in err, err


async def test_check_all(start_broker, client, bus_address, mixed_store):
    await start_broker(settle_seconds=30)
    rc, out, err = await admin("--bus-address", bus_address, "check-all")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"scheduled: {BOTH}, {STAGED_ONLY}"
    assert lines[1].startswith("restart planned at the latest at ")
    assert await get_property(client, "Pending") is True


async def test_status_needs_root(start_broker, bus_address):
    if not ADMIN_SCRIPT.exists():
        tiers.unavailable("apache-restart is not installed in the venv")
    await start_broker()
    # status: root, or whom polkit grants the read action (here polkit grants nothing).
    for command in ("status", "check-all"):
        rc, _, err = await admin("--bus-address", bus_address, command, user="www-data")
        assert rc == 4, err
        expected = {"status": "run as root or as a member of the monitoring group (the broker answers "
                              "GetStatus only for root and whom polkit grants "
                              "org.masysma.apacherestart.read-status)",
                    "check-all": "run as root (the broker answers CheckAll only for root)"}[command]
        assert err == f"apache-restart: {command}: {expected}\n", err


async def test_unreachable_broker(bus_address, tmp_path):
    for address in (bus_address, f"unix:path={tmp_path}/no-such-bus"):
        for command in (["status"], ["status", "--json"], ["request", "www.example.test"], ["check-all"]):
            rc, out, err = await admin("--bus-address", address, *command)
            assert rc == 3, (address, command, err)
            assert out == ""
            assert "the broker is not reachable" in err, err


async def test_watch_prints_restarts(start_broker, allow, bus_address, store):
    md = "www.example.test"
    storefactory.add_staged(store, md, [md])
    await start_broker()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.admin", "--bus-address", bus_address, "watch",
        cwd=str(busutil.REPO), env=busutil.broker_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert first.decode().startswith("watching org.masysma.ApacheRestart")
        rc, _, err = await admin("--bus-address", bus_address, "request", md)
        assert rc == 0, err
        seen = []
        while not any("restart ok for" in line for line in seen):
            seen.append((await asyncio.wait_for(proc.stdout.readline(), 15)).decode())
        assert any("restart pending, planned at" in line for line in seen), seen
        assert f"  restart ok for {md}: " in seen[-1], seen
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0
