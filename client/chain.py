"""The admin's own command, run by the hook after its own work (`--then PROGRAM [ARGS...] --`).

mod_md takes one MDMessageCmd, so an admin who wants mail on `errored` or a deploy step on
`renewed` chains it behind the hook. It runs the way mod_md would have run it alone, with
what mod_md can not give it:

- argv only, no shell, no PATH search (PROGRAM is an absolute path); the environment and
  working directory are the hook's (Apache's, `/`); stdin is /dev/null;
- its stdout and stderr go through a pipe that the hook copies, line by line (a line longer
  than MAX_LINE in pieces, MAX_OUTPUT bytes in all), to its own stderr (mod_md's log). The
  program never holds mod_md's stderr: whatever it leaves running writes into a pipe that
  closes when the hook exits, and mod_md reads its stderr to EOF;
- its own session and process group; when it is not done after the timeout, the whole group
  gets SIGTERM, then SIGKILL a second later.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

KILL_GRACE = 1.0        # SIGTERM to SIGKILL
EOF_GRACE = 0.5         # after it exited: how long output from what it left running is still copied
MAX_OUTPUT = 64 * 1024  # bytes copied to mod_md's log; the rest is read and dropped
MAX_LINE = 1000


class Outcome:
    # A plain class: `dataclasses` costs more to import than the rest of the hook.
    __slots__ = ("ok", "exit_code", "detail")

    def __init__(self, ok: bool, exit_code: int, detail: str):
        self.ok = ok
        self.exit_code = exit_code      # its exit status; 1 when it had none (not started, signal, timeout)
        self.detail = detail            # for the hook's line: "exited 0", "killed by SIGKILL", ...


def run(argv: list[str], timeout: float, relay: Callable[[str], None]) -> Outcome:
    """Run argv to its end or to `timeout` seconds; each line of its output goes to `relay`."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                                start_new_session=True, close_fds=True)
    except OSError as e:
        os.close(read_fd)
        return Outcome(False, 1, f"could not be started ({e.strerror or e})")
    finally:
        os.close(write_fd)
    copier = _Copier(read_fd, relay)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(proc)
                copier.pump(EOF_GRACE)
                return Outcome(False, 1, f"no result within {timeout:g} s: killed (its whole process group)")
            if copier.eof:  # it closed its output and runs on: nothing to copy, only to wait
                try:
                    proc.wait(left)
                except subprocess.TimeoutExpired:
                    continue
            else:
                copier.pump(min(left, 0.2))
        copier.pump(EOF_GRACE)
    finally:
        copier.close()
    code = proc.returncode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return Outcome(False, 1, f"killed by {name}")
    return Outcome(code == 0, code, f"exited {code}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group, SIGKILL to what is left of it a second later, or as soon as the
    program itself is gone: what it started may ignore SIGTERM."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # nothing left in the group
        pass


def _cut(line: bytes) -> int:
    """Where a piece of a long line ends: at MAX_LINE bytes, or before the UTF-8 sequence that
    straddles it."""
    cut = MAX_LINE
    while cut > MAX_LINE - 3 and line[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return cut


class _Copier:
    """Copies the program's output to the hook's stderr, one line at a time, bounded."""

    def __init__(self, fd: int, relay: Callable[[str], None]):
        self.fd = fd
        self.relay = relay
        self.pending = b""
        self.copied = 0
        self.eof = False
        self.dropped = False

    def pump(self, seconds: float) -> None:
        """Copy what arrives within `seconds`, or until EOF."""
        end = time.monotonic() + seconds
        while not self.eof:
            left = end - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return
            data = os.read(self.fd, 65536)
            if not data:
                self.eof = True
                break
            self._take(data)
        self._flush()

    def _take(self, data: bytes) -> None:
        if self.dropped:
            return
        room = MAX_OUTPUT - self.copied
        over = len(data) > room
        data = data[:room]
        self.copied += len(data)
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self._line(line)
        # A line longer than MAX_LINE goes on in pieces, not cut off: what is lost is its tail,
        # often the error. A piece ends before a UTF-8 sequence, not inside it.
        while len(self.pending) > MAX_LINE:
            cut = _cut(self.pending)
            self._line(self.pending[:cut])
            self.pending = self.pending[cut:]
        if over:  # said once, after what was copied
            self._flush()
            self.dropped = True
            self.relay(f"(more than {MAX_OUTPUT} bytes of output; the rest is dropped)")

    def _flush(self, partial: bool = False) -> None:
        """Copy the unfinished last line once no more of it can come (or `partial`)."""
        if self.pending and (partial or self.eof or self.copied >= MAX_OUTPUT):
            self._line(self.pending)
            self.pending = b""

    def _line(self, raw: bytes) -> None:
        while len(raw) > MAX_LINE:
            cut = _cut(raw)
            self.relay(raw[:cut].decode("utf-8", "replace"))
            raw = raw[cut:]
        self.relay(raw.decode("utf-8", "replace").rstrip("\r"))

    def close(self) -> None:
        self._flush(partial=True)
        os.close(self.fd)
