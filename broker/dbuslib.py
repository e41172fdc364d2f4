"""The one module that picks the D-Bus library; every other module imports from here.

dbus-next is what the design names; dbus-fast is its maintained fork with the same API
(faster, and it never sends tracebacks to callers). dbus-fast is preferred when installed.
APACHE_RESTART_DBUS_LIB=dbus_next|dbus_fast forces one (the test suite runs against both).
"""

import errno
import importlib
import os
import socket
from typing import Any

_CHOICES = ("dbus_fast", "dbus_next")


def _pick() -> str:
    forced = os.environ.get("APACHE_RESTART_DBUS_LIB", "")
    if forced:
        if forced not in _CHOICES:
            raise ImportError(f"APACHE_RESTART_DBUS_LIB must be one of {', '.join(_CHOICES)}")
        return forced
    for name in _CHOICES:
        try:
            importlib.import_module(name)
            return name
        except ImportError:
            continue
    raise ImportError("neither dbus-fast nor dbus-next is installed")


LIB_NAME = _pick()

if LIB_NAME == "dbus_fast":
    from dbus_fast import (
        BusType,
        DBusError,
        Message,
        MessageFlag,
        MessageType,
        PropertyAccess,
        Variant,
    )
    from dbus_fast.aio import MessageBus
    from dbus_fast.introspection import Node
    from dbus_fast.service import ServiceInterface, dbus_property, method, signal
else:
    from dbus_next import (  # type: ignore[no-redef,assignment]  # noqa: F401
        BusType,
        DBusError,
        Message,
        MessageFlag,
        MessageType,
        PropertyAccess,
        Variant,
    )
    from dbus_next.aio import MessageBus  # type: ignore[no-redef,assignment]
    from dbus_next.introspection import Node  # type: ignore[no-redef,assignment]  # noqa: F401
    from dbus_next.service import (  # type: ignore[no-redef,assignment]  # noqa: F401
        ServiceInterface,
        dbus_property,
        method,
        signal,
    )

# Numeric flag values from the D-Bus specification, so no code depends on either
# library's enum spelling.
FLAG_NO_REPLY_EXPECTED = 0x1
FLAG_ALLOW_INTERACTIVE_AUTHORIZATION = 0x4


class _EagainTolerantSocket:
    """Wraps the bus socket so a full send buffer reads as "0 bytes written".

    Both libraries treat BlockingIOError from send() as a fatal error and drop the
    connection, and with it our bus name (python-dbus-next issue #153; same code in
    dbus-fast). Their writer already handles a short write by waiting for the socket to
    become writable again, so reporting 0 bytes turns a burst of replies into backpressure
    instead of a crash.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def send(self, data: Any, *args: Any) -> int:
        try:
            return self._sock.send(data, *args)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            raise

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        try:
            return self._sock.sendmsg(buffers, *args)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def harden_writer(bus: Any) -> bool:
    """Install the EAGAIN fix on a connected bus; False when the library's layout is unknown."""
    writer = getattr(bus, "_writer", None)
    sock = getattr(writer, "sock", None)
    if writer is None or sock is None:
        return False
    if not isinstance(sock, _EagainTolerantSocket):
        writer.sock = _EagainTolerantSocket(sock)
    return True


async def connect(bus_address: str | None) -> Any:
    """Connect to `bus_address`, or the system bus (DBUS_SYSTEM_BUS_ADDRESS honoured)."""
    if bus_address:
        bus = MessageBus(bus_address=bus_address)
    else:
        bus = MessageBus(bus_type=BusType.SYSTEM)
    await bus.connect()
    return bus
