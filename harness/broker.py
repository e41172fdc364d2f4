"""The real broker in the harness's stack, the real hook as mod_md's MDMessageCmd, and a bus watcher.

    with running_stack(StackOptions(with_broker=True)) as stack:
        stack.broker.watcher.wait_for(lambda e: e.member == "RestartFinished", 30)

``BrokerHarness`` writes the broker's TOML (``restart_via = "command"``, Apache's own
``apache2 -f FILE -t`` / ``-k graceful``, its pid file, a TLS probe on the HTTPS port, short
settle and interval times, a state folder inside the run's directory) and gives the stack a
``ProcessSpec`` that starts ``python -m broker.main`` on the private bus. The graceful command is
wrapped in a small script that notes the time of every graceful restart the broker issues, so
tests can count them. ``hook_argv`` is the MDMessageCmd: the installed ``apache-restart-hook``
beside the running interpreter, with ``--bus-address``; mod_md runs it as www-data.

``BusWatcher`` is a root connection to the private bus in a thread of its own: it records the
broker's signals (PropertiesChanged, RestartFinished) with the time they arrived, and makes
calls (GetStatus, CheckAll, properties) for tests and the demo.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from broker.names import BUS_NAME, INTERFACE, OBJECT_PATH

from . import busutil
from .apache import Apache
from .bus import name_has_owner
from .procs import HarnessError, ManagedProcess, ProcessSpec, make_dir, write_file

if TYPE_CHECKING:
    from .node import Node


class Stack(Protocol):
    """What the broker harness uses of the stack that runs it (harness/stack.py's Stack, which
    builds it): a protocol, so that stack.py imports this module and this one not stack.py."""

    root: Path
    apache: Apache | None
    processes: dict[str, ManagedProcess]

    @property
    def bus_address(self) -> str: ...

    @property
    def https_address(self) -> str: ...

    @property
    def log_dir(self) -> Path: ...

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]: ...

    def on_stop(self, fn: Callable[[], object]) -> None: ...

    def start_process(self, name: str) -> None: ...

    def stop_process(self, name: str) -> None: ...

HOOK_PROGRAM = "apache-restart-hook"
APACHE_USER = "www-data"

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Notes the time of each graceful restart, then becomes the real command. The broker runs it with
# its fixed environment (PATH and LC_ALL only), so nothing here depends on the caller's.
GRACEFUL_COUNTER = """#!/bin/sh
# Written by the apache-restart-broker test harness: one line per graceful restart the broker
# issues (epoch seconds), then the real command.
printf '%s\\n' "$(date +%s.%N)" >> {log}
exec "$@"
"""


@dataclass
class BrokerOptions:
    """What the harness puts into the broker's TOML; ``extra`` adds or overrides any key."""

    # The cap on the settle window: mod_md's "notified-renewed" (plus a quiet second) usually
    # ends it much earlier; the cap must outlast mod_md renewing several MDs one by one.
    settle_seconds: float = 8.0
    min_interval_seconds: float = 2.0
    verify_timeout_seconds: float = 10.0
    probe: bool = True  # probe the stack's HTTPS port after each restart
    count_gracefuls: bool = True  # wrap graceful_command in the counting script
    extra: Mapping[str, Any] = field(default_factory=dict)
    hook_timeout: float | None = None  # the hook's --timeout (None: its default)


def hook_program() -> Path:
    """The installed hook beside the running interpreter (a venv's bin folder)."""
    return Path(sys.executable).parent / HOOK_PROGRAM


def _check_hook_runs_as_apache_user(hook: Path, env: Mapping[str, str]) -> None:
    """mod_md runs the hook as www-data: its interpreter and the project must be readable there."""
    if not hook.is_file() or not os.access(hook, os.X_OK):
        raise HarnessError(
            f"{hook} is missing: install the project into the interpreter's environment "
            "(pip install .) so that its apache-restart-hook entry point exists"
        )
    try:
        user = pwd.getpwnam(APACHE_USER)
    except KeyError:
        raise HarnessError(f"user {APACHE_USER} does not exist (Debian package apache2 creates it)") from None
    check = subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import client.hook, client.call",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=dict(env),
        cwd="/",
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    if check.returncode != 0:
        raise HarnessError(
            f"{APACHE_USER} cannot run the hook's interpreter {sys.executable} with the project "
            f"(every folder on the way must be readable by other users): {check.stderr.strip()[-500:]}"
        )


class BrokerHarness:
    """The broker of one stack: its config, process spec, logs, graceful count and bus watcher."""

    def __init__(self, stack: Stack, options: BrokerOptions | None = None, node: Node | None = None) -> None:
        self.stack = stack
        # Another node of a cluster (harness/node.py): its own Apache, bus and process name.
        self.node = node
        self.name = "broker" if node is None else f"broker-{node.name}"
        self.options = options or BrokerOptions()
        self.dir = stack.root / self.name
        self.config_path = self.dir / "broker.toml"
        self.state_dir = self.dir / "state"
        self.graceful_log = self.dir / "gracefuls.log"
        self.graceful_script = self.dir / "graceful-counter"
        self.trust_anchors = self.dir / "trust-anchors.pem"
        self.watcher: BusWatcher | None = None

    # -- which node ----------------------------------------------------------------------------

    @property
    def apache(self) -> Any:
        return self.stack.apache if self.node is None else self.node.apache

    @property
    def bus_address(self) -> str:
        return self.stack.bus_address if self.node is None else self.node.bus_address

    @property
    def https_address(self) -> str:
        return self.stack.https_address if self.node is None else self.node.https_address

    # -- configuration -------------------------------------------------------------------------

    def hook_argv(self) -> list[str]:
        """MDMessageCmd: the real hook on the stack's bus (mod_md appends REASON NAME)."""
        argv = [str(hook_program()), "--bus-address", self.bus_address]
        if self.options.hook_timeout is not None:
            argv += ["--timeout", f"{self.options.hook_timeout:g}"]
        return argv

    def config_values(self) -> dict[str, Any]:
        apache = self.apache
        if apache is None:
            raise HarnessError("the broker's config needs Apache's (write it first)")
        o = self.options
        graceful = list(apache.graceful_command)
        if o.count_gracefuls:
            graceful = [str(self.graceful_script), *graceful]
        values: dict[str, Any] = {
            "md_store": str(apache.store_dir),
            "restart_via": "command",
            "configtest_command": list(apache.configtest_command),
            "graceful_command": graceful,
            "pid_file": str(apache.pid_file),
            "settle_seconds": float(o.settle_seconds),
            "min_interval_seconds": float(o.min_interval_seconds),
            "verify_timeout_seconds": float(o.verify_timeout_seconds),
            "probe": [self.https_address] if o.probe else [],
            "state_dir": str(self.state_dir),
            "command_timeout_seconds": 30.0,
            # pebble's root alone (new at each start): its chains must verify up to it through
            # the intermediate that mod_md stages with the leaf.
            "trust_anchors": [str(self.trust_anchors)],
        }
        values.update(o.extra)
        return values

    def write_config(self) -> Path:
        make_dir(self.dir)
        make_dir(self.state_dir, 0o700)
        if self.options.count_gracefuls:
            write_file(self.graceful_log, "")
            script = GRACEFUL_COUNTER.format(log=shlex.quote(str(self.graceful_log)))
            write_file(self.graceful_script, script, mode=0o755)
        pebble = self.stack.pebble
        if pebble is None:
            raise HarnessError("the broker's trust anchors are pebble's roots (start pebble first)")
        write_file(self.trust_anchors, pebble.root_pem())
        header = "# Written by the apache-restart-broker test harness."
        return write_file(self.config_path, busutil.config_text(self.config_values(), header))

    # -- the process ---------------------------------------------------------------------------

    def argv(self, stack: Stack) -> list[str]:
        return [
            sys.executable,
            "-m",
            "broker.main",
            "--config",
            str(self.config_path),
            "--bus-address",
            self.bus_address,
        ]

    def env(self, stack: Stack) -> dict[str, str]:
        # The broker runs from this source tree (as root it can read it wherever it is).
        env = {"PYTHONPATH": str(PROJECT_ROOT)}
        lib = os.environ.get("APACHE_RESTART_DBUS_LIB")
        if lib:
            env["APACHE_RESTART_DBUS_LIB"] = lib
        return env

    def prepare(self, stack: Stack) -> None:
        _check_hook_runs_as_apache_user(hook_program(), stack.env())
        self.write_config()
        self.watcher = BusWatcher(self.bus_address)
        stack.on_stop(self.watcher.close)
        self.watcher.start()

    def ready(self, stack: Stack) -> bool:
        return name_has_owner(self.bus_address, BUS_NAME)

    def spec(self) -> ProcessSpec[Stack]:
        return ProcessSpec(
            self.name,
            self.argv,
            env=self.env,
            prepare=self.prepare,
            ready=self.ready,
            ready_timeout=15.0,
            # A stopping broker lets a running restart finish its verification first.
            stop_timeout=self.options.verify_timeout_seconds + 5.0,
        )

    def start(self) -> None:
        """Bring the broker back after ``stop`` (same config, same state folder)."""
        self.stack.start_process(self.name)

    def stop(self) -> None:
        self.stack.stop_process(self.name)

    def running(self) -> bool:
        proc = self.stack.processes.get(self.name)
        return proc is not None and proc.running()

    # -- what it did ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.stack.log_dir / f"{self.name}.log"

    def log_lines(self) -> list[str]:
        """The broker's log without the sd-daemon priority prefixes."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [re.sub(r"^<\d>", "", line) for line in text.splitlines()]

    def gracefuls(self) -> list[float]:
        """Epoch times of the graceful restarts the broker issued (needs ``count_gracefuls``)."""
        try:
            text = self.graceful_log.read_text()
        except OSError:
            return []
        return [float(line) for line in text.split()]

    def wait_gracefuls(self, count: int, timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        while len(self.gracefuls()) < count:
            if time.monotonic() > deadline:
                raise HarnessError(f"expected {count} graceful restart(s), saw {len(self.gracefuls())}")
            time.sleep(0.05)
        return self.gracefuls()

    def admin(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """The admin command (``apache-restart``) as root on the stack's bus."""
        return subprocess.run(
            [sys.executable, "-m", "client.admin", "--bus-address", self.bus_address, *args],
            check=False,
            capture_output=True,
            text=True,
            env={**self.stack.env(), "PYTHONPATH": str(PROJECT_ROOT)},
            cwd=str(PROJECT_ROOT),
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        """``apache-restart status --json``: the broker's GetStatus."""
        result = self.admin("status", "--json")
        if result.returncode != 0:
            raise HarnessError(f"apache-restart status failed ({result.returncode}): {result.stderr.strip()}")
        data = json.loads(result.stdout)
        assert isinstance(data, dict)
        return data


# -- the bus watcher ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BusEvent:
    """One signal of the broker, with the (epoch) time it arrived here."""

    time: float
    member: str  # "PropertiesChanged" or "RestartFinished"
    values: dict[str, Any]  # changed properties, or ok/detail/names

    @property
    def ok(self) -> bool | None:
        return self.values.get("ok") if self.member == "RestartFinished" else None


class BusWatcher:
    """A root connection to the stack's bus in its own thread: records the broker's signals."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.events: list[BusEvent] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._bus: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bus-watcher", daemon=True)
        self.listeners: list[Callable[[BusEvent], None]] = []

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise HarnessError("the bus watcher did not connect in time")
        if self._error is not None:
            raise HarnessError(f"the bus watcher could not connect: {self._error}")

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        from broker import dbuslib

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self._bus = await dbuslib.connect(self.address)
            self._bus.add_message_handler(self._on_message)
            await self._call(
                "AddMatch",
                "s",
                [f"type='signal',path='{OBJECT_PATH}'"],
                10.0,
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
            )
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._bus.disconnect()

    def _on_message(self, msg: Any) -> bool:
        from broker.dbuslib import MessageType

        if msg.message_type != MessageType.SIGNAL or msg.path != OBJECT_PATH:
            return False
        now = time.time()
        if msg.member == "PropertiesChanged" and msg.body and msg.body[0] == INTERFACE:
            event = BusEvent(now, "PropertiesChanged", {k: busutil.plain(v) for k, v in msg.body[1].items()})
        elif msg.member == "RestartFinished" and len(msg.body) == 3:
            ok, detail, names = msg.body
            event = BusEvent(now, "RestartFinished", {"ok": bool(ok), "detail": detail, "names": list(names)})
        else:
            return False
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                pass
        return False

    async def _call(self, member: str, signature: str, body: Sequence[Any], timeout: float,
                    **where: str) -> list[Any]:
        reply = await busutil.call(self._bus, member, signature, list(body), timeout=timeout, **where)
        error = busutil.error_of(reply)
        if error:
            raise BusCallError(*error)
        return [busutil.plain(v) for v in reply.body]

    def call(self, member: str, signature: str = "", body: Sequence[Any] = (), *, timeout: float = 15.0,
             **where: str) -> list[Any]:
        """A method call on the broker (as root); BusCallError for an error reply."""
        if self._loop is None:
            raise HarnessError("the bus watcher is not running")
        future = asyncio.run_coroutine_threadsafe(self._call(member, signature, body, timeout, **where),
                                                  self._loop)
        return future.result(timeout)

    def properties(self) -> dict[str, Any]:
        (props,) = self.call("GetAll", "s", [INTERFACE], interface="org.freedesktop.DBus.Properties")
        return {k: busutil.plain(v) for k, v in props.items()}

    def get_status(self) -> dict[str, Any]:
        (text,) = self.call("GetStatus")
        data = json.loads(text)
        assert isinstance(data, dict)
        return data

    def check_all(self) -> tuple[list[str], int]:
        names, planned = self.call("CheckAll")
        return list(names), int(planned)

    def request(self, md: str) -> int:
        """RequestGracefulRestart as root (what ``apache-restart request`` does)."""
        (planned,) = self.call("RequestGracefulRestart", "s", [md])
        return int(planned)

    # -- waiting for signals -------------------------------------------------------------------

    def snapshot(self) -> int:
        """A mark: wait_for(..., since=mark) looks only at events after it."""
        with self._cond:
            return len(self.events)

    def wait_for(
        self, predicate: Callable[[BusEvent], bool], timeout: float, since: int = 0, what: str = "a signal"
    ) -> BusEvent:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(f"timed out after {timeout:g} s waiting for {what}; got {self.events[since:]}")
                self._cond.wait(remaining)

    def restart_finished(self, timeout: float, since: int = 0) -> BusEvent:
        return self.wait_for(lambda e: e.member == "RestartFinished", timeout, since, "RestartFinished")

    def finished_events(self, since: int = 0) -> list[BusEvent]:
        with self._cond:
            return [e for e in self.events[since:] if e.member == "RestartFinished"]


class BusCallError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


# -- what the hook left in Apache's error log -----------------------------------------------------

# "[Sat Nov 29 12:04:05.123456 2025] [md:info] [pid 1234:tid 5678] ... apache-restart-hook: renewed ..."
_ERROR_LOG_TIME = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d)\.(\d{6}) (\d{4})\]")


@dataclass(frozen=True)
class HookLine:
    time: float  # epoch seconds (when mod_md logged the hook's output, i.e. as the hook ended)
    text: str  # what the hook printed, after "apache-restart-hook: "

    @property
    def reason(self) -> str:
        return self.text.split(" ", 1)[0]

    @property
    def md(self) -> str:
        parts = self.text.split(" ", 2)
        return parts[1].rstrip(":") if len(parts) > 1 else ""


def parse_error_log_time(line: str) -> float | None:
    match = _ERROR_LOG_TIME.match(line)
    if not match:
        return None
    stamp = datetime.datetime.strptime(f"{match.group(1)} {match.group(3)}", "%a %b %d %H:%M:%S %Y")
    # Apache writes local time, as does this process's time zone (same machine, same TZ).
    return time.mktime(stamp.timetuple()) + int(match.group(2)) / 1e6


def hook_lines(error_log: Path) -> list[HookLine]:
    """The hook's lines as mod_md logged them (its stderr, at LogLevel md:info)."""
    found = []
    try:
        text = error_log.read_text(errors="replace")
    except OSError:
        return []
    marker = f"{HOOK_PROGRAM}: "
    for line in text.splitlines():
        at = line.find(marker)
        if at < 0:
            continue
        when = parse_error_log_time(line)
        if when is not None:
            # mod_md logs the hook's stderr with its newline escaped ("...\\n").
            text = line[at + len(marker) :].strip().removesuffix("\\n").strip()
            found.append(HookLine(when, text))
    return found
