"""Faults the real parts cannot be made to show, injected into an in-process service."""

import asyncio

from broker import dbuslib, names
from broker.authz import Caller
from broker.errors import AccessDenied
from broker.service import ApacheRestartService
from harness import busutil
from harness.busutil import call, error_of


class ExplodingEngine:
    """An engine whose core fails unexpectedly, with an internal path in the exception."""

    def __init__(self):
        self.on_properties_changed = None
        self.on_restart_finished = None
        self.requests = 0
        self.pending = False
        self.planned_at_usec = 0
        self.last_restart_usec = 0
        self.last_result = ""

        self.announced = {"Version": "test", "Pending": False, "PlannedAt": 0, "LastRestart": 0,
                          "LastResult": ""}

    def properties(self):
        return dict(self.announced)

    def request(self, md, uid):
        self.requests += 1
        raise RuntimeError("/var/lib/secret-internal/state.json exploded")


class AllowAll:
    async def authorize(self, bus_name, action, interactive):
        return Caller(bus_name, 33)

    async def require_root(self, bus_name):
        raise AccessDenied("only root may do this")

    async def require_root_or(self, bus_name, action, interactive, refusal):
        raise AccessDenied(refusal)


class SlowAuthorizer(AllowAll):
    def __init__(self):
        self.gate = asyncio.Event()
        self.started = 0

    async def authorize(self, bus_name, action, interactive):
        self.started += 1
        await self.gate.wait()
        return Caller(bus_name, 33)


async def _serve(bus_address, engine, authorizer, max_in_flight=8):
    bus = await dbuslib.connect(bus_address)
    dbuslib.harden_writer(bus)
    service = ApacheRestartService(bus, engine, authorizer, max_in_flight)
    service.export()
    await bus.request_name(names.BUS_NAME)
    return bus, service


async def test_internal_error_is_named_without_traceback(bus_address, client):
    engine = ExplodingEngine()
    bus, _ = await _serve(bus_address, engine, AllowAll())
    try:
        reply = await call(client, "RequestGracefulRestart", "s", ["www.example.test"])
        name, message = error_of(reply)
        assert name == names.ERROR_INTERNAL
        assert "Traceback" not in message and "/var/lib" not in message and "exploded" not in message
        assert engine.requests == 1
        # And the service still answers.
        reply = await call(client, "RequestGracefulRestart", "s", ["www.example.test"])
        assert error_of(reply)[0] == names.ERROR_INTERNAL
    finally:
        bus.disconnect()


async def test_admin_methods_refused_for_non_root(bus_address, client):
    bus, _ = await _serve(bus_address, ExplodingEngine(), AllowAll())
    try:
        for member in ("GetStatus", "CheckAll"):
            reply = await call(client, member)
            assert error_of(reply)[0] == names.ERROR_ACCESS_DENIED
    finally:
        bus.disconnect()


async def test_requests_in_flight_are_capped_before_authorization(bus_address, client):
    authorizer = SlowAuthorizer()
    bus, service = await _serve(bus_address, ExplodingEngine(), authorizer, max_in_flight=4)
    try:
        tasks = [asyncio.ensure_future(call(client, "RequestGracefulRestart", "s", ["a.example.test"]))
                 for _ in range(10)]
        for _ in range(100):
            if authorizer.started >= 4 and sum(t.done() for t in tasks) >= 6:
                break
            await asyncio.sleep(0.02)
        done = [t for t in tasks if t.done()]
        assert len(done) == 6
        assert all(error_of(t.result())[0] == names.ERROR_RATE_LIMITED for t in done)
        assert authorizer.started == 4  # the refused ones never reached polkit
        authorizer.gate.set()
        rest = await asyncio.gather(*[t for t in tasks if t not in done])
        assert all(error_of(r)[0] == names.ERROR_INTERNAL for r in rest)
        assert service.in_flight == 0
    finally:
        bus.disconnect()


async def test_no_reply_expected_gets_no_reply(bus_address, client):
    engine = ExplodingEngine()
    bus, service = await _serve(bus_address, engine, AllowAll())
    # Everything the service sends, as the bus daemon would drop an unexpected reply before
    # the client could see it.
    sent = []

    class RecordingBus:
        def __getattr__(self, name):
            return getattr(bus, name)

        def send(self, msg):
            sent.append(msg)
            return bus.send(msg)
    service.bus = RecordingBus()
    try:
        from broker.dbuslib import Message, MessageFlag
        call = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                       interface=names.INTERFACE, member="RequestGracefulRestart",
                       signature="s", body=["a.example.test"], flags=MessageFlag.NO_REPLY_EXPECTED)
        await client.send(call)
        await busutil.wait_until(lambda: engine.requests == 1 and service.in_flight == 0, 5)
        # The same call expecting a reply gets one (the negative control for the check below).
        reply = await client.call(Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                                          interface=names.INTERFACE, member="RequestGracefulRestart",
                                          signature="s", body=["a.example.test"]))
        assert reply.error_name == names.ERROR_INTERNAL
        answers = [m.reply_serial for m in sent if m.reply_serial]
        assert answers == [reply.reply_serial], answers
    finally:
        bus.disconnect()


async def test_call_without_interface_is_authorized_like_any_other(bus_address, client):
    engine = ExplodingEngine()
    bus, _ = await _serve(bus_address, engine, AllowAll())
    try:
        from broker.dbuslib import Message
        reply = await client.call(Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                                          member="GetStatus"))
        assert error_of(reply)[0] == names.ERROR_ACCESS_DENIED  # not the stub, not a traceback
        reply = await client.call(Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                                          member="RequestGracefulRestart", signature="s",
                                          body=["a.example.test"]))
        assert error_of(reply)[0] == names.ERROR_INTERNAL and engine.requests == 1
    finally:
        bus.disconnect()
