"""apache-restart against what it must not believe or print raw: signals from other senders,
and text that came from the store."""

import asyncio
import signal
import sys

from broker import dbuslib, names
from broker.dbuslib import Message, MessageType
from harness import busutil, storefactory
from harness.busutil import call

MD = "www.example.test"


async def _unique_name_of(client, pid: int) -> str:
    """The unique bus name of the connection that process `pid` opened."""
    for _ in range(500):
        (listed,) = (await call(client, "ListNames", destination=names.DBUS_BUS_NAME, path=names.DBUS_PATH,
                                interface=names.DBUS_INTERFACE)).body
        for name in listed:
            if not name.startswith(":"):
                continue
            reply = await call(client, "GetConnectionUnixProcessID", "s", [name], destination=names.DBUS_BUS_NAME,
                               path=names.DBUS_PATH, interface=names.DBUS_INTERFACE)
            if reply.message_type == MessageType.METHOD_RETURN and reply.body[0] == pid:
                return name
        await asyncio.sleep(0.02)
    raise AssertionError(f"process {pid} has no connection on the bus")


async def test_watch_believes_only_the_broker(start_broker, allow, bus_address, client, store):
    storefactory.add_staged(store, MD, [MD])
    await start_broker()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.admin", "--bus-address", bus_address, "watch",
        cwd=str(busutil.REPO), env=busutil.broker_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    forger = await dbuslib.connect(bus_address)
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert first.decode().startswith("watching org.masysma.ApacheRestart")
        watcher = await _unique_name_of(client, proc.pid)
        # Another connection sends the broker's signals straight to the watcher.
        forger.send(Message.new_signal(names.OBJECT_PATH, names.INTERFACE, "RestartFinished", "bsas",
                                       [True, "forged", ["forged.example.test"]]))
        forged = Message.new_signal(names.OBJECT_PATH, names.INTERFACE, "RestartFinished", "bsas",
                                    [False, "forged \x1b[2J", ["forged.example.test"]])
        forged.destination = watcher
        forger.send(forged)
        # Then the real broker restarts; the watcher must show that and nothing else.
        reply = await call(client, "RequestGracefulRestart", "s", [MD])
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        seen = []
        while not any("restart ok for" in line for line in seen):
            seen.append((await asyncio.wait_for(proc.stdout.readline(), 15)).decode())
        assert f"  restart ok for {MD}: " in seen[-1], seen
        assert not any("forged" in line for line in seen), seen
    finally:
        forger.disconnect()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
    assert rc == 0
