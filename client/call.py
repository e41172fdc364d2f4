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
from broker.timefmt import usec_iso

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


def activation_failed(error_name: str) -> bool:
    """The bus could not start the broker: its own launcher (Spawn.*) or systemd said so.

    dbus-daemon passes systemd's reason on as the error name (org.freedesktop.systemd1.*)
    when it activates through systemd.
    """
    return error_name.startswith((_DBUS_ERROR + "Spawn.", "org.freedesktop.systemd1."))


def kind_of_error(error_name: str) -> str:
    """What an error reply from the bus means for the caller (see the module docstring)."""
    kind = _KIND_OF_ERROR.get(error_name)
    if kind is not None:
        return kind
    if activation_failed(error_name):  # fixing the broker's unit or config cures it
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
    """Microseconds since the epoch as local ISO time, `2026-11-29T13:00:05+01:00`; "never" for 0."""
    return usec_iso(usec)


def format_in(usec: int, now: float | None = None) -> str:
    """How far ahead `usec` is: `now`, `in 30 s`, `in 5 min`, `in 3 h`."""
    now = time.time() if now is None else now
    delta = usec / 1e6 - now
    if delta < 0.5:
        return "now"
    if delta < 120:
        return f"in {delta:.0f} s"
    return f"in {delta / 60:.0f} min" if delta < 7200 else f"in {delta / 3600:.0f} h"


def format_planned(usec: int, now: float | None = None) -> str:
    """`at the latest at 2026-11-29T13:00:05+01:00 (in 30 s)`, for a planned restart.

    A planned time is the latest one: the settle window ends early once mod_md is done.
    """
    return f"at the latest at {format_usec(usec)} ({format_in(usec, now)})"


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
                   interface: str = names.INTERFACE, timeout: float | None = None,
                   destination: str = names.BUS_NAME, path: str = names.OBJECT_PATH) -> list[Any]:
        """Call `member` on the broker's object (or another); the reply's body, or Failure."""
        msg = Message(destination=destination, path=path, interface=interface,
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


class CannotStart(Failure):
    """The broker's systemd unit failed to start while we waited for it to answer."""


class ActivationStalled(Failure):
    """The bus did not ask systemd to start the broker for our call (see unit_failure)."""


PROPERTIES = "org.freedesktop.DBus.Properties"
# How often, while a call waits, systemd is asked whether the broker's unit failed. The first
# look comes after one interval: a running broker answers well before.
UNIT_POLL_SECONDS = 0.5
# A unit still inactive, with no job queued, this long after our call asked the bus to start
# it: the bus is waiting on an earlier activation attempt (dbus-daemon sends systemd one
# request per pending activation, and waits for it up to its own 25 s timeout).
STALE_ACTIVATION_SECONDS = 3.0


async def unit_failure(conn: Connection, since_usec: int, now_usec: int | None = None) -> Failure | None:
    """Why the broker's unit is not coming up while a call waits for it (`since_usec`: when
    the call started), or None: also when all looks normal and where there is no systemd."""
    now_usec = int(time.time() * 1e6) if now_usec is None else now_usec

    async def systemd(member: str, arg: str, path: str, interface: str) -> Any:
        (value,) = await conn.call(member, "s", [arg], destination=names.SYSTEMD_BUS_NAME, path=path,
                                   interface=interface, timeout=5.0)
        return value

    try:
        # LoadUnit, not GetUnit: systemd unloads an inactive unit (after reset-failed, say).
        unit_path = await systemd("LoadUnit", names.BROKER_UNIT, names.SYSTEMD_PATH,
                                  names.SYSTEMD_MANAGER_INTERFACE)
        unit = await systemd("GetAll", names.SYSTEMD_UNIT_INTERFACE, unit_path, PROPERTIES)
    except Failure:  # no systemd, or no such unit: nothing to say
        return None
    state = {k: v.value for k, v in unit.items()
             if k in ("ActiveState", "SubState", "StateChangeTimestamp", "Job")}
    active, sub = state.get("ActiveState"), state.get("SubState")
    changed = int(state.get("StateChangeTimestamp", 0))
    job = state.get("Job") or (0, "/")
    if active == "inactive" and not job[0] and changed < since_usec \
            and now_usec - since_usec >= STALE_ACTIVATION_SECONDS * 1e6:
        return ActivationStalled(UNREACHABLE, "", (
            f"{names.BROKER_UNIT} is inactive and the bus has not started it (it may still wait for an "
            f"earlier attempt, up to 25 s); start it with 'systemctl start {names.BROKER_UNIT}'"))
    if not (active == "failed" and changed >= since_usec) and sub != "auto-restart":
        return None
    try:
        service = await systemd("GetAll", "org.freedesktop.systemd1.Service", unit_path, PROPERTIES)
        detail = {k: v.value for k, v in service.items() if k in ("Result", "ExecMainStatus")}
        why = f" (result {detail.get('Result', '?')}, exit status {detail.get('ExecMainStatus', '?')})"
    except Failure:
        why = ""
    return CannotStart(UNREACHABLE, "", f"{names.BROKER_UNIT} is {active}/{sub}{why}")


async def _watch_unit(conn: Connection, since_usec: int) -> None:
    while True:
        await asyncio.sleep(UNIT_POLL_SECONDS)
        failure = await unit_failure(conn, since_usec)
        if failure is not None:
            raise failure


def run(work: Callable[[Connection], Awaitable[T]], bus_address: str | None, timeout: float | None,
        watch_unit: bool = False) -> T:
    """Connect, run `work`, disconnect; all of it within `timeout` seconds (None: no limit).

    Raises Failure for every way it can go wrong, including a bus that accepts the
    connection and then says nothing. With `watch_unit`, a broker whose systemd unit fails
    to start meanwhile ends the wait at once with CannotStart (else the bus daemon answers
    only after its activation timeout).
    """

    async def whole() -> T:
        conn = await Connection.open(bus_address)
        try:
            if not watch_unit:
                return await work(conn)
            since = int(time.time() * 1e6)
            working = asyncio.ensure_future(work(conn))
            watching = asyncio.ensure_future(_watch_unit(conn, since))
            try:
                done, _ = await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                working.cancel()
                watching.cancel()
            return (working if working in done else watching).result()  # type: ignore[return-value]
        finally:
            conn.close()

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(whole(), timeout)
        except TimeoutError:
            raise Failure(TIMEOUT, "", f"no answer within {timeout:g} s") from None

    return asyncio.run(bounded())


def request_restart(md: str, bus_address: str | None, timeout: float, watch_unit: bool = False) -> int:
    """RequestGracefulRestart(md): the planned time in µs since the epoch, or Failure."""

    async def work(conn: Connection) -> int:
        body = await conn.call("RequestGracefulRestart", "s", [md])
        if len(body) != 1 or not isinstance(body[0], int) or isinstance(body[0], bool):
            # Not what the interface returns: something else owns the name, or a broken broker.
            raise Failure(INTERNAL, "", f"unexpected reply {one_line(repr(body), 80)}")
        return body[0]

    return run(work, bus_address, timeout, watch_unit)


def _exception_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
