"""Times as people read them: local ISO 8601 with the UTC offset, to the second.

The bus carries microseconds since the epoch; logs and the admin command show this form, so
that a time in the journal, in `apache-restart status` and in the hook's line can be compared
at a glance (the offset makes them unambiguous across time zones and DST changes).
"""

from __future__ import annotations

import datetime


def local_iso(t: float) -> str:
    """Epoch seconds -> `2026-11-29T13:13:51+01:00`; "?" for a time no calendar holds."""
    try:
        return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        # Years beyond 9999 or before 1: shown, not raised (a status must print whatever the
        # state file or a peer's message held).
        return "?"


def usec_iso(usec: int) -> str:
    """Microseconds since the epoch (the bus's unit) -> local ISO time; "never" for 0."""
    return local_iso(usec / 1e6) if usec else "never"


def seconds(value: float) -> str:
    """A duration from the configuration as the messages say it: `2.5 s`, `30 s`."""
    return f"{value:g} s"
