"""What is served, and a node that serves behind a shared store: probes, the comparison, and
the engine's CheckAll restarting for it once (and not again when that did not help)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker import served as served_mod
from broker.config import from_mapping
from broker.engine import Engine
from broker.errors import NothingStaged
from broker.restart import RestartOutcome
from broker.served import RefreshMemory, Served, behind, describe, probe_all
from broker.staging import Store
from broker.state import StateFile
from harness import storefactory

MD = "www.example.test"
PROBE = "127.0.0.1:8443"


def served_entry(issued: storefactory.Issued, probe: str = PROBE) -> Served:
    return describe(probe, issued.cert.public_bytes(serialization.Encoding.DER))


# -- the comparison ------------------------------------------------------------------------


def test_an_older_certificate_for_the_name_is_behind(tmp_path):
    store = storefactory.make_store(tmp_path)
    active = storefactory.add_active(store, MD, [MD])
    cset = Store(str(store)).active(MD)
    old = storefactory.issue([MD], not_before=active.certs["rsa"].not_before - 86400)
    newer = storefactory.issue([MD], not_before=active.certs["rsa"].not_before + 60)
    other = storefactory.issue(["other.example.test"], not_before=0)
    assert behind([served_entry(old)], cset, MD) == [served_entry(old)]
    assert behind([served_entry(active.certs["rsa"])], cset, MD) == []
    # Another vhost's certificate, or one newer than the store's, is not ours to replace.
    assert behind([served_entry(other), served_entry(newer)], cset, MD) == []
    assert behind([Served(PROBE, error="connection refused")], cset, MD) == []


def test_served_entry_json_names_key_type_serial_and_expiry():
    issued = storefactory.issue([MD], "secp256r1")
    entry = served_entry(issued).to_json()
    assert entry == {"probe": PROBE, "error": "", "key_type": "secp256r1", "serial": issued.serial,
                     "sha256": issued.sha256, "not_after_usec": int(issued.not_after * 1_000_000)}
    assert Served(PROBE, error="no answer in time").to_json() == {"probe": PROBE, "error": "no answer in time"}


def test_refresh_memory_is_bounded_and_strict(monkeypatch):
    monkeypatch.setattr(served_mod, "MAX_REMEMBERED", 3)
    memory = RefreshMemory()
    for i in range(5):
        memory.remember(f"md{i}.example.test", f"fp{i}")
    assert list(memory.failed) == ["md2.example.test", "md3.example.test", "md4.example.test"]
    assert RefreshMemory.from_dict(memory.to_dict()).failed == memory.failed
    for bad in ([], {"a": 1}, {"": "x"}, {f"m{i}": "f" for i in range(4)}):
        with pytest.raises(ValueError):
            RefreshMemory.from_dict(bad)


# -- probing, for real over TLS on loopback ------------------------------------------------


async def tls_server(tmp_path: Path, issued: storefactory.Issued):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(issued.chain_pem)
    key.write_bytes(storefactory.key_pem(issued.key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def handle(reader, writer):
        await reader.read()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


async def test_probe_reads_what_is_served_and_a_silent_peer_is_cut_off(tmp_path):
    issued = storefactory.issue([MD])
    server = await tls_server(tmp_path, issued)
    silent = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
    good = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    mute = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        start = time.monotonic()
        got = await probe_all([good, mute], {MD: MD}, attempt=0.5, total=5)
        took = time.monotonic() - start
    finally:
        server.close()
        silent.close()
    assert got[MD][0].sha256 == issued.sha256 and got[MD][0].serial == issued.serial
    assert got[MD][0].key_type == "rsa" and got[MD][0].names == (MD,)
    assert got[MD][1].error == "no answer in time"
    assert took < 2.0  # bounded by the attempt timeout, not by the silent peer


async def test_the_round_deadline_bounds_every_probe(tmp_path):
    silent = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
    mute = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        start = time.monotonic()
        got = await probe_all([mute], {f"m{i}.example.test": MD for i in range(40)}, attempt=10, total=0.5)
        took = time.monotonic() - start
    finally:
        silent.close()
    assert took < 2.0
    assert {e.error for entries in got.values() for e in entries} == {"no answer in time"}


# -- the engine: CheckAll on a node that serves behind the store ---------------------------


class Node:
    """A fake Apache node: serves `serving` at PROBE; a restart makes it serve the store's set.
    The first `held_back` restarts fail their config test (nothing restarted)."""

    def __init__(self, store: Path, serving: storefactory.Issued, follows_store: bool = True,
                 held_back: int = 0):
        self.store, self.follows_store, self.held_back = store, follows_store, held_back
        self.serving = served_entry(serving)
        self.restarts = 0

    async def restart(self) -> RestartOutcome:
        if self.held_back:
            self.held_back -= 1
            return RestartOutcome(False, False, "configtest failed: Syntax error")
        self.restarts += 1
        if self.follows_store:
            pem = (self.store / "domains" / MD / "pubcert.pem").read_bytes()
            leaf = x509.load_pem_x509_certificate(pem)
            self.serving = describe(PROBE, leaf.public_bytes(serialization.Encoding.DER))
        return RestartOutcome(True, True, "graceful restart issued")

    async def probe(self, probes, names):
        return {md: [dataclasses.replace(self.serving, probe=p) for p in probes] for md in names}


def make_engine(tmp_path, store, node, clock=None, **cfg):
    config = from_mapping({"md_store": str(store), "state_dir": str(tmp_path / "state"),
                           "settle_seconds": 5, "min_interval_seconds": 60,
                           "verify_timeout_seconds": 0, "probe": [PROBE], **cfg})

    async def verifier(st, batch, probes, timeout):
        from broker.verify import Verdict
        ok = all(node.serving.sha256 in {c.sha256 for c in s.certs} for s in batch.values())
        return Verdict(ok, frozenset(batch), "verified" if ok else "served the old one")

    return Engine(config, Store(str(store), anchors=storefactory.anchors()), node, StateFile(str(tmp_path / "state")),
                  clock=clock or (lambda: 1_800_000_000.0), verifier=verifier, prober=node.probe)


@pytest.fixture
def cluster(tmp_path):
    """A shared store whose active set is newer than what this node serves."""
    store = storefactory.make_store(tmp_path)
    old = storefactory.issue([MD], not_before=time.time() - 40 * 86400)
    active = storefactory.add_active(store, MD, [MD])
    return store, old, active


async def test_check_restarts_a_node_that_serves_behind_the_store_once(tmp_path, cluster):
    store, old, active = cluster
    node = Node(store, old)
    engine = make_engine(tmp_path, store, node)
    await engine.status_probed()
    (entry,) = (await engine.status())["mds"]
    assert entry["served_behind"] is True and entry["served_behind_failed"] is False
    scheduled, planned = await engine.check()
    assert scheduled == [MD] and planned > 0
    # Nothing staged: no hook will end the settle window, but nothing of mod_md's is pending either.
    assert engine.refresh_pending == {MD: active.fingerprint}
    await engine.restart_now()
    assert node.restarts == 1 and engine.last_result == "ok"
    assert node.serving.sha256 == active.sha256()
    status = await engine.status()
    assert status["mds"][0]["served"][0]["sha256"] == active.sha256()
    assert status["mds"][0]["served_behind"] is False
    # Serving the store's set now: the next checks schedule nothing.
    assert await engine.check() == ([], 0)
    assert engine.refresh_pending == {} and engine.refresh_failed.failed == {}


async def test_a_restart_that_did_not_help_is_not_repeated_until_root_asks(tmp_path, cluster):
    store, old, active = cluster
    node = Node(store, old, follows_store=False)
    engine = make_engine(tmp_path, store, node)
    assert (await engine.check())[0] == [MD]
    await engine.restart_now()
    assert node.restarts == 1 and engine.last_result.startswith("failed")
    assert engine.refresh_failed.failed == {MD: active.fingerprint}
    (entry,) = (await engine.status())["mds"]
    assert entry["served_behind"] is True and entry["served_behind_failed"] is True
    # Remembered across a restart of the broker (the check timer may activate a fresh one).
    engine = make_engine(tmp_path, store, node)
    assert await engine.check() == ([], 0)
    await engine.restart_now()
    assert node.restarts == 1
    # www-data cannot ask for it; root can.
    with pytest.raises(NothingStaged):
        await engine.request(MD, caller_uid=33)
    assert await engine.request(MD, caller_uid=0) > 0
    await engine.restart_now()
    assert node.restarts == 2


async def test_a_new_active_set_gets_its_own_try(tmp_path, cluster):
    store, old, active = cluster
    node = Node(store, old, follows_store=False)
    engine = make_engine(tmp_path, store, node)
    await engine.check()
    await engine.restart_now()
    assert node.restarts == 1
    newer = storefactory.add_staged(store, MD, [MD])
    storefactory.activate(store, MD)  # another node activated the next renewal
    clock_later = 1_800_000_000.0 + 120
    engine = make_engine(tmp_path, store, node, clock=lambda: clock_later)
    assert (await engine.check())[0] == [MD]
    assert engine.refresh_pending == {MD: newer.fingerprint}


async def test_a_valid_staged_set_wins_over_a_refresh(tmp_path, cluster):
    store, old, active = cluster
    staged = storefactory.add_staged(store, MD, [MD])
    node = Node(store, old)
    engine = make_engine(tmp_path, store, node)
    assert (await engine.check())[0] == [MD]
    assert engine.refresh_pending == {}
    assert engine.scheduler.pending[MD].fingerprint == staged.fingerprint


async def test_min_interval_holds_for_refresh_restarts(tmp_path, cluster):
    store, old, active = cluster
    now = [1_800_000_000.0]
    node = Node(store, old, follows_store=False)
    engine = make_engine(tmp_path, store, node, clock=lambda: now[0])
    engine.scheduler.record_restart(now[0] - 10)
    _, planned = await engine.check()
    assert planned == int((now[0] + 50) * 1_000_000)  # last restart + 60 s


async def test_a_refresh_held_back_by_the_config_test_is_retried_on_its_own(tmp_path, cluster):
    """A restart that was never issued proved nothing: its retry still restarts the node,
    without waiting for the next check."""
    store, old, active = cluster
    now = [1_800_000_000.0]
    node = Node(store, old, held_back=1)
    engine = make_engine(tmp_path, store, node, clock=lambda: now[0])
    assert (await engine.check())[0] == [MD]
    await engine.restart_now()
    assert node.restarts == 0 and engine.scheduler.retry is not None
    assert engine.scheduler.pending[MD].fingerprint == active.fingerprint
    now[0] = engine.scheduler.retry.at
    await engine.restart_now()
    assert node.restarts == 1 and engine.last_result == "ok"
    assert node.serving.sha256 == active.sha256()
    assert engine.refresh_pending == {} and engine.refresh_failed.failed == {}


async def test_root_retries_a_held_back_refresh_at_once(tmp_path, cluster):
    store, old, active = cluster
    now = [1_800_000_000.0]
    node = Node(store, old, held_back=1)
    engine = make_engine(tmp_path, store, node, clock=lambda: now[0], min_interval_seconds=0)
    await engine.check()
    await engine.restart_now()
    assert engine.scheduler.retry is not None and engine.planned_at_usec > int(now[0] * 1e6)
    with pytest.raises(NothingStaged):
        await engine.request(MD, caller_uid=33)  # www-data cannot
    # The hint in the log names this command: it retries now, not after the back-off.
    assert await engine.request(MD, caller_uid=0) == int(now[0] * 1_000_000)
    assert engine.scheduler.retry is None
    await engine.restart_now()
    assert node.restarts == 1 and node.serving.sha256 == active.sha256()


async def test_concurrent_status_calls_share_one_probe_round(tmp_path, cluster):
    """GetStatus is open to the monitoring group: many calls at once cost one round of probes."""
    store, old, active = cluster
    node = Node(store, old)
    rounds = []
    gate = asyncio.Event()

    async def slow_probe(probes, names):
        rounds.append(dict(names))
        await gate.wait()
        return await node.probe(probes, names)

    engine = make_engine(tmp_path, store, node)
    engine.prober = slow_probe
    calls = [asyncio.ensure_future(engine.status_probed()) for _ in range(10)]
    await asyncio.sleep(0.05)
    calls[0].cancel()  # a caller that gives up does not cancel the round for the others
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*calls[1:])
    assert len(rounds) == 1
    assert all(r["mds"][0]["served"][0]["serial"] == old.serial for r in results)
    # A later call starts a new round.
    await engine.status_probed()
    assert len(rounds) == 2
    # What decides a restart never reuses a round begun earlier (it may predate a restart).
    gate.clear()
    status_call = asyncio.ensure_future(engine.status_probed())
    await asyncio.sleep(0.05)
    check_call = asyncio.ensure_future(engine.check())
    await asyncio.sleep(0.05)
    assert len(rounds) == 4
    gate.set()
    await asyncio.gather(status_call, check_call)
