"""The D-Bus adapter: decode, authorize, call the core, map errors. Nothing else.

Calls to our interface's methods are taken from the bus in a message handler that runs
before the library's own dispatch, because neither dbus-next nor dbus-fast tells a
`@method` who called it and authorization needs the caller's unique name. The
`ServiceInterface` stays exported for introspection, properties and signals; its method
stubs only document the signatures and are never reached.

No reply ever carries a traceback or an internal path: every exception is logged here
and answered with a named error and a short sentence.
"""

import asyncio
import json
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from . import log, names
from .authz import Authorizer, Caller
from .dbuslib import (
    FLAG_ALLOW_INTERACTIVE_AUTHORIZATION,
    FLAG_NO_REPLY_EXPECTED,
    Message,
    MessageType,
    Node,
    PropertyAccess,
    ServiceInterface,
    dbus_property,
    method,
    signal,
)
from .engine import Engine
from .errors import BrokerError, InvalidArguments, RateLimited
from .text import safe
from .timefmt import usec_iso


INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class ApacheRestartInterface(ServiceInterface):
    """org.masysma.ApacheRestart, as introspection, properties and signals show it."""

    # Neither library names out-arguments or signal arguments; the interface XML does, and
    # live introspection must agree with it.
    _OUT_ARG_NAMES = {
        "RequestGracefulRestart": ["planned_usec"],
        "GetStatus": ["status_json"],
        "CheckAll": ["names", "planned_usec"],
        "DryRunRequest": ["planned_usec"],
        "SelfTest": ["report_json"],
        "RestartFinished": ["ok", "detail", "names"],
    }

    def __init__(self, engine: Engine):
        super().__init__(names.INTERFACE)
        self._engine = engine

    def introspect(self) -> Any:
        intro = super().introspect()
        for member, args in [(m.name, m.out_args) for m in intro.methods] + [
                (s.name, s.args) for s in intro.signals]:
            for arg, arg_name in zip(args, self._OUT_ARG_NAMES.get(member, [])):
                arg.name = arg_name
        return intro

    # The method bodies never run: ApacheRestartService.handle_message answers these calls.
    @method()
    def RequestGracefulRestart(self, name: "s") -> "t":  # type: ignore[name-defined]  # noqa: F821
        raise RuntimeError("dispatched by ApacheRestartService")

    @method()
    def GetStatus(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        raise RuntimeError("dispatched by ApacheRestartService")

    @method()
    def CheckAll(self) -> "ast":  # type: ignore[name-defined]  # noqa: F821
        raise RuntimeError("dispatched by ApacheRestartService")

    @method()
    def DryRunRequest(self, name: "s") -> "t":  # type: ignore[name-defined]  # noqa: F821
        raise RuntimeError("dispatched by ApacheRestartService")

    @method()
    def SelfTest(self, name: "s") -> "s":  # type: ignore[name-defined]  # noqa: F821
        raise RuntimeError("dispatched by ApacheRestartService")

    # Getters answer from what was last announced: they cannot fail (dbus-next would send
    # a traceback for an exception here) and always agree with PropertiesChanged.
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        return self._engine.announced["Version"]

    @dbus_property(access=PropertyAccess.READ)
    def Pending(self) -> "b":  # type: ignore[name-defined]  # noqa: F821
        return self._engine.announced["Pending"]

    @dbus_property(access=PropertyAccess.READ)
    def PlannedAt(self) -> "t":  # type: ignore[name-defined]  # noqa: F821
        return self._engine.announced["PlannedAt"]

    @dbus_property(access=PropertyAccess.READ)
    def LastRestart(self) -> "t":  # type: ignore[name-defined]  # noqa: F821
        return self._engine.announced["LastRestart"]

    @dbus_property(access=PropertyAccess.READ)
    def LastResult(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        return safe(self._engine.announced["LastResult"])

    @signal()
    def RestartFinished(self, ok: bool, detail: str, names: list[str]) -> "bsas":  # type: ignore[name-defined]  # noqa: F821
        # The engine escapes already; this is the exit, so it is made sure of here too.
        return [ok, safe(detail), [safe(n) for n in names]]


class ApacheRestartService:
    def __init__(self, bus: Any, engine: Engine, authorizer: Authorizer, max_in_flight: int):
        self.bus = bus
        self.engine = engine
        self.authorizer = authorizer
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.interface = ApacheRestartInterface(engine)
        self._tasks: set[asyncio.Task[None]] = set()
        self._methods: dict[str, tuple[str, Callable[[Message], Awaitable[tuple[str, list[Any]]]]]] = {
            "RequestGracefulRestart": ("s", self._request_graceful_restart),
            "GetStatus": ("", self._get_status),
            "CheckAll": ("", self._check_all),
            "DryRunRequest": ("s", self._dry_run_request),
            "SelfTest": ("s", self._self_test),
        }
        engine.on_properties_changed = self._properties_changed
        engine.on_restart_finished = self.interface.RestartFinished

    def export(self) -> None:
        self.bus.export(names.OBJECT_PATH, self.interface)
        self.bus.add_message_handler(self.handle_message)

    def _properties_changed(self, changed: dict[str, Any]) -> None:
        self.interface.emit_properties_changed(
            {k: safe(v) if isinstance(v, str) else v for k, v in changed.items()})

    # -- dispatch ------------------------------------------------------------------------

    def handle_message(self, msg: Message) -> bool:
        """Claim calls to our interface's methods; everything else goes to the library."""
        if (msg.message_type == MessageType.METHOD_CALL and msg.path == names.OBJECT_PATH
                and msg.interface in (None, "", INTROSPECTABLE) and msg.member == "Introspect"
                and msg.signature == ""):
            self._introspect(msg)
            return True
        # A call may leave out the interface (the specification allows it): claim those too,
        # or the library would dispatch them to the stubs, past authorization.
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != names.OBJECT_PATH
                or msg.interface not in (None, "", names.INTERFACE) or msg.member not in self._methods):
            return False
        signature, handler = self._methods[msg.member]
        if msg.signature != signature:
            self._reply_error(msg, InvalidArguments(
                f"{msg.member} takes ({signature}), got ({msg.signature})"))
            return True
        if self.in_flight >= self.max_in_flight:
            # Refused before anything else happens: a burst must not pile up polkit calls
            # (each one counts against the bus daemon's pending-reply limit for us).
            self._reply_error(msg, RateLimited("the broker is busy; try again later"))
            return True
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._answer(msg, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, msg: Message,
                      handler: Callable[[Message], Awaitable[tuple[str, list[Any]]]]) -> None:
        try:
            signature, body = await handler(msg)
            self._send(msg, Message.new_method_return(msg, signature, body))
        except BrokerError as e:
            self._reply_error(msg, e)
        except Exception:
            log.err(f"internal error answering {msg.member} from {msg.sender}: "
                    + traceback.format_exc())
            self._send(msg, Message.new_error(msg, names.ERROR_INTERNAL,
                                              "internal error in the broker; see its log"))
        finally:
            self.in_flight -= 1

    def _introspect(self, msg: Message) -> None:
        # The libraries list org.freedesktop.DBus.ObjectManager too, which the bus policy lets
        # nobody call: introspection shows only what a caller may use (policy permitting).
        node = Node.default(names.OBJECT_PATH)
        node.interfaces = [i for i in node.interfaces if i.name != OBJECT_MANAGER]
        node.interfaces.append(self.interface.introspect())
        self._send(msg, Message.new_method_return(msg, "s", [node.tostring()]))

    def _reply_error(self, msg: Message, e: BrokerError) -> None:
        self._send(msg, Message.new_error(msg, names.error_name(e.code), safe(e.message)))

    def _send(self, msg: Message, reply: Message) -> None:
        if int(msg.flags) & FLAG_NO_REPLY_EXPECTED:
            return
        try:
            self.bus.send(reply)
        except Exception as e:  # the connection is going away; main notices and exits
            log.warning(f"could not send reply to {msg.sender}: {e}")

    # -- methods -------------------------------------------------------------------------

    async def _authorize(self, msg: Message) -> Caller:
        interactive = bool(int(msg.flags) & FLAG_ALLOW_INTERACTIVE_AUTHORIZATION)
        return await self.authorizer.authorize(msg.sender, names.POLKIT_ACTION, interactive)

    async def _request_graceful_restart(self, msg: Message) -> tuple[str, list[Any]]:
        caller = await self._authorize(msg)
        (md,) = msg.body
        try:
            planned = await self.engine.request(md, caller.uid)
        except BrokerError as e:
            log.info(f"request from uid {caller.uid} for {md[:300]!r} refused: {e.code}: {e.message}")
            raise
        log.info(f"request from uid {caller.uid} for {md} accepted, restart planned "
                 f"at the latest at {usec_iso(planned)}")
        return "t", [planned]

    async def _get_status(self, msg: Message) -> tuple[str, list[Any]]:
        interactive = bool(int(msg.flags) & FLAG_ALLOW_INTERACTIVE_AUTHORIZATION)
        await self.authorizer.require_root_or(msg.sender, names.POLKIT_ACTION_READ_STATUS, interactive,
                                              "not authorized to read the status")
        # json.dumps escapes every control and non-ASCII character (ensure_ascii).
        return "s", [json.dumps(await self.engine.status_probed(), sort_keys=True)]

    async def _check_all(self, msg: Message) -> tuple[str, list[Any]]:
        await self.authorizer.require_root(msg.sender)
        scheduled, planned = await self.engine.check()
        log.info(f"check of every MD: {len(scheduled)} scheduled" + (f" ({', '.join(scheduled)})" if scheduled else ""))
        return "ast", [scheduled, planned]

    async def _dry_run_request(self, msg: Message) -> tuple[str, list[Any]]:
        # Authorized exactly like RequestGracefulRestart: this is what `apache-restart test`
        # sends as the Apache user to see the hook's path through the bus policy and polkit.
        caller = await self._authorize(msg)
        (md,) = msg.body
        planned = await self.engine.dry_run(md, caller.uid)
        log.info(f"dry run from uid {caller.uid} for {md}: a request would be planned at the latest "
                 f"at {usec_iso(planned)}")
        return "t", [planned]

    async def _self_test(self, msg: Message) -> tuple[str, list[Any]]:
        await self.authorizer.require_root(msg.sender)
        (md,) = msg.body
        return "s", [json.dumps(await self.engine.self_test(md), sort_keys=True)]
