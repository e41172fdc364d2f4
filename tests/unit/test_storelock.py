"""mod_md's store lock in a cluster: the broker tests it as mod_md takes it, and waits.

The lock is held by another process, as another node's Apache would hold it: POSIX locks of
one process never conflict with each other, so a lock taken in the test itself would prove
nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from broker import storelock
from broker.config import from_mapping
from broker.engine import Engine
from broker.staging import Store
from broker.state import StateFile
from harness import storefactory
from tests.unit.test_engine import Clock, FakeApache

MD = "www.example.test"

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o640)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def store(tmp_path):
    return storefactory.make_store(tmp_path)


@pytest.fixture
def holder(store):
    """Another process holding <store>/store.lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store / "store.lock")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(10)


def test_no_lock_file_means_nobody_locked(store):
    assert storelock.held_elsewhere(str(store)) is False
    assert not (store / "store.lock").exists()  # the test never creates it


def test_a_lock_held_elsewhere_is_seen_and_not_kept(store, holder):
    assert storelock.held_elsewhere(str(store)) is True
    holder.stdin.close()
    holder.wait(10)
    assert storelock.held_elsewhere(str(store)) is False
    # The test dropped the lock again: another process can take it at once.
    again = subprocess.run([sys.executable, "-c",
                            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
                            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(store / "store.lock")],
                           timeout=10)
    assert again.returncode == 0


def test_a_symlinked_lock_file_is_not_followed(store, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    (store / "store.lock").symlink_to(target)
    assert storelock.held_elsewhere(str(store)) is False


async def test_the_restart_waits_while_another_node_activates(tmp_path, store, holder, capfd, monkeypatch):
    storefactory.add_staged(store, MD, [MD])
    apache = FakeApache(store)
    cfg = from_mapping({"md_store": str(store), "state_dir": str(tmp_path / "state"),
                        "settle_seconds": 0, "min_interval_seconds": 0, "verify_timeout_seconds": 0})
    engine = Engine(cfg, Store(str(store), anchors=storefactory.anchors()), apache,
                    StateFile(str(tmp_path / "state")), clock=Clock())
    seen_held = asyncio.Event()
    answers: list[bool] = []

    real = storelock.held_elsewhere

    def held(root: str) -> bool:
        answer = real(root)
        answers.append(answer)
        if answers.count(True) >= 3:
            seen_held.set()
        return answer

    monkeypatch.setattr(storelock, "held_elsewhere", held)
    await engine.request(MD, caller_uid=33)
    restart = asyncio.ensure_future(engine.restart_now())
    await asyncio.wait_for(seen_held.wait(), 10)
    assert apache.restarts == 0 and not restart.done()
    holder.stdin.close()
    await asyncio.to_thread(holder.wait, 10)
    await asyncio.wait_for(restart, 10)
    assert apache.restarts == 1 and engine.last_result == "ok"
    assert answers[-1] is False
    err = capfd.readouterr().err
    assert "the MD store is locked (another node is activating certificates); waiting" in err
    assert "the MD store lock is free after" in err
