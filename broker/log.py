"""Logging to stderr with sd-daemon priority prefixes ("<4>message").

journald (and systemd's stderr handling) turns the prefix into the entry's priority and adds
its own timestamps, so none are written here. Each event is exactly one line: the prefix is
only understood at the start of a line, and a message that carries text from www-data (an MD
name, a PEM parse error) must not be able to start a forged line of its own.
"""

from __future__ import annotations

import sys

ERR = 3
WARNING = 4
NOTICE = 5
INFO = 6
DEBUG = 7


def _one_line(msg: object) -> str:
    # splitlines() also knows \r, \v, \x1c-\x1e, \x85, \u2028 and \u2029, which some
    # readers treat as line ends too.
    return " | ".join(str(msg).splitlines())


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
