"""The core against hostile text and at its bounds: nothing raw leaves it, nothing grows without
limit, a state file it cannot trust is put aside, and a set swapped after verification is not
restarted for."""

from __future__ import annotations

import copy
import json
import os
import unicodedata
from pathlib import Path

import pytest

from broker import state as state_mod
from broker.engine import MAX_RESULT, Engine
from broker.errors import BrokerError, RateLimited
from broker.restart import RestartOutcome
from broker.scheduler import MAX_FAILED, MAX_PENDING, MAX_REASON_LEN, Retry
from broker.staging import Store
from harness import storefactory
from tests.unit.test_engine import MD, Clock, FakeApache, make_engine

OTHER = "other.example.test"
HOSTILE = "a\0b\x1b[2J\x9b\u2028<0>forged\x7f\ud800"
# What md.json's domains may hold: the store takes any ASCII there.
HOSTILE_ASCII = "a\0b\x1b[2J\r\n<0>forged\x7f"


def no_control(text: str) -> bool:
    return not any(unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029" for ch in text)


def log_lines_are_clean(err: str) -> None:
    assert err == "" or err.endswith("\n")
    for line in err.splitlines(keepends=False):
        assert line[:1] == "<" and line[2:3] == ">" and line[1] in "01234567", line
        assert no_control(line), line
    assert "\0" not in err


def long_name(i: int) -> str:
    """A valid MD name of the greatest length (253)."""
    return ".".join([f"{i:06d}" + "a" * 57, "b" * 63, "c" * 63, "d" * 61])


@pytest.fixture
def store(tmp_path):
    return storefactory.make_store(tmp_path)


# -- hostile text ------------------------------------------------------------------------


async def test_hostile_names_in_a_staged_md_json_reach_no_output_raw(tmp_path, store, capsys):
    storefactory.add_staged(store, MD, [MD])
    storefactory.add_staged(store, OTHER, [OTHER])
    engine, finished = make_engine(tmp_path, store, FakeApache(store), Clock())
    await engine.request(MD, caller_uid=33)
    await engine.request(OTHER, caller_uid=33)
    # The MD's names change before the restart: www-data rewrites staging/<md>/md.json (which
    # counts while no root-owned domains/<md>/md.json exists).
    for group in ("staging", "domains"):
        md_json = store / group / OTHER / "md.json"
        if md_json.exists():
            md_json.write_text(json.dumps({"name": OTHER, "domains": [OTHER, HOSTILE_ASCII]}))
    await engine.restart_now()
    ok, detail, names = finished[0]
    if "does not cover" in detail:  # the names check quotes the name: escaped
        assert "does not cover a\\x00b\\x1b[2J\\x0d\\x0a<0>forged\\x7f" in detail, detail
    assert no_control(detail) and all(no_control(n) for n in names)
    assert no_control(engine.last_result) and all(
        no_control(v) for v in engine.properties().values() if isinstance(v, str))
    third = "third.example.test"  # an MD never activated: no root-owned md.json for it
    storefactory.add_staged(store, third, [third],
                            md_json_obj={"name": third, "domains": [third, HOSTILE_ASCII]})
    with pytest.raises(BrokerError) as refused:
        await engine.request(third, caller_uid=33)
    assert no_control(refused.value.message)
    if "does not cover" in refused.value.message:
        assert "\\x00" in refused.value.message
    log_lines_are_clean(capsys.readouterr().err)
    # What was saved loads again as it was.
    again, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    assert again.last_result == engine.last_result


async def test_hostile_command_output_reaches_no_output_raw(tmp_path, store, capsys):
    storefactory.add_staged(store, MD, [MD])

    class Babbling(FakeApache):
        async def restart(self):
            return RestartOutcome(False, False, f"config test failed: {HOSTILE}" + "x" * 5000)

    engine, finished = make_engine(tmp_path, store, Babbling(store), Clock())
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    ok, detail, _ = finished[0]
    assert not ok and no_control(detail) and len(detail) <= MAX_RESULT
    assert no_control(engine.last_result) and len(engine.last_result) <= MAX_RESULT
    # Held back for a retry: its reason (shown by status, kept in the state) is escaped too.
    retry = (await engine.status())["retry"]
    assert retry["reason"].startswith("config test failed: a\\x00b\\x1b[2J")
    assert no_control(retry["reason"]) and len(retry["reason"]) <= MAX_REASON_LEN
    log_lines_are_clean(capsys.readouterr().err)
    # A new broker takes the state over as it is (nothing in it fails the strict load).
    again, _ = make_engine(tmp_path, store, Babbling(store), Clock())
    assert (await again.status())["retry"] == retry and again.last_result == engine.last_result
    assert not list((tmp_path / "state").glob("state.json.corrupt-*"))


# -- the state file ----------------------------------------------------------------------

FP = "f" * 64


def _good_state() -> dict:
    return {
        "version": 1,
        "scheduler": {"version": 1, "pending": {MD: {"fingerprint": FP, "requested_at": 1.0}},
                      "window_opened_at": 1.0, "last_restart_at": 0.0, "failed": {OTHER: FP}},
        "in_progress": {},
        "last_restart_usec": 5,
        "last_result": "ok",
    }


def _bad_states() -> dict[str, dict]:
    def m(fn):
        d = _good_state()
        fn(d)
        return d

    return {
        "NUL in last_result": m(lambda d: d.update(last_result="failed: a\0b")),
        "escape in last_result": m(lambda d: d.update(last_result="failed: \x1b[2J")),
        "last_result too long": m(lambda d: d.update(last_result="failed: " + "x" * MAX_RESULT)),
        "last_result not a result": m(lambda d: d.update(last_result="whatever")),
        "NUL in a pending MD": m(lambda d: d["scheduler"].update(
            pending={"a\0b": {"fingerprint": FP, "requested_at": 1.0}})),
        "pending MD not a DNS name": m(lambda d: d["scheduler"].update(
            pending={"<0>x": {"fingerprint": FP, "requested_at": 1.0}})),
        "failed fingerprint not hex": m(lambda d: d["scheduler"].update(failed={OTHER: "zz"})),
        "in_progress MD with escape": m(lambda d: d.update(in_progress={"a\x1b": FP})),
        "in_progress fingerprint short": m(lambda d: d.update(in_progress={MD: "f" * 10})),
        "last_restart_usec negative": m(lambda d: d.update(last_restart_usec=-1)),
        "last_restart_usec float": m(lambda d: d.update(last_restart_usec=1.5)),
        "last_restart_usec huge": m(lambda d: d.update(last_restart_usec=2**64)),
        "unknown key": m(lambda d: d.update(extra=1)),
        "version 2": m(lambda d: d.update(version=2)),
        "last_result_usec negative": m(lambda d: d.update(last_result_usec=-1)),
        "last_result_usec str": m(lambda d: d.update(last_result_usec="5")),
        "NUL in the retry's reason": m(lambda d: d["scheduler"].update(
            version=2, retry={"attempts": 1, "at": 2.0, "reason": "config test failed: a\0<0>b"})),
        "escape in the retry's reason": m(lambda d: d["scheduler"].update(
            version=2, retry={"attempts": 1, "at": 2.0, "reason": "\x1b]0;owned\x07"})),
    }


def test_good_state_is_taken_over(tmp_path, store):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps(_good_state()))
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    assert list(engine.scheduler.pending) == [MD] and engine.scheduler.failed == {OTHER: FP}
    assert engine.last_result == "ok" and engine.last_restart_usec == 5
    assert not list(state_dir.glob("state.json.corrupt-*"))


@pytest.mark.parametrize("case", sorted(_bad_states()))
def test_unusable_state_is_moved_aside_and_replaced(tmp_path, store, capsys, case):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps(_bad_states()[case]))
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    assert not engine.scheduler.pending and not engine.scheduler.failed
    assert engine.last_result == "" and engine.last_restart_usec == 0
    aside = list(state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text()) == _bad_states()[case]
    # Replaced by a fresh state that loads without complaint.
    assert json.loads((state_dir / "state.json").read_text())["last_result"] == ""
    err = capsys.readouterr().err
    assert "has unusable content" in err and "moved aside" in err
    log_lines_are_clean(err)


def test_saving_never_raises(tmp_path, store, capsys, monkeypatch):
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock())

    def explode(data):
        raise ValueError("state is 2000000 bytes, more than the 1048576 load() accepts")

    monkeypatch.setattr(engine.state, "save", explode)
    engine._save()
    assert "could not save state: ValueError" in capsys.readouterr().err


async def test_state_at_every_bound_is_saved_and_loaded(tmp_path, store, capsys):
    """Longest names everywhere, every collection full (and more offered): the file stays
    within what load() accepts, and a new engine takes it over."""
    storefactory.add_staged(store, MD, [MD])
    engine, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    for i in range(MAX_PENDING):
        engine.scheduler.add(long_name(i), FP, 1.0)
    forgotten = engine.scheduler.record_outcome(
        {long_name(100_000 + i): FP for i in range(MAX_FAILED + 50)}, activated=set())
    assert len(forgotten) == 50 and len(engine.scheduler.failed) == MAX_FAILED
    engine.last_result = "failed: " + "\U0001f512" * MAX_RESULT  # widest in JSON: 12 bytes each
    engine.last_result = engine.last_result[:MAX_RESULT]
    engine.scheduler.retry = Retry(999_999, 1.0, "\U0001f512" * MAX_REASON_LEN)  # a held-back restart
    in_progress = {long_name(200_000 + i): FP for i in range(MAX_PENDING)}
    engine._save(in_progress=in_progress)
    err = capsys.readouterr().err
    assert "could not save" not in err, err
    size = os.path.getsize(tmp_path / "state" / "state.json")
    assert size < state_mod.MAX_SIZE, size
    # One more MD is refused, named and logged, and changes nothing.
    with pytest.raises(RateLimited):
        await engine.request(MD, caller_uid=33)
    assert f"{MD}: restart not scheduled" in capsys.readouterr().err
    assert MD not in engine.scheduler.pending

    again, _ = make_engine(tmp_path, store, FakeApache(store), Clock())
    assert len(again.scheduler.pending) == MAX_PENDING  # the interrupted batch found no room
    assert len(again.scheduler.failed) == MAX_FAILED
    assert again.last_result == engine.last_result
    assert again.scheduler.retry == engine.scheduler.retry
    assert not list((tmp_path / "state").glob("state.json.corrupt-*"))
    assert "not resumed" in capsys.readouterr().err


async def test_forgetting_a_failed_set_is_logged(tmp_path, store, capsys):
    storefactory.add_staged(store, MD, [MD])
    engine, finished = make_engine(tmp_path, store, FakeApache(store, activate=False), Clock())
    engine.scheduler.record_outcome({long_name(i): FP for i in range(MAX_FAILED)}, activated=set())
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert finished[0][0] is False and MD in engine.scheduler.failed
    assert len(engine.scheduler.failed) == MAX_FAILED
    assert f"{long_name(0)}: forgetting that a restart failed" in capsys.readouterr().err


# -- the window between verification and restart ------------------------------------------


class SwapAfterCheck(Store):
    """www-data stages another (valid) set right after the broker's check of `md` number `at`."""

    root_path: Path
    md: str
    at: int
    checks: int
    swapped: storefactory.SetInfo | None

    def check_staged(self, md):
        result = super().check_staged(md)
        if md == self.md:
            self.checks += 1
            if self.checks == self.at:
                self.swapped = storefactory.add_staged(self.root_path, md, [md])
        return result


def _engine_with(tmp_path, store, cls: type[SwapAfterCheck], apache, at: int) -> tuple[Engine, list, SwapAfterCheck]:
    """An engine as make_engine builds it, whose store is made a `cls` (same settings)."""
    engine, finished = make_engine(tmp_path, store, apache, Clock())
    swapping = copy.copy(engine.store)
    swapping.__class__ = cls
    swapping.__dict__.update(root_path=store, md=MD, at=at, checks=0, swapped=None)
    engine.store = swapping
    return engine, finished, swapping  # type: ignore[return-value]


async def test_set_swapped_after_verification_is_not_restarted_for(tmp_path, store, capsys):
    first = storefactory.add_staged(store, MD, [MD])
    apache = FakeApache(store)
    # Check 1: the request's; 2: the one just before the restart.
    engine, finished, swapping = _engine_with(tmp_path, store, SwapAfterCheck, apache, at=2)
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert swapping.swapped is not None and swapping.swapped.fingerprint != first.fingerprint
    assert apache.restarts == 0
    assert finished == [(False, f"no restart: {MD}: staged set changed after verification", [MD])]
    assert engine.last_result == f"failed: no restart: {MD}: staged set changed after verification"
    assert f"dropped from restart: {MD}: staged set changed after verification" in capsys.readouterr().err
    # Not held against the MD: the set staged now may be requested, and is restarted for.
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert apache.restarts == 1 and finished[-1][0] is True


async def test_set_swapped_during_the_restart_is_named_not_blamed_on_mod_md(tmp_path, store):
    first = storefactory.add_staged(store, MD, [MD])

    class SwapInConfigTest(FakeApache):
        async def restart(self):
            # After the broker's last look, while the config test runs.
            self.swapped = storefactory.add_staged(self.store, MD, [MD])
            return await super().restart()

    apache = SwapInConfigTest(store)
    engine, finished = make_engine(tmp_path, store, apache, Clock())
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    ok, detail, _ = finished[0]
    assert not ok
    assert detail == f"{MD}: activates serial {apache.swapped.serial()}, not the verified {first.serial()}"


async def test_set_activated_right_after_verification_is_not_called_changed(tmp_path, store):
    storefactory.add_staged(store, MD, [MD])

    class ActivatedByOthers(SwapAfterCheck):
        def check_staged(self, md):
            result = Store.check_staged(self, md)
            self.checks += 1
            if self.checks == self.at:
                storefactory.activate(self.root_path, md)  # somebody else restarted Apache
            return result

    apache = FakeApache(store)
    engine, finished, _ = _engine_with(tmp_path, store, ActivatedByOthers, apache, at=2)
    await engine.request(MD, caller_uid=33)
    await engine.restart_now()
    assert apache.restarts == 0 and finished == [] and engine.last_result == ""
