"""Who is asked what: the bus daemon for a connection's uid, polkit for every call."""

import asyncio
from types import SimpleNamespace

import pytest

from broker import names
from broker.authz import UID_CACHE_SIZE, Authorizer
from broker.dbuslib import MessageType
from broker.errors import AccessDenied

ACTION = names.POLKIT_ACTION


class FakeBus:
    """Answers GetConnectionUnixUser and CheckAuthorization; records what was asked."""

    def __init__(self, uid: int = 33, allowed: bool = True, fail_uid: bool = False):
        self.uid, self.allowed, self.fail_uid = uid, allowed, fail_uid
        self.asked: list[tuple[str, object]] = []
        self.gate: asyncio.Event | None = None

    async def call(self, msg):
        self.asked.append((msg.member, msg.body[0]))
        if self.gate is not None:
            await self.gate.wait()
        if msg.member == "GetConnectionUnixUser":
            if self.fail_uid:
                return SimpleNamespace(message_type=MessageType.ERROR,
                                       error_name="org.freedesktop.DBus.Error.NameHasNoOwner", body=["gone"])
            return SimpleNamespace(message_type=MessageType.METHOD_RETURN, body=[self.uid])
        return SimpleNamespace(message_type=MessageType.METHOD_RETURN, body=[[self.allowed, False, {}]])

    def count(self, member: str) -> int:
        return sum(1 for m, _ in self.asked if m == member)


async def test_a_connections_uid_is_asked_once_polkit_every_time():
    bus = FakeBus()
    authz = Authorizer(bus, timeout=5)
    for _ in range(3):
        caller = await authz.authorize(":1.7", ACTION, False)
        assert caller.uid == 33
    assert bus.count("GetConnectionUnixUser") == 1
    assert bus.count("CheckAuthorization") == 3
    await authz.authorize(":1.8", ACTION, False)
    assert bus.count("GetConnectionUnixUser") == 2


async def test_a_well_known_name_is_asked_each_time():
    # Only unique names stay with one connection for the bus's lifetime.
    bus = FakeBus(uid=0)
    authz = Authorizer(bus, timeout=5)
    await authz.require_root("org.example.Name")
    await authz.require_root("org.example.Name")
    assert bus.count("GetConnectionUnixUser") == 2


async def test_the_uid_memory_is_bounded():
    bus = FakeBus()
    authz = Authorizer(bus, timeout=5)
    for i in range(UID_CACHE_SIZE + 10):
        await authz.caller_uid(f":1.{i}")
    assert len(authz._uids) == UID_CACHE_SIZE
    await authz.caller_uid(":1.0")  # forgotten first: asked again
    assert bus.count("GetConnectionUnixUser") == UID_CACHE_SIZE + 11


async def test_concurrent_calls_share_one_question_and_its_refusal():
    bus = FakeBus(allowed=False)
    bus.gate = asyncio.Event()
    authz = Authorizer(bus, timeout=5)
    waiting = [asyncio.ensure_future(authz.authorize(":1.7", ACTION, False)) for _ in range(5)]
    await asyncio.sleep(0)
    bus.gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, AccessDenied) for r in results), results
    assert bus.count("GetConnectionUnixUser") == 1 and bus.count("CheckAuthorization") == 1


async def test_a_failed_uid_lookup_is_not_remembered():
    bus = FakeBus(fail_uid=True)
    authz = Authorizer(bus, timeout=5)
    with pytest.raises(AccessDenied):
        await authz.authorize(":1.7", ACTION, False)
    bus.fail_uid = False
    assert (await authz.authorize(":1.7", ACTION, False)).uid == 33
    assert bus.count("GetConnectionUnixUser") == 2


async def test_one_waiter_giving_up_does_not_cancel_the_others():
    bus = FakeBus()
    bus.gate = asyncio.Event()
    authz = Authorizer(bus, timeout=5)
    first = asyncio.ensure_future(authz.authorize(":1.7", ACTION, False))
    second = asyncio.ensure_future(authz.authorize(":1.7", ACTION, False))
    await asyncio.sleep(0)
    first.cancel()
    bus.gate.set()
    assert (await second).uid == 33
    assert bus.count("CheckAuthorization") == 1
