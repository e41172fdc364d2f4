"""Talking to the broker: the one module the hook and the admin command share.

It connects (to `--bus-address`, else the system bus, honouring DBUS_SYSTEM_BUS_ADDRESS),
makes method calls with a timeout, and turns every way a call can fail into a `Failure`
whose `kind` says what a caller should do about it:

    unreachable  no bus, or the broker is not on it and cannot be activated   retry later
    timeout      no answer in time                                             retry later
    busy         RateLimited (or the bus daemon's own limits)                  retry later
    denied       AccessDenied: polkit said no, or could not be asked           retry later *
    internal     the broker failed unexpectedly (its log says why)             retry later
    refused      the broker answered "no" for a reason a retry cannot cure:
                 InvalidName, NothingStaged, StagingInvalid, AlreadyFailed, InvalidArguments,
                 and any error name this client does not know

* A caller cannot tell a refusal from polkit being briefly unavailable (the broker fails
  closed with the same error), so AccessDenied counts as curable.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from broker import dbuslib, names
from broker.dbuslib import Message, MessageType

T = TypeVar("T")

# What the libraries use when DBUS_SYSTEM_BUS_ADDRESS is unset; only for messages.
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"

UNREACHABLE, TIMEOUT, BUSY, DENIED, INTERNAL, REFUSED = (
    "unreachable", "timeout", "busy", "denied", "internal", "refused")
RETRYABLE_KINDS = frozenset({UNREACHABLE, TIMEOUT, BUSY, DENIED, INTERNAL})

_DBUS_ERROR = "org.freedesktop.DBus.Error."
_KIND_OF_ERROR = {
    names.ERROR_ACCESS_DENIED: DENIED,
    names.ERROR_RATE_LIMITED: BUSY,
    names.ERROR_INTERNAL: INTERNAL,
    names.ERROR_INVALID_NAME: REFUSED,
    names.ERROR_NOTHING_STAGED: REFUSED,
    names.ERROR_STAGING_INVALID: REFUSED,
    names.ERROR_ALREADY_FAILED: REFUSED,
    names.ERROR_INVALID_ARGS: REFUSED,
    # The bus daemon's answers when the broker is not there (or not yet): activation may
    # work next time, e.g. once the package is fully installed or the unit is fixed.
    _DBUS_ERROR + "ServiceUnknown": UNREACHABLE,
    _DBUS_ERROR + "NameHasNoOwner": UNREACHABLE,
    _DBUS_ERROR + "Disconnected": UNREACHABLE,
    _DBUS_ERROR + "NoServer": UNREACHABLE,
    _DBUS_ERROR + "NoNetwork": UNREACHABLE,
    _DBUS_ERROR + "NoMemory": BUSY,
    _DBUS_ERROR + "LimitsExceeded": BUSY,
    _DBUS_ERROR + "NoReply": TIMEOUT,
    _DBUS_ERROR + "Timeout": TIMEOUT,
    _DBUS_ERROR + "TimedOut": TIMEOUT,
    # The bus policy refused the message; the same cannot-tell-why reasoning as polkit.
    _DBUS_ERROR + "AccessDenied": DENIED,
}


def kind_of_error(error_name: str) -> str:
    """What an error reply from the bus means for the caller (see the module docstring)."""
    kind = _KIND_OF_ERROR.get(error_name)
    if kind is not None:
        return kind
    if error_name.startswith(_DBUS_ERROR + "Spawn."):  # D-Bus activation failed
        return UNREACHABLE
    return REFUSED


def short_error_name(error_name: str) -> str:
    """`org.masysma.ApacheRestart.Error.NothingStaged` -> `NothingStaged`."""
    return error_name.rsplit(".", 1)[-1] if error_name else ""


def one_line(text: str, limit: int = 400) -> str:
    """Text fit for one log line: no control characters, bounded length."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


@dataclass
class Failure(Exception):
    """A call that did not return a result. `error_name` is "" when no error reply came."""

    kind: str
    error_name: str
    message: str

    def __str__(self) -> str:
        return self.describe()

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def describe(self) -> str:
        """The error as an admin reads it: `Name: message`, or just the message."""
        msg = one_line(self.message)
        if not self.error_name:
            return msg
        return f"{short_error_name(self.error_name)}: {msg}" if msg else short_error_name(self.error_name)


def bus_description(bus_address: str | None) -> str:
    """Which bus a connection goes to, for messages."""
    if bus_address:
        return bus_address
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


def format_usec(usec: int) -> str:
    """Microseconds since the epoch as `2026-11-29 12:00:05 UTC`; "never" for 0."""
    if not usec:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(usec / 1e6))


def format_planned(usec: int, now: float | None = None) -> str:
    """`2026-11-29 12:00:05 UTC (in 30 s)`, for a planned restart."""
    now = time.time() if now is None else now
    delta = usec / 1e6 - now
    when = "now" if delta < 0.5 else f"in {delta:.0f} s" if delta < 120 else f"in {delta / 60:.0f} min"
    return f"{format_usec(usec)} ({when})"


class Connection:
    """One connection to the bus, for one or more calls to the broker."""

    def __init__(self, bus: Any, bus_address: str | None):
        self.bus = bus
        self.bus_address = bus_address

    @classmethod
    async def open(cls, bus_address: str | None) -> Connection:
        try:
            bus = await dbuslib.connect(bus_address)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise Failure(UNREACHABLE, "", f"cannot connect to the bus at {bus_description(bus_address)}: "
                                           f"{_exception_text(e)}") from None
        return cls(bus, bus_address)

    def close(self) -> None:
        try:
            self.bus.disconnect()
        except Exception:
            pass

    async def call(self, member: str, signature: str = "", body: list[Any] | None = None, *,
                   interface: str = names.INTERFACE, timeout: float | None = None) -> list[Any]:
        """Call `member` on the broker's object; the reply's body, or Failure."""
        msg = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH, interface=interface,
                      member=member, signature=signature, body=body or [])
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise Failure(TIMEOUT, "", f"the broker did not answer within {timeout:g} s") from None
        except Exception as e:
            raise Failure(UNREACHABLE, "", f"lost the bus connection: {_exception_text(e)}") from None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise Failure(kind_of_error(reply.error_name), reply.error_name, text)
        return list(reply.body)

    async def properties(self, timeout: float | None = None) -> dict[str, Any]:
        """Every property of the broker's interface, as plain values."""
        (props,) = await self.call("GetAll", "s", [names.INTERFACE],
                                   interface="org.freedesktop.DBus.Properties", timeout=timeout)
        return {k: v.value for k, v in props.items()}

    async def add_match(self, rule: str, timeout: float | None = None) -> None:
        msg = Message(destination=names.DBUS_BUS_NAME, path=names.DBUS_PATH,
                      interface=names.DBUS_INTERFACE, member="AddMatch", signature="s", body=[rule])
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise Failure(TIMEOUT, "", "the bus did not answer AddMatch") from None
        if reply.message_type == MessageType.ERROR:
            raise Failure(kind_of_error(reply.error_name), reply.error_name,
                          reply.body[0] if reply.body else "")


def run(work: Callable[[Connection], Awaitable[T]], bus_address: str | None, timeout: float | None) -> T:
    """Connect, run `work`, disconnect; all of it within `timeout` seconds (None: no limit).

    Raises Failure for every way it can go wrong, including a bus that accepts the
    connection and then says nothing.
    """

    async def whole() -> T:
        conn = await Connection.open(bus_address)
        try:
            return await work(conn)
        finally:
            conn.close()

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(whole(), timeout)
        except TimeoutError:
            raise Failure(TIMEOUT, "", f"no answer within {timeout:g} s") from None

    return asyncio.run(bounded())


def request_restart(md: str, bus_address: str | None, timeout: float) -> int:
    """RequestGracefulRestart(md): the planned time in µs since the epoch, or Failure."""

    async def work(conn: Connection) -> int:
        body = await conn.call("RequestGracefulRestart", "s", [md])
        if len(body) != 1 or not isinstance(body[0], int) or isinstance(body[0], bool):
            # Not what the interface returns: something else owns the name, or a broken broker.
            raise Failure(INTERNAL, "", f"unexpected reply {one_line(repr(body), 80)}")
        return body[0]

    return run(work, bus_address, timeout)


def _exception_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
