"""Verification after a restart: the store (fake mod_md stores) and the TLS probe (a local server)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.staging import Store
from broker.verify import parse_address, served_certificate, verify_activation
from harness import storefactory as sf

MD = "example.org"
NAMES = ["example.org", "www.example.org"]


class FakeTime:
    """A clock for the store-only tests: waiting costs no real time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return sf.make_store(tmp_path)


def staged_batch(store: Store, *mds: str):
    return {md: store.check_staged(md) for md in mds}


# -- the store -------------------------------------------------------------------------


async def test_activated_set_verifies(store_dir):
    sf.add_active(store_dir, MD, NAMES)
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    assert sf.activate(store_dir, MD) == "activated"
    verdict = await verify_activation(store, batch, (), 5)
    assert verdict.ok, verdict.detail
    assert verdict.activated == frozenset({MD})
    assert verdict.detail == "1 MD active"


async def test_activation_during_polling_is_waited_for(store_dir):
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    asyncio.get_running_loop().call_later(0.3, sf.activate, store_dir, MD)
    start = time.monotonic()
    verdict = await verify_activation(store, batch, (), 1.5, poll=0.05)
    assert verdict.ok, verdict.detail
    assert 0.25 < time.monotonic() - start < 1.0


async def test_still_staged_fails_at_the_deadline(store_dir):
    sf.add_active(store_dir, MD, NAMES)
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    clock = FakeTime()
    verdict = await verify_activation(store, staged_batch(store, MD), (), 30,
                                      sleep=clock.sleep, monotonic=clock.monotonic)
    assert not verdict.ok
    assert verdict.activated == frozenset()
    assert verdict.detail == "example.org: still staged after 30 s (mod_md did not activate it)"
    assert clock.now == pytest.approx(1030.0)
    assert clock.sleeps >= 100  # it kept looking, every `poll` seconds


async def test_purged_set_is_reported_as_not_active(store_dir):
    old = sf.add_active(store_dir, MD, NAMES)
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    # A key that does not match its certificate: mod_md purges the set and keeps the old one.
    (store_dir / "staging" / MD / "privkey.pem").write_bytes(
        sf.key_pem(sf.new_key("secp256r1"), sf.store_passphrase(store_dir)))
    assert sf.activate(store_dir, MD) == "purged"
    clock = FakeTime()
    verdict = await verify_activation(store, batch, (), 2, sleep=clock.sleep, monotonic=clock.monotonic)
    assert not verdict.ok
    assert verdict.detail == (f"example.org: activates serial {old.serial()}, "
                              f"not the verified {batch[MD].certs[0].serial}")
    assert store.active(MD).fingerprint == old.fingerprint


async def test_no_active_set_at_all(store_dir):
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    shutil.rmtree(store_dir / "staging" / MD)
    clock = FakeTime()
    verdict = await verify_activation(store, batch, (), 1, sleep=clock.sleep, monotonic=clock.monotonic)
    assert not verdict.ok
    assert verdict.detail.startswith("example.org: no active certificate")


async def test_staging_turned_hostile_is_a_failure_not_an_exception(store_dir):
    sf.add_active(store_dir, MD, NAMES)
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    pubcert = store_dir / "staging" / MD / "pubcert.pem"
    pubcert.unlink()
    pubcert.symlink_to(store_dir / "domains" / MD / "pubcert.pem")
    clock = FakeTime()
    verdict = await verify_activation(store, batch, (), 1, sleep=clock.sleep, monotonic=clock.monotonic)
    assert not verdict.ok
    assert verdict.detail.startswith("example.org: store check failed: ")
    assert verdict.activated == frozenset()


async def test_one_of_two_activated(store_dir):
    for md in ("a.example", "b.example"):
        sf.add_active(store_dir, md)
        sf.add_staged(store_dir, md)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, "a.example", "b.example")
    sf.activate(store_dir, "b.example")
    clock = FakeTime()
    verdict = await verify_activation(store, batch, (), 3, sleep=clock.sleep, monotonic=clock.monotonic)
    assert not verdict.ok
    assert verdict.activated == frozenset({"b.example"})
    assert verdict.detail == "a.example: still staged after 3 s (mod_md did not activate it)"


async def test_timeout_zero_looks_once(store_dir):
    sf.add_staged(store_dir, "a.example")
    sf.add_staged(store_dir, "b.example")
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, "a.example", "b.example")
    sf.activate(store_dir, "a.example")
    clock = FakeTime()
    verdict = await verify_activation(store, batch, (), 0, sleep=clock.sleep, monotonic=clock.monotonic)
    assert verdict.activated == frozenset({"a.example"})
    assert not verdict.ok
    assert clock.sleeps == 0


# -- the TLS probe ---------------------------------------------------------------------


class TLSServer:
    """A local TLS server that picks its certificate by SNI, as Apache's virtual hosts do."""

    def __init__(self, tmp_path: Path, default: sf.Issued):
        self.tmp_path = tmp_path
        self.by_name: dict[str, ssl.SSLContext] = {}
        self.sni_seen: list[str | None] = []
        self.context = self._context(default)
        self.context.sni_callback = self._pick

    def _context(self, issued: sf.Issued) -> ssl.SSLContext:
        cert = self.tmp_path / f"{issued.serial}.crt"
        key = self.tmp_path / f"{issued.serial}.key"
        cert.write_bytes(issued.chain_pem)
        key.write_bytes(sf.key_pem(issued.key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    def serve(self, name: str, issued: sf.Issued) -> None:
        self.by_name[name] = self._context(issued)

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni_seen.append(server_name)
        if server_name in self.by_name:
            sslobj.context = self.by_name[server_name]

    @contextlib.asynccontextmanager
    async def running(self, host: str = "127.0.0.1") -> AsyncIterator[str]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(handle, host, 0, ssl=self.context)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        finally:
            server.close()
            await server.wait_closed()


def fallback_cert() -> sf.Issued:
    return sf.issue(["fallback.invalid"], "secp256r1", key=sf.new_key("secp256r1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_probe_accepts_the_staged_cert_served_by_sni(store_dir, tmp_path):
    sf.add_active(store_dir, MD, NAMES)
    new = sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    sf.activate(store_dir, MD)
    server = TLSServer(tmp_path, fallback_cert())
    server.serve(MD, new.certs["rsa"])
    async with server.running() as address:
        verdict = await verify_activation(store, batch, [address], 2, poll=0.05)
    assert verdict.ok, verdict.detail
    assert verdict.detail == "1 MD active and served"
    assert server.sni_seen == [MD]


async def test_probe_accepts_the_ec_cert_of_a_dual_set(store_dir, tmp_path):
    new = sf.add_staged(store_dir, MD, NAMES, ("rsa", "secp256r1"))
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    sf.activate(store_dir, MD)
    server = TLSServer(tmp_path, fallback_cert())
    server.serve(MD, new.certs["secp256r1"])
    async with server.running() as address:
        verdict = await verify_activation(store, batch, [address], 2, poll=0.05)
    assert verdict.ok, verdict.detail


async def test_probe_rejects_the_old_cert_and_names_the_probe(store_dir, tmp_path):
    old = sf.add_active(store_dir, MD, NAMES)
    new = sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    sf.activate(store_dir, MD)
    server = TLSServer(tmp_path, fallback_cert())
    server.serve(MD, old.certs["rsa"])
    start = time.monotonic()
    async with server.running() as address:
        verdict = await verify_activation(store, batch, [address], 0.5, poll=0.05)
    assert time.monotonic() - start < 1.5
    assert not verdict.ok
    assert verdict.activated == frozenset({MD})
    assert verdict.detail == (
        f"probe {address} ({MD}): serves serial {old.serial()}, not the verified {new.serial()}")
    assert len(server.sni_seen) > 1  # it kept probing until the deadline


async def test_probe_waits_for_apache_to_serve_the_new_cert(store_dir, tmp_path):
    old = sf.add_active(store_dir, MD, NAMES)
    new = sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    sf.activate(store_dir, MD)
    server = TLSServer(tmp_path, fallback_cert())
    server.serve(MD, old.certs["rsa"])
    asyncio.get_running_loop().call_later(0.3, server.serve, MD, new.certs["rsa"])
    async with server.running() as address:
        verdict = await verify_activation(store, batch, [address], 1.5, poll=0.05)
    assert verdict.ok, verdict.detail


async def test_probe_fails_in_bounded_time_when_nothing_listens(store_dir):
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    sf.activate(store_dir, MD)
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    verdict = await verify_activation(store, batch, [address], 0.5, poll=0.05)
    assert time.monotonic() - start < 1.5
    assert not verdict.ok
    assert verdict.detail.startswith(f"probe {address} ({MD}): ")
    assert "connection refused" in verdict.detail


async def test_probe_fails_in_bounded_time_when_the_peer_never_handshakes(store_dir):
    sf.add_staged(store_dir, MD, NAMES)
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, MD)
    sf.activate(store_dir, MD)
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    start = time.monotonic()
    try:
        verdict = await verify_activation(store, batch, [address], 0.5, poll=0.05)
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - start < 1.5
    assert not verdict.ok
    assert verdict.detail == f"probe {address} ({MD}): no answer in time"


async def test_wildcard_only_md_is_not_probed(store_dir):
    wild = "*.example.org"
    sf.add_staged(store_dir, wild, [wild])
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, wild)
    sf.activate(store_dir, wild)
    verdict = await verify_activation(store, batch, [f"127.0.0.1:{free_port()}"], 0.5, poll=0.05)
    assert verdict.ok, verdict.detail
    assert verdict.detail == "1 MD active"


async def test_wildcard_md_is_probed_with_its_first_plain_name(store_dir, tmp_path):
    wild = "*.example.org"
    new = sf.add_staged(store_dir, wild, [wild, "example.org"])
    store = Store(str(store_dir), anchors=sf.anchors())
    batch = staged_batch(store, wild)
    sf.activate(store_dir, wild)
    server = TLSServer(tmp_path, fallback_cert())
    server.serve("example.org", new.certs["rsa"])
    async with server.running() as address:
        verdict = await verify_activation(store, batch, [address], 1, poll=0.05)
    assert verdict.ok, verdict.detail
    assert server.sni_seen == ["example.org"]


async def test_served_certificate_without_sni(tmp_path):
    fallback = fallback_cert()
    server = TLSServer(tmp_path, fallback)
    server.serve(MD, sf.issue([MD]))
    async with server.running() as address:
        der = await served_certificate(address, None, 1)
    assert hashlib.sha256(der).hexdigest() == fallback.sha256
    assert server.sni_seen == [None]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_served_certificate_over_ipv6(tmp_path):
    issued = sf.issue([MD])
    server = TLSServer(tmp_path, fallback_cert())
    server.serve(MD, issued)
    try:
        ctx = server.running("::1")
        address = await ctx.__aenter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert address.startswith("[::1]:")
        der = await served_certificate(address, MD, 1)
    finally:
        await ctx.__aexit__(None, None, None)
    assert hashlib.sha256(der).hexdigest() == issued.sha256


def test_parse_address():
    assert parse_address("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_address("[::1]:443") == ("::1", 443)
    assert parse_address("localhost:443") == ("localhost", 443)
    for bad in ("localhost", ":443", "host:0", "host:65536", "host:", "host:4x3"):
        with pytest.raises(ValueError):
            parse_address(bad)

