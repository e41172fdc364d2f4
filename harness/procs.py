"""Process, port and file helpers shared by the harness modules.

Every process the harness starts carries the environment variable ``MARKER_ENV`` set to the run's
id. Children inherit it, daemons keep it after they detach (Apache), and programs that start more
programs (mod_md's hook) pass it on, so ``/proc/*/environ`` tells which processes a run left behind
whatever their parent or session became.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from dataclasses import dataclass, field
from typing import Generic, Self, TypeVar

Host = TypeVar("Host")

MARKER_ENV = "ARB_HARNESS_RUN"

# The environment every harness process starts from: nothing of the caller's leaks in.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C",
    "LC_ALL": "C",
}

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A piece of the harness did not come up (the message says which and where its log is)."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now (the kernel picks them).

    All sockets stay bound until every port is chosen, so the ports differ from each other.
    Another program may still take one before it is used: the piece that binds it then fails to
    start and says so.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; raise HarnessError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def make_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` (and parents) and set its mode explicitly: the umask must not decide it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def write_file(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def harness_env(run_id: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(BASE_ENV)
    env[MARKER_ENV] = run_id
    if extra:
        env.update(extra)
    return env


def _state_and_group(pid: int | str) -> tuple[bytes, int] | None:
    """A process's state letter and process group from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # After the parenthesised command name (which may itself contain ") "): state, ppid, pgrp, ...
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[0], int(fields[2])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    found = _state_and_group(pid)
    return found is not None and found[0] not in (b"Z", b"X")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _state_and_group(entry.name)
            if found is not None and found[1] == pgid and found[0] not in (b"Z", b"X"):
                members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 3.0) -> None:
    """SIGKILL a process group and wait until none of its members runs any more.

    The signal is delivered asynchronously: without the wait a member can still show as running
    right after (and a zombie waiting for a slow init to reap it counts as gone).
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_for(lambda: not group_members(pgid), timeout, f"process group {pgid} to die")


def marked_pids(run_id: str) -> list[int]:
    """Live processes whose environment carries this run's marker."""
    needle = f"{MARKER_ENV}={run_id}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def kill_marked(run_id: str, timeout: float = 3.0) -> list[int]:
    """SIGKILL whatever is left of a run; returns the pids found. The last line of every teardown."""
    pids = marked_pids(run_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout, "leftover processes to die")
    return pids


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ProcessSpec(Generic[Host]):
    """A process the stack starts, stops in reverse order, and can restart (``stack.processes``).

    ``Host`` is the stack that runs it (harness/stack.py's Stack). ``argv`` and ``env`` may be
    functions of it, called once the bus, polkitd and Apache's
    config exist. ``prepare`` runs just before the first start (e.g. to write a config file into
    ``stack.root``); ``ready`` is polled after each start until it returns True.
    The environment always starts from the harness's fixed one (PATH, LANG=C, the run marker).
    """

    name: str
    argv: Sequence[str] | Callable[[Host], Sequence[str]]
    env: Mapping[str, str] | Callable[[Host], Mapping[str, str]] = field(default_factory=dict)
    prepare: Callable[[Host], None] | None = None
    ready: Callable[[Host], bool] | None = None
    ready_timeout: float = 10.0
    stop_timeout: float = 5.0
    after_apache: bool = False



class ManagedProcess:
    """One foreground program in its own session (so its whole process group can be signalled).

    ``start`` may be called again after ``stop``: the tests stop and restart processes (such as
    the broker) while the rest of the stack keeps running. Output goes to ``log_path``; with
    ``stdout_path`` stdout goes to its own file (dbus-daemon prints its address there).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        stdout_path: Path | None = None,
        cwd: Path | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.stdout_path = stdout_path
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.popen: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.running():
            raise HarnessError(f"{self.name} is already running")
        with ExitStack() as files:
            log = files.enter_context(open(self.log_path, "ab"))
            out = log if self.stdout_path is None else files.enter_context(open(self.stdout_path, "wb"))
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd or "/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                start_new_session=True,
            )
        self._stopped = False

    def check_alive(self) -> None:
        """Raise with the log's tail when the process has already exited (a start that failed)."""
        if self.popen is not None and self.popen.poll() is not None:
            raise HarnessError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"last lines of {self.log_path}:\n{tail(self.log_path)}"
            )

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after ``stop_timeout``; idempotent."""
        if self.popen is None or self._stopped:
            return
        self._stopped = True  # a second stop must not signal a group id the kernel may have reused
        pgid = self.popen.pid  # start_new_session: the process leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            pass
        # Kill the group even when the leader exited: a child it left behind still belongs to it.
        kill_group(pgid)
        self.popen.wait()


class ServiceProcess:
    """A harness piece built around one ManagedProcess: its start-and-wait, stop and `with`.

    A start that does not become ready stops what it started before the error goes on.
    """

    process: ManagedProcess | None = None

    def start(self) -> object:
        raise NotImplementedError

    def _run_until(self, process: ManagedProcess, ready: Callable[[], T], timeout: float, what: str,
                   interval: float = 0.02) -> T:
        self.process = process
        process.start()
        try:
            return wait_for(ready, timeout, what, interval=interval)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
