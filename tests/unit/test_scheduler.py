import json
import math

import pytest

from broker import errors
from broker.scheduler import (
    MAX_FAILED,
    MAX_PENDING,
    MAX_REASON_LEN,
    RETRY_CAP,
    WAIT_INTERVAL,
    WAIT_RETRY,
    WAIT_SETTLE,
    Pending,
    Retry,
    Scheduler,
)

T0 = 1_700_000_000.0
SETTLE = 30.0
MIN_INTERVAL = 300.0


def never(_md):
    return False


def always(_md):
    return True


@pytest.fixture
def s():
    return Scheduler(SETTLE, MIN_INTERVAL)


def test_empty_plans_nothing(s):
    assert s.planned_at(T0, never) is None
    assert s.take_batch() == {}
    assert s.window_opened_at is None


def test_first_request_opens_window(s):
    planned = s.add("a.example", "fp-a", T0)
    assert planned == T0 + SETTLE
    assert s.window_opened_at == T0
    assert s.pending == {"a.example": Pending("fp-a", T0)}
    assert s.planned_at(T0 + 1, never) == T0 + SETTLE


def test_coalescing_fifty_requests_one_batch(s):
    first = s.add("md0.example", "fp0", T0)
    for i in range(1, 50):
        now = T0 + i * (SETTLE / 60)  # all inside the window
        assert s.add(f"md{i}.example", f"fp{i}", now) == first
        assert s.planned_at(now, never) == first
    assert s.window_opened_at == T0
    batch = s.take_batch()
    assert batch == {f"md{i}.example": f"fp{i}" for i in range(50)}
    assert s.pending == {}
    assert s.window_opened_at is None
    assert s.planned_at(T0 + SETTLE, never) is None


def test_new_fingerprint_replaces_old(s):
    s.add("a", "old", T0)
    s.add("a", "new", T0 + 5)
    assert s.pending["a"] == Pending("new", T0 + 5)
    assert s.window_opened_at == T0
    assert s.take_batch() == {"a": "new"}


def test_same_fingerprint_keeps_first_request_time(s):
    s.add("a", "fp", T0)
    s.add("a", "fp", T0 + 5)
    assert s.pending["a"].requested_at == T0


def test_early_end_when_all_notified(s):
    s.add("a", "fa", T0)
    s.add("b", "fb", T0 + 1)
    assert s.planned_at(T0 + 2, always) == T0 + 2


def test_not_early_when_one_is_not_notified(s):
    s.add("a", "fa", T0)
    s.add("b", "fb", T0 + 1)
    asked = []

    def notified(md):
        asked.append(md)
        return md == "a"

    assert s.planned_at(T0 + 2, notified) == T0 + SETTLE
    assert "b" in asked


def test_notified_not_asked_once_window_is_over(s):
    s.add("a", "fa", T0)

    def notified(md):
        raise AssertionError("must not be asked")

    assert s.planned_at(T0 + SETTLE + 1, notified) == T0 + SETTLE


def test_deferral_after_recent_restart(s):
    s.record_restart(T0)
    assert s.last_restart_at == T0
    planned = s.add("a", "fa", T0 + 10)
    assert planned == T0 + MIN_INTERVAL
    # Even when mod_md has caught up, the interval holds; the request stays pending.
    assert s.planned_at(T0 + 20, always) == T0 + MIN_INTERVAL
    assert "a" in s.pending


def test_no_deferral_when_interval_passed(s):
    s.record_restart(T0)
    assert s.add("a", "fa", T0 + MIN_INTERVAL + 100) == T0 + MIN_INTERVAL + 100 + SETTLE


def test_add_returns_no_time_in_the_past(s):
    s.add("a", "fa", T0)
    # The loop has not run yet and the window is long over: the reply says "now".
    assert s.add("b", "fb", T0 + 100) == T0 + 100
    assert s.planned_at(T0 + 100, never) == T0 + SETTLE


def test_already_failed_and_override(s):
    s.add("a", "fa", T0)
    batch = s.take_batch()
    s.record_restart(T0 + SETTLE)
    s.record_outcome(batch, activated=set())
    assert s.failed == {"a": "fa"}

    with pytest.raises(errors.AlreadyFailed) as e:
        s.add("a", "fa", T0 + 1000)
    assert "already failed" in e.value.message
    assert "root" in e.value.message
    assert e.value.code == "AlreadyFailed"
    assert s.pending == {}

    # A different staged set is a new attempt.
    s.add("a", "fa2", T0 + 1000)
    assert s.pending["a"].fingerprint == "fa2"
    s.take_batch()

    assert s.add("a", "fa", T0 + 2000, override=True) >= T0 + 2000
    assert "a" not in s.failed
    assert s.pending["a"].fingerprint == "fa"


def test_record_outcome(s):
    s.failed = {"c": "old-c"}
    batch = {"a": "fa", "b": "fb", "c": "fc"}
    s.record_outcome(batch, activated={"a", "c"})
    assert s.failed == {"c": "old-c", "b": "fb"}
    # A later set of the same MD activating does not forgive the one that failed.
    s.record_outcome({"b": "fb2"}, activated={"b"})
    assert s.failed == {"c": "old-c", "b": "fb"}
    with pytest.raises(errors.AlreadyFailed):
        s.add("b", "fb", T0)


def test_failed_is_bounded(s):
    forgotten = []
    for i in range(MAX_FAILED + 10):
        forgotten += s.record_outcome({f"md{i}": "fp"}, activated=set())
    assert len(s.failed) == MAX_FAILED
    assert forgotten == [f"md{i}" for i in range(10)]  # the oldest, named for the log
    assert "md0" not in s.failed
    assert f"md{MAX_FAILED + 9}" in s.failed


def test_pending_is_bounded_and_the_request_beyond_it_refused(s):
    for i in range(MAX_PENDING):
        s.add(f"md{i}.example", "fp", T0)
    s.add("md0.example", "fp2", T0 + 1)  # an MD already pending may still change its set
    with pytest.raises(errors.RateLimited):
        s.add("one-more.example", "fp", T0 + 1)
    assert len(s.pending) == MAX_PENDING and "one-more.example" not in s.pending


def test_restore_stays_within_the_bound(s):
    for i in range(MAX_PENDING - 1):
        s.add(f"new{i}.example", "fp", T0)
    left_out = s.restore({"old0.example": "fo", "old1.example": "fo", "new0.example": "fo"}, T0)
    assert left_out == ["old1.example"]
    assert len(s.pending) == MAX_PENDING and s.pending["new0.example"].fingerprint == "fp"


def test_restore_keeps_newer_entries(s):
    s.add("a", "fa", T0)
    s.add("b", "fb", T0)
    batch = s.take_batch()
    s.add("b", "fb-new", T0 + 50)
    s.restore(batch, T0 + 51)
    assert s.pending["b"].fingerprint == "fb-new"
    assert s.pending["a"].fingerprint == "fa"
    # The newer request's window is kept.
    assert s.window_opened_at == T0 + 50


def test_restore_into_empty_plan_is_due_at_once(s):
    s.add("a", "fa", T0)
    batch = s.take_batch()
    s.restore(batch, T0 + SETTLE + 5)
    assert s.planned_at(T0 + SETTLE + 5, never) == T0 + SETTLE + 5
    assert s.take_batch() == {"a": "fa"}


def test_restore_respects_min_interval(s):
    s.record_restart(T0)
    s.restore({"a": "fa"}, T0 + 1)
    assert s.planned_at(T0 + 1, never) == T0 + MIN_INTERVAL


def test_restore_empty_batch_opens_no_window(s):
    s.restore({}, T0)
    assert s.window_opened_at is None
    assert s.planned_at(T0, never) is None


# Saved state holds set fingerprints: SHA-256 in lower-case hex.
FA, FB, FC, FD = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def test_round_trip(s):
    s.add("a.example", FA, T0)
    s.add("*.b.example", FB, T0 + 3)
    s.record_restart(T0 - 1000)
    s.record_outcome({"c": FC, "d": FD}, activated=set())
    d = s.to_dict()
    json.dumps(d, allow_nan=False)  # JSON-safe
    t = Scheduler.from_dict(json.loads(json.dumps(d)), SETTLE, MIN_INTERVAL)
    assert t.pending == s.pending
    assert t.window_opened_at == s.window_opened_at
    assert t.last_restart_at == s.last_restart_at
    assert t.failed == s.failed
    assert list(t.failed) == ["c", "d"]  # order matters for eviction
    assert t.to_dict() == d
    assert t.planned_at(T0 + 5, never) == s.planned_at(T0 + 5, never)


def test_round_trip_empty(s):
    t = Scheduler.from_dict(s.to_dict(), 1.0, 2.0)
    assert t.pending == {} and t.window_opened_at is None and t.last_restart_at == 0.0
    assert (t.settle, t.min_interval) == (1.0, 2.0)


def _valid():
    return {
        "version": 1,
        "pending": {"a": {"fingerprint": FA, "requested_at": T0}},
        "window_opened_at": T0,
        "last_restart_at": 0.0,
        "failed": {"b": FB},
    }


def _mutations():
    def m(fn):
        d = _valid()
        fn(d)
        return d

    return {
        "not a dict": [],
        "none": None,
        "missing key": m(lambda d: d.pop("failed")),
        "unknown key": m(lambda d: d.update(extra=1)),
        "version 2 without retry": m(lambda d: d.update(version=2)),
        "version 3": m(lambda d: d.update(version=3, retry=None)),
        "retry in version 1": m(lambda d: d.update(retry=None)),
        "version str": m(lambda d: d.update(version="1")),
        "version float": m(lambda d: d.update(version=1.0)),
        "version bool": m(lambda d: d.update(version=True)),
        "pending list": m(lambda d: d.update(pending=[])),
        "pending entry str": m(lambda d: d["pending"].update(a="fa")),
        "pending fp int": m(lambda d: d["pending"]["a"].update(fingerprint=1)),
        "pending fp empty": m(lambda d: d["pending"]["a"].update(fingerprint="")),
        "pending extra": m(lambda d: d["pending"]["a"].update(x=1)),
        "pending no time": m(lambda d: d["pending"]["a"].pop("requested_at")),
        "pending time str": m(lambda d: d["pending"]["a"].update(requested_at="1")),
        "pending time nan": m(lambda d: d["pending"]["a"].update(requested_at=math.nan)),
        "pending md empty": m(lambda d: d.update(pending={"": {"fingerprint": "f", "requested_at": 1}})),
        "window missing while pending": m(lambda d: d.update(window_opened_at=None)),
        "window without pending": m(lambda d: d.update(pending={})),
        "window bool": m(lambda d: d.update(window_opened_at=True)),
        "window inf": m(lambda d: d.update(window_opened_at=math.inf)),
        "last str": m(lambda d: d.update(last_restart_at="0")),
        "last none": m(lambda d: d.update(last_restart_at=None)),
        "last -inf": m(lambda d: d.update(last_restart_at=-math.inf)),
        "failed list": m(lambda d: d.update(failed=[])),
        "failed fp int": m(lambda d: d["failed"].update(b=3)),
        "failed fp empty": m(lambda d: d["failed"].update(b="")),
        "failed too many": m(lambda d: d.update(failed={f"m{i}": FB for i in range(MAX_FAILED + 1)})),
        "pending too many": m(lambda d: d.update(pending={
            f"m{i}": {"fingerprint": FA, "requested_at": T0} for i in range(MAX_PENDING + 1)})),
        "pending fp not hex": m(lambda d: d["pending"]["a"].update(fingerprint="fa")),
        "pending fp upper hex": m(lambda d: d["pending"]["a"].update(fingerprint="A" * 64)),
        "failed fp too short": m(lambda d: d["failed"].update(b="b" * 63)),
        "pending md nul": m(lambda d: d.update(pending={"a\0b": d["pending"]["a"]})),
        "pending md escape": m(lambda d: d.update(pending={"a\x1b[2J": d["pending"]["a"]})),
        "failed md <0>": m(lambda d: d.update(failed={"<0>x": FB})),
        "failed md upper": m(lambda d: d.update(failed={"A.example": FB})),
    }


def test_valid_fixture_is_accepted():
    s = Scheduler.from_dict(_valid(), SETTLE, MIN_INTERVAL)
    assert s.pending["a"].fingerprint == FA


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_from_dict_rejects_malformed(name):
    with pytest.raises(ValueError):
        Scheduler.from_dict(_mutations()[name], SETTLE, MIN_INTERVAL)


def _valid_v2():
    d = _valid()
    d.update(version=2, retry={"attempts": 2, "at": T0 + 600, "reason": "config test failed: AH00526"})
    return d


def test_valid_v2_fixture_is_accepted():
    s = Scheduler.from_dict(_valid_v2(), SETTLE, MIN_INTERVAL)
    assert s.retry == Retry(2, T0 + 600, "config test failed: AH00526")
    assert s.plan(T0, never) == (T0 + 600, WAIT_RETRY)


@pytest.mark.parametrize("change", [
    lambda r: r.pop("reason"),
    lambda r: r.update(extra=1),
    lambda r: r.update(attempts=0),
    lambda r: r.update(attempts=True),
    lambda r: r.update(attempts=1.0),
    lambda r: r.update(at=math.nan),
    lambda r: r.update(at="1"),
    lambda r: r.update(reason=5),
    lambda r: r.update(reason="x" * 10_000),
    lambda r: r.update(reason="config test failed\0<0>forged"),
    lambda r: r.update(reason="config test failed: \x1b[2J"),
    lambda r: r.update(reason="AH00526\nsecond line"),
], ids=["no reason", "extra", "zero attempts", "bool attempts", "float attempts", "nan at",
        "str at", "int reason", "long reason", "nul in reason", "escape in reason", "newline in reason"])
def test_from_dict_rejects_malformed_retry(change):
    d = _valid_v2()
    change(d["retry"])
    with pytest.raises(ValueError, match="retry"):
        Scheduler.from_dict(d, SETTLE, MIN_INTERVAL)


def test_from_dict_rejects_retry_with_nothing_pending():
    d = _valid_v2()
    d.update(pending={}, window_opened_at=None)
    with pytest.raises(ValueError, match="nothing pending"):
        Scheduler.from_dict(d, SETTLE, MIN_INTERVAL)


def test_held_back_restart_is_retried_with_backoff_up_to_the_cap(s):
    s.add("a", "fa", T0)
    t = T0 + SETTLE
    delays = []
    for _ in range(8):
        batch = s.take_batch()
        assert batch == {"a": "fa"}
        retry = s.hold(batch, t, "config test failed: AH00526: Syntax error")
        assert s.pending["a"].fingerprint == "fa"
        planned, why = s.plan(t, never)
        assert why == WAIT_RETRY and planned == retry.at
        delays.append(retry.at - t)
        t = retry.at
    assert delays == [300, 600, 1200, 2400, 3600, 3600, 3600, 3600]
    assert delays[-1] == RETRY_CAP
    assert s.retry.attempts == 8 and s.retry.reason.startswith("config test failed")


def test_retry_round_trips(s):
    s.add("a", FA, T0)
    s.hold(s.take_batch(), T0 + SETTLE, "apache is not running (no pid file)")
    t = Scheduler.from_dict(json.loads(json.dumps(s.to_dict())), SETTLE, MIN_INTERVAL)
    assert t.retry == s.retry and t.pending == s.pending
    assert t.plan(T0 + SETTLE, never) == s.plan(T0 + SETTLE, never)


def test_hold_keeps_the_reason_escaped_and_bounded_so_it_round_trips(s):
    # The reason holds the config test's output, which quotes whatever Apache read.
    s.add("a", FA, T0)
    retry = s.hold(s.take_batch(), T0 + SETTLE, "config test failed: \0<0>\x1b[2J" + "x" * 10_000)
    assert retry.reason.startswith("config test failed: \\x00<0>\\x1b[2J")
    assert len(retry.reason) <= MAX_REASON_LEN
    t = Scheduler.from_dict(json.loads(json.dumps(s.to_dict())), SETTLE, MIN_INTERVAL)
    assert t.retry == retry


def test_issued_restart_and_root_end_the_retry(s):
    s.add("a", "fa", T0)
    s.hold(s.take_batch(), T0 + SETTLE, "config test failed")
    s.add("a", "fb", T0 + 40)  # a new set from www-data still waits for the retry
    assert s.plan(T0 + 40, never)[1] == WAIT_RETRY
    s.add("a", "fb", T0 + 41, override=True)  # root: apache-restart request a
    assert s.retry is None
    planned, why = s.plan(T0 + 41, never)
    assert planned <= T0 + 41 and why == WAIT_SETTLE  # due: the restored window had ended
    s.hold(s.take_batch(), T0 + 42, "config test failed")
    s.take_batch()
    s.record_restart(T0 + 400)
    assert s.retry is None


def test_retry_delay_respects_a_long_min_interval():
    s = Scheduler(0, 86400)
    assert s.retry_delay(1) == 86400 and s.retry_delay(5) == 86400
    assert Scheduler(0, 0).retry_delay(1) == 1.0


def test_plan_says_what_the_restart_waits_for(s):
    s.add("a", "fa", T0)
    assert s.plan(T0, never) == (T0 + SETTLE, WAIT_SETTLE)
    s.take_batch()
    s.record_restart(T0 + SETTLE)
    s.add("a", "fb", T0 + 60)
    assert s.plan(T0 + 60, never) == (T0 + SETTLE + MIN_INTERVAL, WAIT_INTERVAL)


@pytest.mark.parametrize("settle,min_interval,exc", [
    (-1, 0, ValueError), (0, -1, ValueError), (math.nan, 0, ValueError), (0, math.inf, ValueError),
    ("1", 0, TypeError), (0, None, TypeError), (True, 0, TypeError),
])
def test_constructor_rejects_bad_durations(settle, min_interval, exc):
    with pytest.raises(exc):
        Scheduler(settle, min_interval)


def test_rejects_bad_arguments(s):
    with pytest.raises(ValueError):
        s.add("a", "fa", math.nan)
    with pytest.raises(ValueError):
        s.record_restart(math.inf)
    with pytest.raises(ValueError):
        s.add("", "fa", T0)
    with pytest.raises(TypeError):
        s.add("a", None, T0)
    assert s.pending == {}
    assert s.last_restart_at == 0.0


def test_clock_backwards_window(s):
    s.add("a", "fa", T0)
    back = T0 - 86400  # clock stepped back a day
    planned = s.planned_at(back, never)
    assert math.isfinite(planned)
    assert planned == back + SETTLE  # not T0 + SETTLE, a day away
    # And it stays put as the clock moves on, so it is reached.
    assert s.planned_at(back + 10, never) == back + SETTLE


def test_clock_backwards_last_restart(s):
    s.record_restart(T0)
    back = T0 - 86400
    planned = s.add("a", "fa", back)
    assert planned == back + MIN_INTERVAL
    assert s.planned_at(back + MIN_INTERVAL, never) == back + MIN_INTERVAL
    assert s.last_restart_at == back


def test_last_restart_in_future_from_state_file():
    d = Scheduler(SETTLE, MIN_INTERVAL).to_dict()
    d["last_restart_at"] = T0 + 10 * 365 * 86400
    s = Scheduler.from_dict(d, SETTLE, MIN_INTERVAL)
    s.add("a", "fa", T0)
    assert s.planned_at(T0, never) == T0 + MIN_INTERVAL


def test_settle_zero():
    s = Scheduler(0, MIN_INTERVAL)
    assert s.add("a", "fa", T0) == T0
    assert s.planned_at(T0, never) == T0


def test_min_interval_zero():
    s = Scheduler(SETTLE, 0)
    s.record_restart(T0)
    assert s.add("a", "fa", T0) == T0 + SETTLE


def test_both_zero():
    s = Scheduler(0, 0)
    s.record_restart(T0)
    assert s.add("a", "fa", T0) == T0
    assert s.planned_at(T0, never) == T0


def test_never_restarted_does_not_defer(s):
    # last_restart_at == 0 means never: min_interval counts from the epoch, long past.
    assert s.add("a", "fa", T0) == T0 + SETTLE
