"""Who is calling, and may they: the one place where callers are authorized.

Every method of the broker's interface passes through `Authorizer.authorize` before any
state changes. polkit is asked about the caller's unique bus name (the `system-bus-name`
subject, as systemd does: polkit resolves it to a process and user itself, which avoids
the pid-reuse race of a `unix-process` subject). Any failure to get a clear "yes" is a
refusal: polkit missing, slow, erroring or answering something odd all fail closed.

Under a burst of calls from one connection, every call's round trips go through the bus
daemon behind the burst itself, so each one costs the caller: a connection's uid is asked
once (a unique name is never given to another connection for the bus's lifetime), and
calls that need the same polkit question while it is being asked share its answer, which
is exactly what they would have got had they asked at that moment. Answers are not kept
beyond that: the next call asks polkit again.
"""

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from . import log, names
from .dbuslib import Message, MessageType, Variant
from .errors import AccessDenied

# polkit's CheckAuthorization flag: the caller may be asked for a password.
_POLKIT_ALLOW_USER_INTERACTION = 0x1
# Connections whose uid is remembered; the oldest is forgotten first (and asked again).
UID_CACHE_SIZE = 4096

T = TypeVar("T")


@dataclass(frozen=True)
class Caller:
    bus_name: str
    uid: int


class Authorizer:
    def __init__(self, bus, timeout: float, allow_interactive: bool = False):
        self._bus = bus
        self._timeout = timeout
        self._allow_interactive = allow_interactive
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._asking: dict[tuple[str, ...], asyncio.Future] = {}

    async def _shared(self, key: tuple[str, ...], ask: Callable[[], Awaitable[T]]) -> T:
        """The answer of the same question already being asked, or ask it now."""
        future = self._asking.get(key)
        if future is None:
            future = asyncio.ensure_future(ask())
            self._asking[key] = future
            future.add_done_callback(lambda f: self._forget(key, f))
        # One waiter giving up (its caller went away) must not cancel the others' question.
        return await asyncio.shield(future)

    def _forget(self, key: tuple[str, ...], future: asyncio.Future) -> None:
        if self._asking.get(key) is future:
            del self._asking[key]
        if not future.cancelled():
            future.exception()  # seen here, so an answer nobody awaits any more is no warning

    async def _call(self, msg: Message) -> Message:
        reply = await asyncio.wait_for(self._bus.call(msg), self._timeout)
        if reply.message_type == MessageType.ERROR:
            raise _CallFailed(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return reply

    async def caller_uid(self, bus_name: str) -> int:
        """The caller's uid, from the bus daemon (needed for per-user rate limits and root's override)."""
        uid = self._uids.get(bus_name)
        if uid is not None:
            self._uids.move_to_end(bus_name)
            return uid
        uid = await self._shared(("uid", bus_name), lambda: self._ask_uid(bus_name))
        # Only unique names (":1.42") stay with one connection; a well-known name can move.
        if bus_name.startswith(":"):
            self._uids[bus_name] = uid
            self._uids.move_to_end(bus_name)
            while len(self._uids) > UID_CACHE_SIZE:
                self._uids.popitem(last=False)
        return uid

    async def _ask_uid(self, bus_name: str) -> int:
        reply = await self._call(Message(
            destination=names.DBUS_BUS_NAME, path=names.DBUS_PATH, interface=names.DBUS_INTERFACE,
            member="GetConnectionUnixUser", signature="s", body=[bus_name]))
        uid = reply.body[0]
        if not isinstance(uid, int):
            raise _CallFailed("GetConnectionUnixUser returned no uid")
        return uid

    async def _check_authorization(self, bus_name: str, action: str, flags: int) -> tuple[bool, bool]:
        reply = await self._call(Message(
            destination=names.POLKIT_BUS_NAME, path=names.POLKIT_PATH,
            interface=names.POLKIT_INTERFACE, member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[["system-bus-name", {"name": Variant("s", bus_name)}], action, {}, flags, ""]))
        result = reply.body[0]
        return bool(result[0]), bool(result[1])

    async def authorize(self, bus_name: str, action: str, interactive: bool,
                        refusal: str = "not authorized to request a restart of Apache") -> Caller:
        """Raise AccessDenied unless polkit says yes for `bus_name`; returns who it is."""
        try:
            uid = await self.caller_uid(bus_name)
            flags = _POLKIT_ALLOW_USER_INTERACTION if (interactive and self._allow_interactive) else 0
            authorized, challenge = await self._shared(
                ("polkit", bus_name, action, str(flags)),
                lambda: self._check_authorization(bus_name, action, flags))
        except TimeoutError:
            log.warning(f"authorization of {bus_name}: polkit did not answer within {self._timeout:g} s")
            raise AccessDenied("authorization could not be checked (polkit did not answer)") from None
        except _CallFailed as e:
            log.warning(f"authorization of {bus_name}: {e}")
            raise AccessDenied("authorization could not be checked") from None
        except Exception as e:  # a malformed answer or a lost connection: fail closed
            log.warning(f"authorization of {bus_name}: unexpected failure: {type(e).__name__}: {e}")
            raise AccessDenied("authorization could not be checked") from None
        if not authorized:
            log.notice(f"refused {bus_name} (uid {uid}): polkit did not authorize {action}"
                       + (" (would need interactive authentication)" if challenge else ""))
            raise AccessDenied(refusal)
        return Caller(bus_name, uid)

    async def require_root_or(self, bus_name: str, action: str, interactive: bool, refusal: str) -> Caller:
        """Root, or whoever polkit grants `action` (the monitoring group reads the status).

        Root is answered without polkit, as before this action existed: polkit always says yes
        to root, and the admin's status must not depend on polkit running.
        """
        try:
            uid = await self.caller_uid(bus_name)
        except Exception as e:
            log.warning(f"could not identify {bus_name}: {e}")
            raise AccessDenied("caller could not be identified") from None
        if uid == 0:
            return Caller(bus_name, uid)
        return await self.authorize(bus_name, action, interactive, refusal)

    async def require_root(self, bus_name: str) -> Caller:
        """For administrative methods: the bus policy already limits them to root; check again here."""
        try:
            uid = await self.caller_uid(bus_name)
        except Exception as e:
            log.warning(f"could not identify {bus_name}: {e}")
            raise AccessDenied("caller could not be identified") from None
        if uid != 0:
            log.notice(f"refused {bus_name} (uid {uid}): administrative method needs root")
            raise AccessDenied("only root may do this")
        return Caller(bus_name, uid)


class _CallFailed(Exception):
    pass
