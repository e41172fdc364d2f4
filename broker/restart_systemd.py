"""restart_via = "systemd": reload Apache's unit through systemd's D-Bus API.

This is the runner for a hardened broker: it needs no signal rights over Apache and
no write access anywhere, because systemd carries out the unit's ExecReload (on Debian
`apachectl graceful`) with the unit's own privileges.
"""

import asyncio
from collections.abc import Sequence
from typing import Any

from . import log, names
from .dbuslib import Message, MessageType
from .restart import RestartOutcome, config_test

# JobRemoved signals kept while our own reload is in flight. The reply naming our job may be
# processed after its JobRemoved, so results are recorded from the call on; other units' jobs
# finishing meanwhile are the rest, and a busy systemd must not make this grow without bound.
MAX_RECORDED_JOBS = 64


class SystemdRestarter:
    def __init__(self, bus: Any, unit: str, configtest: Sequence[str], timeout: float):
        self._bus = bus
        self._unit = unit
        self._configtest = tuple(configtest)
        self._timeout = timeout
        # Filled only while a reload of ours is in flight (see MAX_RECORDED_JOBS).
        self._finished_jobs: dict[str, str] = {}
        self._recording = False
        self._job_done = asyncio.Event()
        self._subscribed = False
        self._systemd_owner: str | None = None

    async def _call(self, path: str, interface: str, member: str, signature: str = "",
                    body: list[Any] | None = None) -> Message:
        reply = await asyncio.wait_for(self._bus.call(Message(
            destination=names.SYSTEMD_BUS_NAME, path=path, interface=interface, member=member,
            signature=signature, body=body or [])), self._timeout)
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return reply

    def _on_message(self, msg: Message) -> bool:
        # Only systemd's own connection may end a job: any other sender of a look-alike
        # signal is ignored (the bus policy lets only root send it to us, but be sure).
        if (msg.message_type == MessageType.SIGNAL and msg.member == "JobRemoved"
                and msg.interface == names.SYSTEMD_MANAGER_INTERFACE and len(msg.body) == 4
                and msg.sender is not None and msg.sender == self._systemd_owner
                and self._recording):
            _id, job, _unit, result = msg.body
            self._finished_jobs[job] = result
            while len(self._finished_jobs) > MAX_RECORDED_JOBS:
                del self._finished_jobs[next(iter(self._finished_jobs))]
            self._job_done.set()
        return False  # let others see it too

    async def _subscribe(self) -> None:
        if self._subscribed:
            return
        self._bus.add_message_handler(self._on_message)
        match = (f"type='signal',sender='{names.SYSTEMD_BUS_NAME}',"
                 f"interface='{names.SYSTEMD_MANAGER_INTERFACE}',member='JobRemoved'")
        await asyncio.wait_for(self._bus.call(Message(
            destination=names.DBUS_BUS_NAME, path=names.DBUS_PATH, interface=names.DBUS_INTERFACE,
            member="AddMatch", signature="s", body=[match])), self._timeout)
        # Subscribe asks systemd to send JobRemoved at all; without it only clients that
        # subscribed get them.
        await self._call(names.SYSTEMD_PATH, names.SYSTEMD_MANAGER_INTERFACE, "Subscribe")
        self._subscribed = True

    async def _active_state(self) -> str:
        reply = await self._call(names.SYSTEMD_PATH, names.SYSTEMD_MANAGER_INTERFACE, "GetUnit", "s",
                                 [self._unit])
        unit_path = reply.body[0]
        reply = await self._call(unit_path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                 [names.SYSTEMD_UNIT_INTERFACE, "ActiveState"])
        return str(reply.body[0].value)

    async def restart(self) -> RestartOutcome:
        try:
            state = await self._active_state()
        except Exception as e:
            log.warning(f"systemd: state of {self._unit} unknown: {e}")
            return RestartOutcome(False, False, f"{self._unit} is not running (systemd knows no active unit)")
        if state not in ("active", "reloading"):
            return RestartOutcome(False, False, f"apache is not running ({self._unit} is {state})")
        refused = await config_test(self._configtest, self._timeout)
        if refused is not None:
            return refused
        self._recording = True
        try:
            return await self._reload()
        finally:
            self._recording = False
            self._finished_jobs.clear()

    async def _reload(self) -> RestartOutcome:
        try:
            await self._subscribe()
            owner = await asyncio.wait_for(self._bus.call(Message(
                destination=names.DBUS_BUS_NAME, path=names.DBUS_PATH, interface=names.DBUS_INTERFACE,
                member="GetNameOwner", signature="s", body=[names.SYSTEMD_BUS_NAME])), self._timeout)
            if owner.message_type == MessageType.ERROR:
                raise RuntimeError(f"{owner.error_name}: systemd is not on the bus")
            self._systemd_owner = owner.body[0]
            reply = await self._call(names.SYSTEMD_PATH, names.SYSTEMD_MANAGER_INTERFACE, "ReloadUnit",
                                     "ss", [self._unit, "replace"])
        except Exception as e:
            log.err(f"systemd: ReloadUnit({self._unit}) failed: {e}")
            return RestartOutcome(False, False, f"systemd refused to reload {self._unit}")
        job = reply.body[0]
        log.info(f"systemd: reloading {self._unit} as job {job}")
        try:
            job_result = await asyncio.wait_for(self._wait_job(job), self._timeout)
        except TimeoutError:
            return RestartOutcome(True, False, f"reload of {self._unit} did not finish within {self._timeout:g} s")
        if job_result != "done":
            return RestartOutcome(True, False, f"reload of {self._unit} ended with result {job_result!r}")
        return RestartOutcome(True, True, f"{self._unit} reloaded")

    async def _wait_job(self, job: str) -> str:
        while job not in self._finished_jobs:
            self._job_done.clear()
            await self._job_done.wait()
        return self._finished_jobs.pop(job)
