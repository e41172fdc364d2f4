"""The broker on a private bus with python-dbusmock's polkitd: the contract, call by call."""

import asyncio
import json
import time
import xml.etree.ElementTree as ET

import pytest

from broker import names
from harness import busutil, storefactory
from harness.busutil import call, error_of, get_property

REPO = busutil.REPO
MD = "www.example.test"


async def start_systemd_mock(bus_address, params: dict):
    """tests/dbus/systemd_mock.py in its own process (stop it with busutil.stop(mock.proc))."""
    from tests.dbus.conftest import start_mock
    return await start_mock(bus_address, str(busutil.REPO / "tests" / "dbus" / "systemd_mock.py"),
                            names.SYSTEMD_BUS_NAME, names.SYSTEMD_PATH, json.dumps(params))


def _normalize_interface(xml_text: str) -> dict:
    root = ET.fromstring(xml_text)
    (iface,) = [i for i in root.iter("interface") if i.get("name") == names.INTERFACE]
    out: dict = {"methods": {}, "signals": {}, "properties": {}}
    for m in iface.iter("method"):
        out["methods"][m.get("name")] = [(a.get("name"), a.get("type"), a.get("direction", "in"))
                                         for a in m.iter("arg")]
    for s in iface.iter("signal"):
        out["signals"][s.get("name")] = [(a.get("name"), a.get("type")) for a in s.iter("arg")]
    for p in iface.iter("property"):
        out["properties"][p.get("name")] = (p.get("type"), p.get("access"))
    return out


async def test_live_introspection_equals_interface_xml(start_broker, client):
    await start_broker()
    reply = await call(client, "Introspect", interface="org.freedesktop.DBus.Introspectable")
    live = _normalize_interface(reply.body[0])
    shipped = _normalize_interface((REPO / "dbus" / "org.masysma.ApacheRestart.xml").read_text())
    assert live == shipped
    assert "RequestGracefulRestart" in live["methods"]
    # Only interfaces root may call (bus policy): not the ObjectManager the libraries add.
    listed = {i.get("name") for i in ET.fromstring(reply.body[0]).iter("interface")}
    assert listed == {names.INTERFACE, "org.freedesktop.DBus.Introspectable",
                      "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Peer"}


async def test_request_restarts_once_and_verifies(start_broker, client, allow, store):
    staged = storefactory.add_staged(store, MD, [MD])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker()
    before = time.time()
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    assert error_of(reply) is None
    planned = reply.body[0] / 1e6
    assert before + 0.2 <= planned <= time.time() + 0.4  # settle_seconds = 0.3
    assert await get_property(client, "Pending") is True
    (finished,) = await rec.wait_for("RestartFinished")
    ok, detail, mds = finished.body
    assert ok is True, detail
    assert mds == [MD]
    assert len(broker.calls("graceful")) == 1 and len(broker.calls("configtest")) == 1
    assert await get_property(client, "LastResult") == "ok"
    last = await get_property(client, "LastRestart")
    assert before <= last / 1e6 <= time.time()
    assert await get_property(client, "Pending") is False
    assert await get_property(client, "PlannedAt") == 0
    active = storefactory.read_active_fingerprint(store, MD)
    assert active == staged.fingerprint
    # PropertiesChanged announced the pending restart and its end.
    changes = [m.body[1] for m in rec.of("PropertiesChanged")]
    assert any(c.get("Pending") and c["Pending"].value is True for c in changes)
    assert any(c.get("LastResult") and c["LastResult"].value == "ok" for c in changes)


async def test_check_authorization_is_asked_correctly(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD])
    await start_broker()
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    assert error_of(reply) is None
    calls = await allow.calls(client, "CheckAuthorization")
    assert len(calls) == 1
    subject, action, details, flags, cancel_id = calls[0]
    kind, subject_details = subject
    assert kind == "system-bus-name"
    assert subject_details == {"name": client.unique_name}
    assert action == names.POLKIT_ACTION
    assert flags == 0  # no interaction: the message did not allow it


async def test_calls_waiting_for_the_same_polkit_answer_share_it(start_broker, client, allow, store):
    # A burst from one connection: each call asking polkit on its own put 64 round trips
    # through the bus daemon behind the burst itself.
    storefactory.add_staged(store, MD, [MD])
    await start_broker()
    await allow.control(client, "SimulateHang", "b", [True])
    requests = [asyncio.ensure_future(call(client, "RequestGracefulRestart", "s", [MD]))
                for _ in range(10)]
    # The broker reads a connection's messages in order: once this is answered, it has taken
    # all ten calls above, and they all wait for polkit.
    assert await get_property(client, "Version")
    asking = await allow.calls(client, "CheckAuthorization")
    while not asking:
        asking = await allow.calls(client, "CheckAuthorization")
    assert await get_property(client, "Version")
    assert len(await allow.calls(client, "CheckAuthorization")) == 1
    await allow.control(client, "ReleaseHangingCalls")
    replies = await asyncio.gather(*requests)
    assert [error_of(r) for r in replies] == [None] * 10
    # Answers are not kept: the next call asks polkit again.
    await allow.control(client, "SimulateHang", "b", [False])
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    assert len(await allow.calls(client, "CheckAuthorization")) == 2


async def test_denied_caller_changes_nothing(start_broker, client, polkit, store, tmp_path):
    storefactory.add_staged(store, MD, [MD])
    broker = await start_broker(rate_burst=1, rate_per_second=0)
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    assert error_of(reply)[0] == names.ERROR_ACCESS_DENIED
    assert await get_property(client, "Pending") is False
    assert not (tmp_path / "state" / "state.json").exists() or not json.loads(
        (tmp_path / "state" / "state.json").read_text())["scheduler"]["pending"]
    # The refusal used no rate-limit token: the one token is still there once polkit allows.
    await polkit.control(client, "SetAllowed", "as", [[names.POLKIT_ACTION]])
    rec = await busutil.SignalRecorder(client).start()
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    assert error_of(reply) is None
    await rec.wait_for("RestartFinished")
    assert len(broker.calls("graceful")) == 1


@pytest.mark.parametrize("mode", ["hang", "absent"])
async def test_polkit_hanging_or_absent_denies(start_broker, client, allow, mode, store):
    storefactory.add_staged(store, MD, [MD])
    if mode == "hang":
        await allow.control(client, "SimulateHang", "b", [True])
    else:
        busutil.stop(allow.proc)
    await start_broker(polkit_timeout_seconds=1)
    t0 = time.monotonic()
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    assert error_of(reply)[0] == names.ERROR_ACCESS_DENIED
    assert time.monotonic() - t0 < 5
    assert await get_property(client, "Pending") is False


@pytest.mark.parametrize("setup,name,expected,check", [
    ("none", "Www.Example.Test", names.ERROR_INVALID_NAME, None),
    ("none", "a..b", names.ERROR_INVALID_NAME, None),
    ("none", "../etc", names.ERROR_INVALID_NAME, None),
    ("none", MD, names.ERROR_NOTHING_STAGED, None),
    ("expired", MD, names.ERROR_STAGING_INVALID, "expired"),
    ("wrong-names", MD, names.ERROR_STAGING_INVALID, "names"),
    ("symlink", MD, names.ERROR_STAGING_INVALID, None),
])
async def test_refusals_have_contract_error_names(start_broker, client, allow, store, setup, name,
                                                  expected, check, tmp_path):
    if setup == "expired":
        storefactory.add_staged(store, MD, [MD], not_after=time.time() - 3600,
                                not_before=time.time() - 86400)
    elif setup == "wrong-names":
        storefactory.add_staged(store, MD, [MD], cert_names=["other.example.test"])
    elif setup == "symlink":
        outside = tmp_path / "outside"
        outside.mkdir()
        storefactory.add_staged(store, MD, [MD])
        pub = store / "staging" / MD / "pubcert.pem"
        (outside / "pubcert.pem").write_bytes(pub.read_bytes())
        pub.unlink()
        pub.symlink_to(outside / "pubcert.pem")
    broker = await start_broker()
    reply = await call(client, "RequestGracefulRestart", "s", [name])
    err = error_of(reply)
    assert err is not None and err[0] == expected, err
    if check:
        assert err[1].startswith(check), err
    assert str(tmp_path) not in err[1] and "Traceback" not in err[1]
    # Nothing pending means nothing can run later either.
    assert await get_property(client, "Pending") is False
    assert broker.calls() == []


async def test_wrong_signature_is_invalid_arguments(start_broker, client, allow):
    await start_broker()
    reply = await call(client, "RequestGracefulRestart", "u", [5])
    assert error_of(reply)[0] == names.ERROR_INVALID_ARGS


async def test_rate_limited_after_burst(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD])
    await start_broker(rate_burst=3, rate_per_second=0, settle_seconds=30)
    results = [error_of(await call(client, "RequestGracefulRestart", "s", [MD])) for _ in range(5)]
    assert results[:3] == [None, None, None]
    assert [r[0] for r in results[3:]] == [names.ERROR_RATE_LIMITED] * 2


async def test_fifty_requests_in_window_make_one_restart(start_broker, client, allow, store):
    mds = [f"site{i}.example.test" for i in range(10)]
    for md in mds:
        storefactory.add_staged(store, md, [md])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker(settle_seconds=2)
    replies = await asyncio.gather(*[call(client, "RequestGracefulRestart", "s", [mds[i % 10]])
                                     for i in range(50)])
    assert [error_of(r) for r in replies] == [None] * 50
    # Every request joined the same window: one planned time for all.
    assert len({r.body[0] for r in replies}) == 1
    (finished,) = await rec.wait_for("RestartFinished")
    assert finished.body[0] is True, finished.body[1]
    assert sorted(finished.body[2]) == sorted(mds)
    assert await get_property(client, "Pending") is False  # so no second restart can follow
    assert len(broker.calls("graceful")) == 1
    assert len(rec.of("RestartFinished")) == 1


async def test_window_ends_early_when_mod_md_notified(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD], job={"finished": True, "notified-renewed": False})
    rec = await busutil.SignalRecorder(client).start()
    await start_broker(settle_seconds=30)
    t0 = time.monotonic()
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    assert error_of(reply) is None
    await asyncio.sleep(0.5)
    assert rec.of("RestartFinished") == []
    storefactory.write_job(store, MD, {"finished": True, "notified-renewed": True})
    await rec.wait_for("RestartFinished", timeout=5)
    assert time.monotonic() - t0 < 5
    # The earlier time was announced before the restart ran.
    planned = [m.body[1]["PlannedAt"].value for m in rec.of("PropertiesChanged") if "PlannedAt" in m.body[1]]
    assert any(0 < p < reply.body[0] for p in planned), planned


async def test_request_too_soon_is_deferred_not_dropped(start_broker, client, allow, store):
    storefactory.add_staged(store, "a.example.test", ["a.example.test"])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker(settle_seconds=0.1, min_interval_seconds=3)
    assert error_of(await call(client, "RequestGracefulRestart", "s", ["a.example.test"])) is None
    await rec.wait_for("RestartFinished")
    first = await get_property(client, "LastRestart")
    storefactory.add_staged(store, "b.example.test", ["b.example.test"])
    reply = await call(client, "RequestGracefulRestart", "s", ["b.example.test"])
    assert error_of(reply) is None
    assert reply.body[0] >= first + 3_000_000 - 1000
    assert await get_property(client, "PlannedAt") == reply.body[0]
    finished = await rec.wait_for("RestartFinished", count=2, timeout=10)
    assert finished[1].body[0] is True and finished[1].body[2] == ["b.example.test"]
    second = await get_property(client, "LastRestart")
    assert second - first >= 3_000_000 - 1000
    assert len(broker.calls("graceful")) == 2


async def test_failed_config_test_means_no_restart(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker()
    (broker.control / "configtest-fails").write_text("")
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    (finished,) = await rec.wait_for("RestartFinished")
    ok, detail, mds = finished.body
    assert ok is False and "config test failed" in detail and "AH00526" in detail
    assert broker.calls("graceful") == []
    assert (await get_property(client, "LastResult")).startswith("failed: config test failed")
    assert await get_property(client, "LastRestart") == 0
    # Fixed config: the next request activates the same set.
    (broker.control / "configtest-fails").unlink()
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    finished = await rec.wait_for("RestartFinished", count=2)
    assert finished[1].body[0] is True


async def test_verification_failure_reported_and_not_retried(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker(verify_timeout_seconds=1)
    (broker.control / "no-activate").write_text("")
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    (finished,) = await rec.wait_for("RestartFinished")
    ok, detail, mds = finished.body
    assert ok is False and MD in detail and "staged" in detail
    assert (await get_property(client, "LastResult")).startswith("failed: ")
    # The daily check does not restart again for the set that failed.
    reply = await call(client, "CheckAll")
    assert error_of(reply) is None
    assert reply.body[0] == []
    assert await get_property(client, "Pending") is False  # so no second restart can follow
    assert len(broker.calls("graceful")) == 1


async def test_check_all_schedules_every_valid_staged_set(start_broker, client, allow, store):
    storefactory.add_staged(store, "a.example.test", ["a.example.test"])
    storefactory.add_staged(store, "b.example.test", ["b.example.test"], not_after=time.time() - 10,
                            not_before=time.time() - 86400)
    storefactory.add_active(store, "c.example.test", ["c.example.test"])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker()
    reply = await call(client, "CheckAll")
    assert error_of(reply) is None
    assert reply.body[0] == ["a.example.test"]
    (finished,) = await rec.wait_for("RestartFinished")
    assert finished.body[0] is True and finished.body[2] == ["a.example.test"]
    assert len(broker.calls("graceful")) == 1


async def test_get_status_reports_every_md(start_broker, client, allow, store):
    active = storefactory.add_active(store, "a.example.test", ["a.example.test"])
    staged = storefactory.add_staged(store, "a.example.test", ["a.example.test"])
    storefactory.add_staged(store, "b.example.test", ["b.example.test"], cert_names=["x.example.test"])
    await start_broker(settle_seconds=30)
    assert error_of(await call(client, "RequestGracefulRestart", "s", ["a.example.test"])) is None
    reply = await call(client, "GetStatus")
    assert error_of(reply) is None
    status = json.loads(reply.body[0])
    assert status["pending"] is True and status["planned_at_usec"] > 0
    by_name = {m["name"]: m for m in status["mds"]}
    assert set(by_name) == {"a.example.test", "b.example.test"}
    a = by_name["a.example.test"]
    assert a["active"]["fingerprint"] == active.fingerprint
    assert a["staged"]["valid"] is True and a["staged"]["fingerprint"] == staged.fingerprint
    assert a["pending"] is True
    b = by_name["b.example.test"]
    assert b["active"] is None and b["staged"]["valid"] is False
    assert b["staged"]["problem"].startswith("names")


async def test_systemd_mode_reloads_the_unit(start_broker, client, allow, store, bus_address):
    storefactory.add_staged(store, MD, [MD])
    systemd = await start_systemd_mock(bus_address, {"store": str(store), "unit": "apache2.service"})
    try:
        rec = await busutil.SignalRecorder(client).start()
        broker = await start_broker(restart_via="systemd")
        assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
        (finished,) = await rec.wait_for("RestartFinished")
        assert finished.body[0] is True, finished.body[1]
        calls = await systemd.calls(client, "ReloadUnit")
        assert calls == [["apache2.service", "replace"]]
        assert broker.calls("graceful") == []  # systemd did it, not the command
        assert len(broker.calls("configtest")) == 1
    finally:
        busutil.stop(systemd.proc)


async def test_systemd_mode_reports_stopped_apache(start_broker, client, allow, store, bus_address):
    storefactory.add_staged(store, MD, [MD])
    systemd = await start_systemd_mock(bus_address, {"store": str(store), "active_state": "inactive"})
    try:
        rec = await busutil.SignalRecorder(client).start()
        await start_broker(restart_via="systemd")
        assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
        (finished,) = await rec.wait_for("RestartFinished")
        assert finished.body[0] is False and "not running" in finished.body[1]
        assert await systemd.calls(client, "ReloadUnit") == []
    finally:
        busutil.stop(systemd.proc)


async def test_stopped_apache_is_reported_not_started(start_broker, client, allow, store, tmp_path):
    storefactory.add_staged(store, MD, [MD])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker(pid_file=str(tmp_path / "no-such.pid"))
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    (finished,) = await rec.wait_for("RestartFinished")
    assert finished.body[0] is False and "not running" in finished.body[1]
    assert broker.calls() == []


async def test_pending_restart_survives_broker_restart(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD])
    broker = await start_broker(settle_seconds=3)
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    busutil.stop(broker.proc)
    assert broker.calls() == []
    rec = await busutil.SignalRecorder(client).start()
    again = await start_broker(settle_seconds=3)
    assert await get_property(client, "Pending") is True
    (finished,) = await rec.wait_for("RestartFinished", timeout=10)
    assert finished.body[0] is True and finished.body[2] == [MD]
    assert len(again.calls("graceful")) == 1


async def test_corrupt_state_file_is_replaced(start_broker, client, allow, store, tmp_path):
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "state.json").write_text("{not json")
    storefactory.add_staged(store, MD, [MD])
    broker = await start_broker()
    rec = await busutil.SignalRecorder(client).start()
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    await rec.wait_for("RestartFinished")
    assert "corrupt" in broker.log().lower()
    assert json.loads((tmp_path / "state" / "state.json").read_text())["last_result"] == "ok"


async def test_flood_of_2000_calls_leaves_broker_serving(start_broker, bus_address, client, allow, store):
    from broker import dbuslib
    storefactory.add_staged(store, MD, [MD])
    broker = await start_broker(settle_seconds=30)
    clients = [await dbuslib.connect(bus_address) for _ in range(4)]
    for c in clients:
        # The flooding side needs the same EAGAIN fix, or it drops its own connections.
        dbuslib.harden_writer(c)
    try:
        # Raw sends without awaiting replies one by one: the broker gets them as one burst.
        replies = await asyncio.gather(*[
            call(clients[i % 4], "RequestGracefulRestart", "s", [MD], timeout=50) for i in range(2000)],
            return_exceptions=True)
    finally:
        for c in clients:
            c.disconnect()
    errors = [error_of(r)[0] if not isinstance(r, BaseException) and error_of(r) else
              (type(r).__name__ if isinstance(r, BaseException) else None) for r in replies]
    assert set(errors) <= {None, names.ERROR_RATE_LIMITED}, set(errors)
    assert errors.count(None) >= 1
    assert broker.proc.poll() is None
    assert await busutil.name_has_owner(client, names.BUS_NAME)
    assert await get_property(client, "Pending") is True


async def test_losing_the_bus_ends_the_process_nonzero(start_broker, client, bus_daemon):
    broker = await start_broker()
    busutil.stop(bus_daemon[0], sig=9)
    assert broker.proc.wait(10) == 1
    assert "lost the bus connection" in broker.log()


async def test_systemd_mode_broken_config_reloads_nothing(start_broker, client, allow, store, bus_address):
    storefactory.add_staged(store, MD, [MD])
    systemd = await start_systemd_mock(bus_address, {"store": str(store)})
    try:
        rec = await busutil.SignalRecorder(client).start()
        broker = await start_broker(restart_via="systemd", wait=False)
        (broker.control / "configtest-fails").write_text("")
        await busutil.wait_for_name(client, names.BUS_NAME, proc=broker.proc)
        assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
        (finished,) = await rec.wait_for("RestartFinished")
        assert finished.body[0] is False and "config test failed" in finished.body[1]
        assert await systemd.calls(client, "ReloadUnit") == []
        assert await get_property(client, "LastRestart") == 0
    finally:
        busutil.stop(systemd.proc)


async def test_idle_broker_exits_and_busy_one_stays(start_broker, client, allow, store):
    idle = await start_broker(idle_exit_seconds=1)
    assert idle.proc.wait(10) == 0
    assert "idle" in idle.log()
    storefactory.add_staged(store, MD, [MD])
    rec = await busutil.SignalRecorder(client).start()
    busy = await start_broker(idle_exit_seconds=1, settle_seconds=2.5)
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    await asyncio.sleep(1.8)
    assert busy.proc.poll() is None  # a restart is pending: it must not leave
    await rec.wait_for("RestartFinished")
    assert busy.proc.wait(10) == 0


async def test_held_back_restart_is_retried_without_a_new_request(start_broker, client, allow, store):
    storefactory.add_staged(store, MD, [MD])
    rec = await busutil.SignalRecorder(client).start()
    broker = await start_broker()  # min_interval_seconds = 0: the first retry comes a second later
    (broker.control / "configtest-fails").write_text("")
    assert error_of(await call(client, "RequestGracefulRestart", "s", [MD])) is None
    (finished,) = await rec.wait_for("RestartFinished")
    assert finished.body[0] is False
    assert await get_property(client, "Pending") is True  # held back, not dropped
    (broker.control / "configtest-fails").unlink()
    finished = await rec.wait_for("RestartFinished", count=2)
    assert finished[1].body[0] is True and finished[1].body[2] == [MD]
    assert len(broker.calls("graceful")) == 1
    assert await get_property(client, "Pending") is False
    assert "held back (config test failed" in broker.log()


async def test_dry_run_is_authorized_like_a_request_and_schedules_nothing(start_broker, client, polkit, store):
    storefactory.add_staged(store, MD, [MD])
    broker = await start_broker(settle_seconds=30)
    reply = await call(client, "DryRunRequest", "s", [MD])
    assert error_of(reply)[0] == names.ERROR_ACCESS_DENIED  # polkit (mock) has not allowed it
    await polkit.control(client, "SetAllowed", "as", [[names.POLKIT_ACTION]])
    before = time.time()
    reply = await call(client, "DryRunRequest", "s", [MD])
    assert error_of(reply) is None
    assert before + 29 <= reply.body[0] / 1e6 <= time.time() + 31
    assert await get_property(client, "Pending") is False and await get_property(client, "PlannedAt") == 0
    for name, error in (("../x", names.ERROR_INVALID_NAME), ("none.example.test", names.ERROR_NOTHING_STAGED)):
        assert error_of(await call(client, "DryRunRequest", "s", [name]))[0] == error
    # polkit was asked, with the action of a request
    asked = await polkit.calls(client, "CheckAuthorization")
    assert len(asked) == 4 and all(args[1] == names.POLKIT_ACTION for args in asked)
    assert broker.calls("configtest") == [] and broker.calls("graceful") == []


async def test_self_test_reports_steps_and_refuses_bad_names(start_broker, client, store):
    storefactory.add_active(store, MD, [MD])
    broker = await start_broker()
    reply = await call(client, "SelfTest", "s", [MD])
    assert error_of(reply) is None
    steps = json.loads(reply.body[0])["steps"]
    assert [(s["step"], s["ok"]) for s in steps] == [
        ("store", True), (f"managed {MD}", True), (f"staged {MD}", True), ("apache running", True),
        ("config test", True), ("probe", True)]
    assert all(set(s) == {"step", "ok", "detail", "fix"} for s in steps)
    assert len(broker.calls("configtest")) == 1 and broker.calls("graceful") == []
    assert error_of(await call(client, "SelfTest", "s", ["../etc"]))[0] == names.ERROR_INVALID_NAME
    assert error_of(await call(client, "SelfTest", "i", [1]))[0] == names.ERROR_INVALID_ARGS
