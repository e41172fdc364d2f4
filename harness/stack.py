"""The whole test stack in one context manager: pebble, a private bus, polkitd, extra processes
(the broker) and Apache, inside one temporary directory, torn down in reverse.

    with running_stack(StackOptions(domains=[["www.example.test"]])) as stack:
        stack.apache.wait_staged("www.example.test")

Start order: pebble → bus → polkitd → ``processes`` (before Apache, so the broker is up before
mod_md's first hook call) → Apache → ``processes`` marked ``after_apache``. Every piece registers
its stop on an ExitStack as soon as it started, so a failure half-way, an exception in the body or
a KeyboardInterrupt stops exactly what was started; a SIGINT that arrives during the teardown is
held back until the teardown is over. Last, anything still carrying the run's marker in its
environment is killed and listed in ``stack.leftovers`` (tests assert that stays empty).

Other processes are passed as a ``ProcessSpec`` whose argv, environment and preparation are
functions of the started ``Stack`` (bus address, Apache's commands, store dir). The broker is one:
``with_broker=True`` has harness/broker.py build its spec and make the real hook MDMessageCmd.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .apache import Apache, ApacheSettings
from .broker import BrokerHarness, BrokerOptions
from .bus import Polkitd, PrivateBus
from .pebble import Pebble
from .procs import (
    ProcessSpec,
    HarnessError,
    ManagedProcess,
    free_ports,
    harness_env,
    kill_marked,
    make_dir,
    tail,
    wait_for,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_files(pattern: str) -> list[Path]:
    """The project's deployment files matching ``pattern`` (e.g. "polkit/*.rules"), sorted."""
    return sorted(PROJECT_ROOT.glob(pattern))


@dataclass
class StackOptions:
    domains: Sequence[Sequence[str]] = (("www.example.test",),)
    validity_seconds: int | None = None  # pebble's certificateValidityPeriod
    with_bus: bool = True
    with_polkit: bool = True  # needs the bus
    # None: the project's own files (dbus/*.conf, polkit/*.policy, polkit/*.rules).
    bus_policy_files: Sequence[Path] | None = None
    polkit_actions: Sequence[Path] | None = None
    polkit_rules: Sequence[Path] | None = None
    message_cmd: Sequence[str] | Callable[[Stack], Sequence[str]] | None = None  # MDMessageCmd argv
    renew_window: str | None = None
    private_keys: str | None = None
    renew_mode: str | None = None  # MDRenewMode (a cluster's renewing node: "auto")
    store_locks: str | None = None  # MDStoreLocks (clusters sharing one store: "on")
    apache_log_level: str = "warn md:info"
    apache_extra_config: str = ""
    start_apache: bool = True
    processes: Sequence[ProcessSpec[Stack]] = ()
    # The real broker on the bus (started before Apache) and, unless message_cmd is given, the
    # real hook as MDMessageCmd; see harness/broker.py. broker_options: a BrokerOptions.
    with_broker: bool = False
    broker_options: BrokerOptions | None = None
    base_dir: Path | None = None  # where the run's directory is made (default: the system's temp dir)
    keep: bool = False  # keep the run's directory (logs, store) after the stack stopped


class Stack:
    """What a running stack offers; made by ``running_stack``."""

    def __init__(self, options: StackOptions, root: Path, run_id: str) -> None:
        self.options = options
        self.root = root
        self.run_id = run_id
        self.http_port, self.https_port, self._pebble_port, self._pebble_management_port = free_ports(4)
        self.pebble: Pebble | None = None
        self.bus: PrivateBus | None = None
        self.polkit: Polkitd | None = None
        self.apache: Apache | None = None
        self.broker: BrokerHarness | None = None  # with with_broker
        self.processes: dict[str, ManagedProcess] = {}
        self.specs: dict[str, ProcessSpec[Stack]] = {}
        self.leftovers: list[int] = []
        self._cleanup: ExitStack | None = None

    # -- what the pieces need from each other ---------------------------------------------------

    @property
    def bus_address(self) -> str:
        if self.bus is None:
            raise HarnessError("this stack runs without a bus")
        return self.bus.address

    @property
    def https_address(self) -> str:
        """``host:port`` of the HTTPS listener (the broker's ``probe``)."""
        return f"127.0.0.1:{self.https_port}"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment harness processes get: fixed PATH and locale, the run marker, ``extra``."""
        return harness_env(self.run_id, extra)

    def log_files(self) -> dict[str, Path]:
        logs = {}
        if self.pebble:
            logs["pebble"] = self.pebble.log_path
        if self.bus:
            logs["dbus-daemon"] = self.bus.log_path
        if self.polkit:
            logs["polkitd"] = self.polkit.log_path
        for name, proc in self.processes.items():
            logs[name] = proc.log_path
        if self.apache:
            logs["apache"] = self.apache.error_log
        return logs

    def dump_logs(self, lines: int = 40) -> str:
        """The tail of every log, for a failed test's report."""
        parts = []
        for name, path in self.log_files().items():
            parts.append(f"----- {name}: {path} (last {lines} lines)\n{tail(path, lines)}")
        return "\n".join(parts)

    def on_stop(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when the stack stops (before what was started earlier is stopped)."""
        if self._cleanup is None:
            raise HarnessError("the stack is not running")
        self._cleanup.callback(fn)

    # -- extra processes -----------------------------------------------------------------------

    def add_process(self, spec: ProcessSpec[Stack]) -> ManagedProcess:
        """Prepare and start ``spec`` now; it is stopped with the stack (before what started earlier)."""
        if self._cleanup is None:
            raise HarnessError("the stack is not running")
        if spec.name in self.processes:
            raise HarnessError(f"a process named {spec.name} already exists")
        if spec.prepare is not None:
            spec.prepare(self)
        argv = spec.argv(self) if callable(spec.argv) else spec.argv
        env = spec.env(self) if callable(spec.env) else spec.env
        proc = ManagedProcess(
            spec.name,
            argv,
            self.env(env),
            make_dir(self.log_dir) / f"{spec.name}.log",
            cwd=self.root,
            stop_timeout=spec.stop_timeout,
        )
        self.processes[spec.name] = proc
        self.specs[spec.name] = spec
        self._cleanup.callback(proc.stop)
        self.start_process(spec.name)
        return proc

    def start_process(self, name: str) -> None:
        """(Re)start an added process and wait until its ``ready`` check passes."""
        proc, spec = self.processes[name], self.specs[name]
        proc.start()
        if spec.ready is not None:
            check = spec.ready

            def ready() -> bool:
                proc.check_alive()
                return check(self)

            wait_for(ready, spec.ready_timeout, f"{name} to be ready", interval=0.05)
        else:
            proc.check_alive()

    def stop_process(self, name: str) -> None:
        self.processes[name].stop()

    # -- bring-up ------------------------------------------------------------------------------

    def _start(self, cleanup: ExitStack) -> None:
        self._cleanup = cleanup
        o = self.options
        self.pebble = Pebble(
            self.root / "pebble",
            self.run_id,
            validity_seconds=o.validity_seconds,
            http_port=self.http_port,
            tls_port=self.https_port,
            port=self._pebble_port,
            management_port=self._pebble_management_port,
        )
        cleanup.callback(self.pebble.stop)
        self.pebble.start()

        if o.with_bus:
            policies = o.bus_policy_files if o.bus_policy_files is not None else project_files("dbus/*.conf")
            self.bus = PrivateBus(self.root / "bus", self.run_id, policies)
            cleanup.callback(self.bus.stop)
            self.bus.start()
            if o.with_polkit:
                actions = (
                    o.polkit_actions if o.polkit_actions is not None else project_files("polkit/*.policy")
                )
                rules = o.polkit_rules if o.polkit_rules is not None else project_files("polkit/*.rules")
                self.polkit = Polkitd(
                    self.root / "polkit", self.run_id, self.bus.address, actions=actions, rules=rules
                )
                cleanup.callback(self.polkit.stop)
                self.polkit.start()
        elif o.with_polkit:
            raise HarnessError("polkitd needs the bus (with_bus=True)")

        specs = list(o.processes)
        if o.with_broker:
            if self.bus is None or self.polkit is None:
                raise HarnessError("the broker needs the bus and polkitd (with_bus, with_polkit)")
            self.broker = BrokerHarness(self, o.broker_options)
            specs.insert(0, self.broker.spec())
        message_cmd = o.message_cmd(self) if callable(o.message_cmd) else o.message_cmd
        if message_cmd is None and self.broker is not None:
            message_cmd = self.broker.hook_argv()
        self.apache = Apache(
            ApacheSettings(
                server_root=self.root / "apache",
                http_port=self.http_port,
                https_port=self.https_port,
                ca_url=self.pebble.directory_url,
                ca_file=self.pebble.ca_file,
                domains=[list(names) for names in o.domains],
                message_cmd=list(message_cmd) if message_cmd else None,
                renew_window=o.renew_window,
                private_keys=o.private_keys,
                renew_mode=o.renew_mode,
                store_locks=o.store_locks,
                log_level=o.apache_log_level,
                extra_config=o.apache_extra_config,
            ),
            self.run_id,
        )
        self.apache.write_config()

        for spec in specs:
            if not spec.after_apache:
                self.add_process(spec)
        # Registered before the start: `apache2 -k start` may leave a server behind and still fail.
        cleanup.callback(self.apache.stop)
        if o.start_apache:
            self.apache.start()
        for spec in specs:
            if spec.after_apache:
                self.add_process(spec)


def _check_reachable(directory: Path) -> None:
    """www-data must be able to walk to the run's directory (pytest's tmp_path is 0700)."""
    for parent in [directory, *directory.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise HarnessError(
                f"{parent} is not searchable by other users (mode {stat.S_IMODE(mode):o}); "
                "Apache's www-data children could not reach the store: choose another base_dir"
            )


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) while the body runs, then deliver it: a teardown runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def running_stack(options: StackOptions | None = None, **overrides: Any) -> Iterator[Stack]:
    """Start the stack (``options``, with keyword ``overrides`` of its fields) and stop it on exit."""
    options = dataclasses.replace(options or StackOptions(), **overrides)
    if os.geteuid() != 0:
        raise HarnessError("the harness runs as root (Apache binds as root, polkitd needs it, mounts)")
    base = Path(options.base_dir) if options.base_dir else Path(tempfile.gettempdir())
    root = make_dir(Path(tempfile.mkdtemp(prefix="arb-harness-", dir=base)))
    run_id = uuid.uuid4().hex
    stack = Stack(options, root, run_id)
    cleanup = ExitStack()
    try:
        if not options.keep:
            cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        cleanup.callback(lambda: stack.leftovers.extend(kill_marked(run_id)))
        _check_reachable(root)
        stack._start(cleanup)
        yield stack
    finally:
        with _sigint_held():
            cleanup.close()
