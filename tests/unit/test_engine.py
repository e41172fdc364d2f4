"""The core's whole flow without D-Bus: request, settle, restart, verify, remember."""

import asyncio
import json

import pytest

from broker.config import from_mapping
from broker.engine import JOB_POLL_FIRST_SECONDS, JOB_POLL_SECONDS, Engine, job_poll_seconds
from broker.errors import AlreadyFailed, NothingStaged, RateLimited, StagingInvalid
from broker.restart import RestartOutcome
from broker.staging import Store
from broker.state import StateFile
from harness import busutil, storefactory

MD = "www.example.test"


class FakeApache:
    """A restarter that does what mod_md does on a graceful restart, or fails as told."""

    def __init__(self, store, activate=True, configtest_ok=True):
        self.store, self.activate, self.configtest_ok = store, activate, configtest_ok
        self.restarts = 0

    async def restart(self):
        if not self.configtest_ok:
            return RestartOutcome(False, False, "config test failed: AH00526: Syntax error")
        self.restarts += 1
        if self.activate:
            for md in sorted(p.name for p in (self.store / "staging").iterdir()):
                storefactory.activate(self.store, md)
        return RestartOutcome(True, True, "graceful restart issued")


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def make_engine(tmp_path, store, apache, clock, **cfg):
    config = from_mapping({"md_store": str(store), "state_dir": str(tmp_path / "state"),
                           "settle_seconds": 10, "min_interval_seconds": 60,
                           "verify_timeout_seconds": 0, **cfg})
    finished = []
    # The store keeps the real clock: the files' mtimes it compares with are real.
    engine = Engine(config, Store(str(store), anchors=storefactory.anchors()), apache,
                    StateFile(str(tmp_path / "state")), clock=clock)
    engine.on_restart_finished = lambda ok, detail, names: finished.append((ok, detail, names))
    return engine, finished


@pytest.fixture
def store(tmp_path):
    return storefactory.make_store(tmp_path)


async def test_request_plans_after_settle_and_restart_activates(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    clock = Clock()
    apache = FakeApache(store)
    engine, finished = make_engine(tmp_path, store, apache, clock)
    planned = await engine.request(MD, caller_uid=33)
    assert planned == int((clock.t + 10) * 1_000_000)
    assert engine.pending and engine.planned_at_usec == planned
    await engine.restart_now()
    assert apache.restarts == 1
    assert finished == [(True, "1 MD active", [MD])]
    assert engine.last_result == "ok" and engine.last_restart_usec == int(clock.t * 1_000_000)
    assert not engine.pending


async def test_failed_set_is_not_restarted_again_unless_root(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    apache = FakeApache(store, activate=False)
    engine, finished = make_engine(tmp_path, store, apache, Clock())
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert finished[0][0] is False and "still staged" in finished[0][1]
    with pytest.raises(AlreadyFailed):
        await engine.request(MD, caller_uid=33)
    assert await engine.check_all() == ([], 0)
    await engine.request(MD, caller_uid=0)  # root overrides
    assert engine.pending


async def test_config_test_failure_restarts_nothing_and_is_reported(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    apache = FakeApache(store, configtest_ok=False)
    engine, finished = make_engine(tmp_path, store, apache, Clock())
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert finished == [(False, "config test failed: AH00526: Syntax error", [MD])]
    assert engine.last_restart_usec == 0
    assert engine.last_result.startswith("failed: config test failed")
    # Not a failed activation: the same set may be requested again.
    apache.configtest_ok = True
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert finished[-1][0] is True


async def test_failed_config_test_is_retried_on_its_own_and_survives_a_new_engine(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    clock = Clock()
    apache = FakeApache(store, configtest_ok=False)
    engine, finished = make_engine(tmp_path, store, apache, clock)
    await engine.request(MD, caller_uid=33)
    clock.t += 10
    await engine.restart_now()
    failed_at = clock.t
    # Held back, not dropped: pending again, due min_interval (60 s) later, and status says why.
    assert engine.pending
    assert engine.planned_at_usec == int((failed_at + 60) * 1_000_000)
    status = await engine.status()
    assert status["waiting_for"] == "retry"
    assert status["retry"] == {"attempts": 1, "at_usec": int((failed_at + 60) * 1_000_000),
                               "reason": "config test failed: AH00526: Syntax error"}
    assert status["last_result_usec"] == int(failed_at * 1_000_000) and status["last_restart_usec"] == 0
    (entry,) = status["mds"]
    assert entry["pending"] is True and entry["staged"]["valid"] is True

    # The broker restarts: the retry and the result's own time come back from the state file.
    again, finished = make_engine(tmp_path, store, apache, clock)
    again_status = await again.status()
    assert again_status["retry"] == status["retry"]
    assert again_status["last_result_usec"] == status["last_result_usec"]
    apache.configtest_ok = True
    runner = asyncio.ensure_future(again.run())
    try:
        await asyncio.sleep(0.3)
        assert apache.restarts == 0  # not before the retry is due
        clock.t = failed_at + 60
        again._wakeup.set()
        await busutil.wait_until(lambda: finished, 10)
    finally:
        runner.cancel()
    assert finished == [(True, "1 MD active", [MD])]
    assert apache.restarts == 1 and not again.pending and (await again.status())["retry"] is None


async def test_a_held_back_restart_backs_off(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    clock = Clock()
    engine, _ = make_engine(tmp_path, store, FakeApache(store, configtest_ok=False), clock)
    await engine.request(MD, caller_uid=33)
    delays = []
    for _ in range(3):
        await engine.restart_now()
        delays.append(engine.planned_at_usec / 1e6 - clock.t)
        clock.t = engine.planned_at_usec / 1e6
    assert delays == [60, 120, 240]
    await engine.request(MD, caller_uid=0)  # root: retry now
    assert (await engine.status())["retry"] is None


async def test_pending_work_survives_a_new_engine(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    clock = Clock()
    engine, _ = make_engine(tmp_path, store, FakeApache(store), clock)
    planned = await engine.request(MD, caller_uid=33)
    again, finished = make_engine(tmp_path, store, FakeApache(store), clock)
    assert again.pending and again.planned_at_usec == planned
    await again.restart_now()
    assert finished[0][0] is True


async def test_batch_interrupted_mid_restart_is_resumed(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    clock = Clock()

    entered = asyncio.Event()

    class Hanging(FakeApache):
        async def restart(self):
            entered.set()
            await asyncio.Event().wait()

    engine, _ = make_engine(tmp_path, store, Hanging(store), clock)
    await engine.request(MD, caller_uid=33)
    task = asyncio.ensure_future(engine.restart_now())
    await asyncio.wait_for(entered.wait(), 10)  # the restart is under way
    task.cancel()  # the broker died while Apache was restarting
    again, finished = make_engine(tmp_path, store, FakeApache(store), clock)
    assert again.pending
    await again.restart_now()
    assert finished[0][0] is True and finished[0][2] == [MD]


async def test_set_activated_meanwhile_needs_no_restart(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])
    apache = FakeApache(store)
    engine, finished = make_engine(tmp_path, store, apache, Clock())
    await engine.request(MD, caller_uid=33)
    storefactory.activate(store, MD)  # someone else restarted Apache
    await engine.restart_now()
    assert apache.restarts == 0 and finished == []
    assert not engine.pending


async def test_refusals_change_nothing(tmp_path, store):
    storefactory.add_staged(store, MD, [MD], cert_names=["other.example.test"])
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock(), rate_burst=2, rate_per_second=0)
    with pytest.raises(StagingInvalid):
        await engine.request(MD, caller_uid=33)
    with pytest.raises(NothingStaged):
        await engine.request("nothing.example.test", caller_uid=33)
    assert not engine.pending
    with pytest.raises(RateLimited):
        await engine.request(MD, caller_uid=33)
    # Buckets are per user: root still has its own.
    with pytest.raises(StagingInvalid):
        await engine.request(MD, caller_uid=0)


def add_due_md(store, md="due.example.test"):
    """A managed MD with no certificate yet: mod_md is due to renew it, so its `renewed` may
    join the window."""
    (store / "domains" / md).mkdir(parents=True)
    (store / "domains" / md / "md.json").write_text(json.dumps(storefactory.md_json(md)))


async def test_run_loop_restarts_early_when_mod_md_notified(tmp_path, store):
    storefactory.add_staged(store, MD, [MD], job={"notified-renewed": False})
    add_due_md(store)
    clock = Clock()
    apache = FakeApache(store)
    engine, finished = make_engine(tmp_path, store, apache, clock, settle_seconds=3600)
    await engine.request(MD, caller_uid=33)
    runner = asyncio.ensure_future(engine.run())
    try:
        await asyncio.sleep(0.6)
        assert apache.restarts == 0
        storefactory.write_job(store, MD, {"notified-renewed": True})
        await asyncio.sleep(0.6)
        assert apache.restarts == 0  # notified, but not yet quiet for QUIET_SECONDS
        clock.t += 1.5
        await busutil.wait_until(lambda: finished, 10)
        assert apache.restarts == 1 and finished[0][0] is True

    finally:
        runner.cancel()


async def test_window_waits_while_mod_md_renews_another_md(tmp_path, store):
    storefactory.add_staged(store, MD, [MD], job={"notified-renewed": True})
    other = "next.example.test"
    storefactory.add_staged(store, other, [other], job={"finished": False})
    add_due_md(store)
    clock = Clock()
    apache = FakeApache(store)
    engine, finished = make_engine(tmp_path, store, apache, clock, settle_seconds=3600)
    await engine.request(MD, caller_uid=33)
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec == int((clock.t + 3600) * 1_000_000)
    clock.t += 5
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec == int((clock.t - 5 + 3600) * 1_000_000)  # still renewing next
    storefactory.write_job(store, other, {"finished": True, "notified-renewed": True})
    await engine.request(other, caller_uid=33)
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec > int(clock.t * 1_000_000)  # both notified: quiet time starts
    clock.t += 1.5
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec <= int(clock.t * 1_000_000)
    await engine.restart_now()
    assert apache.restarts == 1 and sorted(finished[0][2]) == [other, MD]


async def test_window_waits_for_the_next_md_before_its_job_json(tmp_path, store):
    # mod_md creates the next MD's staging directory at once, but may write its job.json only
    # when that renewal has finished.
    storefactory.add_staged(store, MD, [MD], job={"notified-renewed": True})
    nxt = store / "staging" / "next.example.test"
    nxt.mkdir()
    (nxt / "md.json").write_text("{}")
    add_due_md(store)
    clock = Clock()
    engine, _ = make_engine(tmp_path, store, FakeApache(store), clock, settle_seconds=3600)
    await engine.request(MD, caller_uid=33)
    clock.t += 5
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec == int((clock.t - 5 + 3600) * 1_000_000)
    (nxt / "md.json").unlink()
    nxt.rmdir()  # that renewal gave up: nothing else is under way
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec > int(clock.t * 1_000_000)  # the quiet second starts now
    clock.t += 1.5
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec <= int(clock.t * 1_000_000)


async def test_no_quiet_wait_when_no_other_md_is_due(tmp_path, store):
    # Another managed MD, far from its renewal window: nothing will join this restart.
    storefactory.add_active(store, "fresh.example.test", ["fresh.example.test"])
    storefactory.add_staged(store, MD, [MD], job={"notified-renewed": True})
    clock = Clock()
    engine, _ = make_engine(tmp_path, store, FakeApache(store), clock, settle_seconds=3600)
    await engine.request(MD, caller_uid=33)
    await engine.poll_mod_md()  # what the run loop does every JOB_POLL_SECONDS
    assert engine.planned_at_usec <= int(clock.t * 1_000_000)  # due at once, no quiet second
    # The same with an MD that is due: the quiet second is kept.
    add_due_md(store)
    engine2, _ = make_engine(tmp_path / "2", store, FakeApache(store), clock, settle_seconds=3600)
    await engine2.request(MD, caller_uid=33)
    await engine2.poll_mod_md()
    assert engine2.planned_at_usec > int(clock.t * 1_000_000)
    clock.t += 1.5
    await engine2.poll_mod_md()
    assert engine2.planned_at_usec <= int(clock.t * 1_000_000)


async def _until(condition, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


async def test_job_json_is_looked_at_often_right_after_a_request(tmp_path, store, monkeypatch):
    # mod_md writes "notified-renewed" milliseconds after the hook's answer; a fixed
    # quarter-second poll made every renewal wait 0.125 s on average for it to be seen.
    storefactory.add_staged(store, MD, [MD], job={"notified-renewed": False})
    clock = Clock()
    apache = FakeApache(store)
    engine, finished = make_engine(tmp_path, store, apache, clock, settle_seconds=3600)
    waits: list[float] = []
    real_wait_for = asyncio.wait_for

    async def recording_wait_for(awaitable, timeout):
        waits.append(timeout)
        return await real_wait_for(awaitable, timeout)

    monkeypatch.setattr(asyncio, "wait_for", recording_wait_for)
    await engine.request(MD, caller_uid=33)
    runner = asyncio.ensure_future(engine.run())
    try:
        await _until(lambda: len(waits) >= 3)
        assert waits[:3] == [JOB_POLL_FIRST_SECONDS] * 3, waits
        # A window that lasts is not polled busily: the interval grows back to the slow one.
        clock.t += 2
        seen = len(waits)
        await _until(lambda: len(waits) > seen + 1)
        assert waits[-1] == JOB_POLL_SECONDS, waits
        storefactory.write_job(store, MD, {"notified-renewed": True})
        await _until(lambda: finished)
    finally:
        runner.cancel()
    assert apache.restarts == 1 and finished[0][0] is True


def test_job_poll_interval_grows_with_the_time_since_the_request():
    assert job_poll_seconds(0.0) == JOB_POLL_FIRST_SECONDS
    assert JOB_POLL_FIRST_SECONDS < job_poll_seconds(0.2) < JOB_POLL_SECONDS
    assert job_poll_seconds(5.0) == JOB_POLL_SECONDS
    assert job_poll_seconds(float("inf")) == JOB_POLL_SECONDS  # no request yet (pending work restored)
    assert job_poll_seconds(-30.0) == JOB_POLL_SECONDS  # the wall clock stepped back


async def test_requests_arriving_during_a_staging_check_share_it(tmp_path, store, monkeypatch):
    # A burst's calls come back from polkit together: each checking on its own re-read and
    # re-parsed the same staged files while the rest of the burst waited.
    storefactory.add_staged(store, MD, [MD])
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    checks = []
    real_check = engine.store.check_staged
    monkeypatch.setattr(engine.store, "check_staged", lambda md: (checks.append(md), real_check(md))[1])
    planned = await asyncio.gather(*(engine.request(MD, caller_uid=33) for _ in range(5)))
    assert len(checks) == 1 and len(set(planned)) == 1
    assert engine.scheduler.pending[MD].fingerprint == storefactory.read_staged_fingerprint(store, MD)
    # A request after that check checks again: it sees a set staged since.
    storefactory.add_staged(store, MD, [MD])
    await engine.request(MD, caller_uid=33)
    assert len(checks) == 2
    assert engine.scheduler.pending[MD].fingerprint == storefactory.read_staged_fingerprint(store, MD)


async def test_a_refusal_is_shared_by_the_requests_waiting_for_it_and_not_kept(tmp_path, store, monkeypatch):
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    checks = []
    real_check = engine.store.check_staged
    monkeypatch.setattr(engine.store, "check_staged", lambda md: (checks.append(md), real_check(md))[1])
    results = await asyncio.gather(*(engine.request(MD, caller_uid=33) for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, NothingStaged) for r in results), results
    assert len(checks) == 1 and not engine.pending
    storefactory.add_staged(store, MD, [MD])
    await engine.request(MD, caller_uid=33)
    assert len(checks) == 2 and engine.pending


async def test_an_invented_md_gets_no_restart(tmp_path, store):
    """An MD mod_md does not manage (no root-owned domains/<md>/md.json) with a complete staged
    set: once this meant a restart every min_interval; now nothing is scheduled."""
    storefactory.add_staged(store, "invented.example.org", managed=False)
    apache = FakeApache(store)
    engine, finished = make_engine(tmp_path, store, apache, Clock())
    with pytest.raises(StagingInvalid) as ei:
        await engine.request("invented.example.org", caller_uid=33)
    assert ei.value.check == "not-managed"
    assert await engine.check_all() == ([], 0)
    assert not engine.pending and apache.restarts == 0
