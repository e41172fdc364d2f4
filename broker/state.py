"""The broker's state across restarts of itself: one JSON object in one file, replaced atomically.

A crash or power loss at any moment leaves either the old file or the new one, never a mix:
the new content goes to a temporary file in the same directory, is flushed to disk, and is
renamed over the old name; then the directory itself is flushed so the rename survives too.

A state file that cannot be used never stops the broker: losing the plan costs at most one
restart that a later renewal or the daily check asks for again, whereas refusing to start
would leave every renewed certificate inactive. The bad file is kept aside for a human.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable

from . import log as _log

MAX_SIZE = 1024 * 1024
KEEP_CORRUPT = 3


class _Corrupt(Exception):
    pass


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON, and no state of ours holds them.
    raise ValueError(f"{name} is not allowed")


class StateFile:
    def __init__(self, directory: str, name: str = "state.json",
                 log: Callable[[str], None] = _log.warning):
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"state file name {name!r} is not a plain file name")
        self.directory = directory
        self.name = name
        self.path = os.path.join(directory, name)
        self._log = log
        self._tmp_prefix = f".{name}.tmp-"
        self._corrupt_re = re.compile(re.escape(name) + r"\.corrupt-(\d{8}T\d{6}Z)(?:-(\d+))?")
        # What the last save wrote and the file it made: saving the same again is skipped.
        self._written: tuple[bytes, tuple[int, int, int]] | None = None

    def load(self) -> dict:
        """The saved object; {} when there is none or it is unusable (logged, moved aside).

        Raises OSError only when the directory or file cannot be read at all (e.g. EACCES, EIO).
        """
        self._remove_leftover_temps()
        try:
            return self._read()
        except FileNotFoundError:
            return {}
        except _Corrupt as e:
            self._move_aside(str(e))
            return {}

    def discard(self, reason: str) -> None:
        """The saved object was read but its content is unusable: move it aside for a human
        (logged), so that the next save starts a fresh file."""
        self._move_aside(reason)

    def _read(self) -> dict:
        st = os.lstat(self.path)
        if stat.S_ISLNK(st.st_mode):
            raise _Corrupt("is a symbolic link")
        if not stat.S_ISREG(st.st_mode):
            raise _Corrupt("is not a regular file")
        if st.st_size > MAX_SIZE:
            raise _Corrupt(f"is larger than {MAX_SIZE} bytes")
        # O_NOFOLLOW and fstat again: the lstat above may be stale by now. O_NONBLOCK keeps a
        # FIFO put there in the meantime from blocking the open.
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _Corrupt("is a symbolic link") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Corrupt("is not a regular file")
            chunks = []
            size = 0
            while size <= MAX_SIZE:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > MAX_SIZE:
            raise _Corrupt(f"is larger than {MAX_SIZE} bytes")
        try:
            data = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _Corrupt(f"is not valid JSON ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise _Corrupt("does not hold a JSON object")
        return data

    def _move_aside(self, reason: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # Counting on past the highest number used in this second (not filling gaps) keeps
        # name order equal to age order, which _prune_corrupt() relies on.
        used = [n for s, n, _ in self._corrupt_files() if s == stamp]
        target = f"{self.name}.corrupt-{stamp}"
        if used:
            target += f"-{max(used) + 1}"
        try:
            # rename() moves a symlink itself, never what it points to.
            os.rename(self.path, os.path.join(self.directory, target))
        except OSError as e:
            self._log(f"state file {self.path} {reason}; starting with empty state; "
                      f"could not move it aside: {e.strerror}")
            return
        self._log(f"state file {self.path} {reason}; moved aside as {target}, starting with empty state")
        self._prune_corrupt()

    def _corrupt_files(self) -> list[tuple[str, int, str]]:
        """(stamp, counter, file name) of the files moved aside, oldest first."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        found = []
        for entry in names:
            m = self._corrupt_re.fullmatch(entry)
            if m:
                found.append((m.group(1), int(m.group(2) or 0), entry))
        found.sort()
        return found

    def _prune_corrupt(self) -> None:
        found = self._corrupt_files()
        for _, _, entry in found[:-KEEP_CORRUPT]:
            path = os.path.join(self.directory, entry)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as e:
                self._log(f"could not remove old corrupt state file {path}: {e.strerror}")

    def _remove_leftover_temps(self) -> None:
        # Left by a save() that died before its rename; never read, only cleaned up. One
        # broker runs at a time (it owns a unique bus name), so none of these is in use.
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for entry in names:
            if entry.startswith(self._tmp_prefix):
                path = os.path.join(self.directory, entry)
                try:
                    if not stat.S_ISDIR(os.lstat(path).st_mode):
                        os.unlink(path)
                except OSError:
                    pass

    def save(self, data: dict) -> None:
        """Replace the saved object with `data`, atomically and durably.

        Raises OSError on I/O failures (the old file is then intact), ValueError/TypeError
        when `data` is not JSON-serialisable or exceeds the size that load() accepts.
        """
        if not isinstance(data, dict):
            raise TypeError("state must be a dict")
        # Insertion order is kept (no sort_keys): callers may rely on it, e.g. oldest first.
        blob = (json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
        if len(blob) > MAX_SIZE:
            raise ValueError(f"state is {len(blob)} bytes, more than the {MAX_SIZE} load() accepts")
        # A request that changes nothing (the same set asked for again, a burst of them) costs
        # no disk flush; a file replaced or removed behind our back is written again.
        if self._written is not None and self._written[0] == blob and self._identity() == self._written[1]:
            return
        self._written = None
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.directory, self._tmp_prefix + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask: the state names MDs and their failures
                view = memoryview(blob)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        identity = self._identity()
        if identity is not None:
            self._written = (blob, identity)

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns
