"""Where the hook's lines go: stderr (mod_md copies it into Apache's error log) and syslog.

mod_md logs the hook's stderr only at level `info`, which Debian's `LogLevel warn` hides, and
it takes one MDMessageCmd for the whole server: so the hook is also where `errored` and
`expiring` must reach an admin. Each line goes to the local syslog socket as one datagram,
`<PRI>apache-restart-hook[PID]: TEXT` (facility daemon), which journald and rsyslog both read.

Writing to syslog must never block the hook nor fail it: the socket is non-blocking, and no
socket, a full queue or a stream socket where a datagram one was expected all mean the line
goes to stderr only. Only `_socket` (the C module) is imported, not `socket`: the hook runs
on the path of every renewal and costs about as much as starting the interpreter.

Everything mod_md passes (the MD name above all) comes from the command line: `printable`
escapes control characters and bounds the length before any of it is written anywhere.
"""

from __future__ import annotations

import os
import sys

PROG = "apache-restart-hook"

# For tests only: the datagram socket to write to instead of /dev/log (unset or "": /dev/log).
SOCKET_ENV = "APACHE_RESTART_HOOK_SYSLOG_SOCKET"
DEFAULT_SOCKET = "/dev/log"

FACILITY_DAEMON = 3
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6

MAX_TEXT = 1024     # one log line; rsyslog's default message size is 8 KiB, journald's larger
MAX_NAME = 255      # a DNS name has at most 253 characters


def printable(text: str, limit: int = MAX_TEXT) -> str:
    r"""`text` with every non-printable character as `\xNN`/`\uNNNN`, at most `limit` characters.

    Undecodable bytes of argv (surrogate escapes) are escaped too, so nothing that reaches a
    log can start a new line or a terminal sequence.
    """
    out = "".join(c if c.isprintable() else _escape(c) for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _escape(c: str) -> str:
    n = ord(c)
    if 0xDC80 <= n <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{n - 0xDC00:02x}"
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


# What an MD name is made of (mod_md writes it in lower case; `*` for a wildcard). A name with
# anything else is still shown, escaped, and marked, so that nobody reads it as a real MD.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_*")


def shown_name(name: str | None) -> str:
    """The MD name as the hook's lines show it: escaped, bounded, marked when it is no MD name."""
    if name is None:
        return "(no name)"
    if name and len(name) <= 253 and _NAME_CHARS.issuperset(name):
        return name
    shown = printable(name, MAX_NAME) if name else '""'
    return f"{shown} (not a valid MD name)"


def syslog(priority: int, text: str) -> None:
    """One datagram to the syslog socket; silently nothing when that cannot be done at once."""
    path = os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    data = f"<{FACILITY_DAEMON * 8 + priority}>{PROG}[{os.getpid()}]: {printable(text)}"
    try:
        import _socket

        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    except (ImportError, OSError):
        return
    try:
        s.setblocking(False)
        s.connect(path)
        s.send(data.encode("utf-8", "replace"))
    except OSError:  # no /dev/log, nobody reading it, its queue full: stderr still has the line
        pass
    finally:
        s.close()


def say(text: str, priority: int | None = None) -> None:
    """The hook's line: to stderr (mod_md's log) and, with a priority, to syslog."""
    line = printable(text)
    try:
        sys.stderr.write(f"{PROG}: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: syslog may still have it
        pass
    if priority is not None:
        syslog(priority, line)
