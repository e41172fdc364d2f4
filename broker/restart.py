"""Running Apache's config test and graceful restart, safely.

No D-Bus here. The commands run as argv lists (never a shell) with a fixed environment, stdin
closed, in a session of their own so that a timeout can kill everything they started, and
their output goes to the log; callers get one short line.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from . import log as _default_log
from . import timefmt

FIXED_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
}
OUTPUT_CAP = 64 * 1024
TRUNCATED_MARK = "\n[output truncated]"
# The log gets the output as one line; journald splits longer ones anyway.
LOG_OUTPUT_CAP = 16 * 1024
DETAIL_CAP = 200
PID_FILE_CAP = 64
# After a kill, output still buffered in the pipe is worth a moment, not a hang.
_DRAIN_AFTER_KILL = 1.0
# EOF arrives just after the exit; a command finishing at its deadline still gets its output.
_MIN_DRAIN = 0.2


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None   # None: killed on timeout, or could not start
    output: str              # stdout and stderr together, capped
    timed_out: bool
    error: str = ""          # why it could not start, e.g. "program not found"


class _Log(Protocol):
    def err(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...
    def notice(self, msg: str) -> None: ...
    def info(self, msg: str) -> None: ...
    def debug(self, msg: str) -> None: ...


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        # Only possible if the group's pid was reused by someone else's new session.
        pass


async def _read_capped(stream: asyncio.StreamReader, buf: bytearray) -> bool:
    """Read to EOF, keeping at most OUTPUT_CAP bytes; returns whether anything was dropped.

    Reading on past the cap matters: a command blocked on a full pipe would never finish.
    """
    dropped = False
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return dropped
        room = OUTPUT_CAP - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > room:
            dropped = True


def _decode(buf: bytearray, dropped: bool) -> str:
    text = bytes(buf).decode("utf-8", errors="replace")
    return text + TRUNCATED_MARK if dropped else text


async def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run argv with the fixed environment; never raises for the command's own failure."""
    argv = list(argv)
    if not argv:
        return CommandResult(None, "", False, "empty command")
    loop = asyncio.get_running_loop()
    # Our own pipe rather than asyncio's PIPE: asyncio's wait() also waits for every holder
    # of the pipe to close it, and we must be able to stop listening to a stray holder.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(FIXED_ENV),
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
    except OSError as e:
        os.close(read_fd)
        if isinstance(e, FileNotFoundError):
            return CommandResult(None, "", False, "program not found")
        if isinstance(e, PermissionError):
            return CommandResult(None, "", False, "permission denied")
        return CommandResult(None, "", False, e.strerror or str(e))
    finally:
        os.close(write_fd)

    stream = asyncio.StreamReader(limit=OUTPUT_CAP)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(read_fd, "rb", buffering=0)
    )
    buf = bytearray()
    reader = asyncio.ensure_future(_read_capped(stream, buf))
    exited = asyncio.ensure_future(proc.wait())
    deadline = loop.time() + timeout
    timed_out = False
    dropped = False
    try:
        await asyncio.wait({exited}, timeout=max(0.0, deadline - loop.time()))
        if not exited.done():
            timed_out = True
            _kill_group(proc.pid)
            # SIGKILL cannot be ignored; only a process stuck in the kernel outlasts this.
            await asyncio.wait({exited}, timeout=_DRAIN_AFTER_KILL)
        grace = _DRAIN_AFTER_KILL if timed_out else max(_MIN_DRAIN, deadline - loop.time())
        done, _ = await asyncio.wait({reader}, timeout=grace)
        if not done:
            # The command is gone but something still holds its output open past the
            # deadline: a hung helper. While any of its group lives the group id cannot be
            # reused, so this reaches only what the command left behind.
            _kill_group(proc.pid)
            done, _ = await asyncio.wait({reader}, timeout=_DRAIN_AFTER_KILL)
        if done:
            dropped = reader.result()
    finally:
        if proc.returncode is None:
            # Cancelled by our caller (or unkillable): the group must not outlive the request.
            _kill_group(proc.pid)
        for task in (reader, exited):
            if not task.done():
                task.cancel()
        transport.close()
    return CommandResult(None if timed_out else proc.returncode, _decode(buf, dropped), timed_out)


@dataclass(frozen=True)
class RestartOutcome:
    issued: bool   # a graceful restart (or reload) was actually issued
    ok: bool
    detail: str    # one short line for the caller


class Restarter(Protocol):
    async def restart(self) -> RestartOutcome: ...


def _fold(text: str, cap: int = LOG_OUTPUT_CAP) -> str:
    folded = " | ".join(line.rstrip() for line in text.strip().splitlines() if line.strip())
    if len(folded) > cap:
        folded = folded[:cap] + " [...]"
    return folded or "(no output)"


# Apache's lines that say nothing about why a command failed.
_NOISE = re.compile(
    r"^(AH00558:|The Apache error log may have more information|Action '\w+' failed\.)"
)
_TELLING = re.compile(r"error|fail|invalid|cannot|can't|unable|not found|denied", re.IGNORECASE)


def first_meaningful_line(output: str) -> str:
    """The line of a command's output that most likely says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    useful = [line for line in lines if not _NOISE.match(line)] or lines
    i = next((n for n, x in enumerate(useful) if _TELLING.search(x)), 0)
    line = useful[i]
    if line.endswith(":") and i + 1 < len(useful):
        # Apache names the place on one line and the reason on the next
        # ("AH00526: Syntax error on line 3 of x.conf:" / "Invalid command 'Bogus', ...").
        line = f"{line} {useful[i + 1]}"
    return line if len(line) <= DETAIL_CAP else line[: DETAIL_CAP - 3] + "..."


def _log_result(log: _Log, what: str, argv: Sequence[str], result: CommandResult, timeout: float) -> None:
    if result.error:
        log.err(f"{what} ({argv[0] if argv else '-'}) could not run: {result.error}")
        return
    status = f"timed out after {timefmt.seconds(timeout)}" if result.timed_out else f"exit {result.returncode}"
    line = f"{what} ({' '.join(argv)}) {status}: {_fold(result.output)}"
    if result.returncode == 0:
        log.info(line)
    else:
        log.warning(line)


async def config_test(argv: Sequence[str], timeout: float, log: _Log = _default_log) -> RestartOutcome | None:
    """Run the config test; None when it passed (or none is configured), else why not to restart.

    Shared by both runners: a broken config must stop a reload through systemd just the same.
    """
    if not argv:
        return None
    result = await run_command(argv, timeout)
    _log_result(log, "config test", argv, result, timeout)
    if result.error:
        return RestartOutcome(False, False, f"config test could not run: {result.error}")
    if result.timed_out:
        return RestartOutcome(False, False, f"config test timed out after {timefmt.seconds(timeout)}")
    if result.returncode != 0:
        return RestartOutcome(False, False, f"config test failed: {first_meaningful_line(result.output)}")
    return None


class CommandRestarter:
    """Graceful restart by running commands (restart_via = "command")."""

    def __init__(
        self,
        configtest: Sequence[str],
        graceful: Sequence[str],
        pid_file: str,
        timeout: float,
        log: _Log = _default_log,
    ):
        self.configtest = tuple(configtest)
        self.graceful = tuple(graceful)
        self.pid_file = pid_file
        self.timeout = timeout
        self.log = log
        self._lock = asyncio.Lock()

    def _running(self) -> tuple[bool, str]:
        """Whether Apache runs, and if not, why we think so (no paths: it may reach callers)."""
        try:
            fd = os.open(self.pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False, "no pid file"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return False, "pid file is a symlink"
            return False, f"pid file unreadable: {e.strerror}"
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False, "pid file is not a regular file"
            data = os.read(fd, PID_FILE_CAP + 1)
        except OSError as e:
            return False, f"pid file unreadable: {e.strerror}"
        finally:
            os.close(fd)
        text = data.decode("ascii", errors="replace").strip()
        # int() alone would take "+12", " 1_2" and non-ASCII digits.
        if len(data) > PID_FILE_CAP or not re.fullmatch(r"[0-9]{1,10}", text):
            return False, "pid file holds no pid"
        pid = int(text)
        if not 0 < pid < 2**31:
            return False, "pid file holds no pid"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, f"pid {pid} from the pid file is gone"
        except PermissionError:
            pass  # it exists; someone else's process is still alive
        return True, f"pid {pid}"

    def apache_running(self) -> bool:
        return self._running()[0]

    async def restart(self) -> RestartOutcome:
        # Two restarts at once would interleave config tests and signals to no purpose.
        async with self._lock:
            return await self._restart()

    def _log_result(self, what: str, argv: Sequence[str], result: CommandResult) -> None:
        _log_result(self.log, what, argv, result, self.timeout)

    async def _restart(self) -> RestartOutcome:
        running, why = self._running()
        if not running:
            self.log.warning(f"not restarting: apache is not running ({why}; pid file {self.pid_file})")
            return RestartOutcome(False, False, f"apache is not running ({why})")

        refused = await config_test(self.configtest, self.timeout, self.log)
        if refused is not None:
            return refused

        if not self.graceful:
            return RestartOutcome(False, False, "no graceful command configured")
        result = await run_command(self.graceful, self.timeout)
        self._log_result("graceful", self.graceful, result)
        if result.error:
            return RestartOutcome(False, False, f"graceful command could not run: {result.error}")
        # From here on the command ran: it may have signalled Apache whatever it reports.
        if result.timed_out:
            return RestartOutcome(True, False, f"graceful command timed out after {timefmt.seconds(self.timeout)}")
        if result.returncode != 0:
            code = result.returncode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            return RestartOutcome(
                True, False, f"graceful command failed ({how}): {first_meaningful_line(result.output)}"
            )
        return RestartOutcome(True, True, "graceful restart issued")
