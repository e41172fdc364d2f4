"""Logging to stderr with sd-daemon priority prefixes ("<4>message").

journald (and systemd's stderr handling) turns the prefix into the entry's priority and adds
its own timestamps, so none are written here. Each event is exactly one line: the prefix is
only understood at the start of a line, and a message that carries text from www-data (an MD
name, a PEM parse error) must not be able to start a forged line of its own. journald ends a
line at NUL too, and splits lines longer than its LineMax (48 KiB by default): hence every
line goes through text.safe() and is capped far below that.
"""

from __future__ import annotations

import sys

from .text import safe

ERR = 3
WARNING = 4
NOTICE = 5
INFO = 6
DEBUG = 7

# Longest message written (a traceback folded into one line fits); journald's LineMax is 48 KiB.
MAX_LINE = 8192


def _one_line(msg: object) -> str:
    # splitlines() also knows \r, \v, \x1c-\x1e, \x85, \u2028 and \u2029, which some
    # readers treat as line ends too.
    # Cut first: what lies beyond MAX_LINE is dropped anyway, however long the message.
    return safe(" | ".join(str(msg)[:MAX_LINE + 1].splitlines()), MAX_LINE)


def emit(priority: int, msg: object) -> None:
    stream = sys.stderr  # looked up per call so that redirection (and tests) take effect
    if stream is None:
        return
    try:
        stream.write(f"<{priority}>{_one_line(msg)}\n")
        stream.flush()
    except (OSError, ValueError):
        # A closed or broken stderr must not take the daemon down with it.
        pass


def err(msg: object) -> None:
    emit(ERR, msg)


def warning(msg: object) -> None:
    emit(WARNING, msg)


def notice(msg: object) -> None:
    emit(NOTICE, msg)


def info(msg: object) -> None:
    emit(INFO, msg)


def debug(msg: object) -> None:
    emit(DEBUG, msg)
