"""`apache-restart check`: the broker's status judged the way a monitoring system wants it.

The monitoring-plugins convention (Nagios, Icinga, Naemon, Sensu, ...): one line of text, then
`|` and performance data (`'label'=value;warn;crit;min;max`), and the exit status says the
state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN. Pure: the GetStatus document and the time in,
the verdict out; admin.py does the asking.

What counts, per MD:
- CRITICAL: the certificate clients get expires within `critical` days (or has expired). What
  a probe address serves is what clients get; without a usable probe answer, the active set in
  the store stands in for it. Also CRITICAL: a restart failed to activate the set that is still
  staged (the broker will not try again on its own: a human must look), or the last restart
  failed without being issued (config test) and a valid set still waits for it (the broker
  retries, backing off, but only a fixed config lets it through).
- WARNING: the same within `warning` days; a valid set waiting in staging longer than
  `pending_hours` (the hook's message and the check timer should have activated it long ago);
  a staged set that fails verification; a probe address that could not be asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
SERVICE = "APACHE-RESTART"

# Let's Encrypt's 90-day certificates are renewed with 30 days left (mod_md's default window
# is a third of the lifetime): 14 days left means two weeks of failed renewals.
DEFAULT_WARNING_DAYS = 14.0
DEFAULT_CRITICAL_DAYS = 7.0
# A staged set is normally active within a minute; a day covers MDActivationDelay-free setups
# whose broker was down overnight, and nightly logrotate reloads would have activated it too.
DEFAULT_PENDING_HOURS = 24.0

DAY = 86400.0


@dataclass
class Verdict:
    state: int = OK
    problems: list[tuple[int, str]] = field(default_factory=list)
    perfdata: list[str] = field(default_factory=list)
    summary: str = ""

    def add(self, state: int, text: str) -> None:
        self.problems.append((state, text))
        self.state = max(self.state, state)

    def line(self) -> str:
        worst = sorted(self.problems, key=lambda p: -p[0])
        text = "; ".join(t for _, t in worst) if worst else self.summary
        out = f"{SERVICE} {STATE_NAMES[self.state]} - {text}"
        return out + (" | " + " ".join(self.perfdata) if self.perfdata else "")


def unknown(why: str) -> Verdict:
    v = Verdict()
    v.add(UNKNOWN, why)
    return v


def _label(text: str) -> str:
    # Perfdata labels with anything but plain characters are single-quoted; a quote inside is
    # doubled. MD names are DNS names (and may start with "*."), so this is only a guard.
    return "'" + text.replace("'", "''") + "'"


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _usec(value: object) -> float | None:
    return value / 1e6 if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _expiring(md: Mapping[str, Any]) -> list[tuple[float, str]]:
    """(not_after, where) of the certificates clients get for this MD."""
    served = [(t, f"served at {e.get('probe', '?')}") for e in md.get("served") or []
              if not e.get("error") and (t := _usec(e.get("not_after_usec"))) is not None]
    if served:
        return served
    active = (md.get("active") or {}).get("certs") or []
    return [(t, f"active {c.get('key_type', '?')} certificate") for c in active
            if (t := _usec(c.get("not_after_usec"))) is not None]


def evaluate(status: Mapping[str, Any], now: float, warning_days: float = DEFAULT_WARNING_DAYS,
             critical_days: float = DEFAULT_CRITICAL_DAYS,
             pending_hours: float = DEFAULT_PENDING_HOURS) -> Verdict:
    v = Verdict()
    mds = status.get("mds")
    if not isinstance(mds, list):
        return unknown("the broker's status has no list of MDs")
    nearest: tuple[float, str] | None = None
    longest_wait = 0.0
    # A restart held back (the config test failed, Apache was not running): the broker retries
    # on its own, but each staged set it is for waits until a human fixes the cause.
    last_result = str(status.get("last_result") or "")
    retry = status.get("retry")
    held_back = last_result.startswith("failed") and isinstance(retry, dict)
    last_failure = last_result.removeprefix("failed: ")
    retry = retry if isinstance(retry, dict) else {}
    for md in mds:
        name = str(md.get("name", "?"))
        certs = _expiring(md)
        if certs:
            not_after, where = min(certs)
            days = (not_after - now) / DAY
            v.perfdata.append(f"{_label(name + ' days_left')}={_num(days)};{_num(warning_days)}:;"
                              f"{_num(critical_days)}:;;")
            if nearest is None or days < nearest[0]:
                nearest = (days, name)
            if days < 0:
                v.add(CRITICAL, f"{name}: {where} expired {_num(-days)} days ago")
            elif days < critical_days:
                v.add(CRITICAL, f"{name}: {where} expires in {_num(days)} days")
            elif days < warning_days:
                v.add(WARNING, f"{name}: {where} expires in {_num(days)} days")
        for entry in md.get("served") or []:
            if entry.get("error"):
                v.add(WARNING, f"{name}: probe {entry.get('probe', '?')}: {entry['error']}")
        staged = md.get("staged")
        if staged is None:
            continue
        if not staged.get("valid"):
            v.add(WARNING, f"{name}: staged set is invalid: {staged.get('problem', '')}")
            continue
        if md.get("failed_before"):
            v.add(CRITICAL, f"{name}: a restart failed to activate the staged set "
                            "(apache-restart status; root may retry with apache-restart request)")
        elif md.get("pending") and held_back:
            v.add(CRITICAL, f"{name}: the last restart failed ({last_failure}) and the set is still staged; "
                            f"the broker retries (retry {retry.get('attempts', '?')}); apache-restart status")
        since = _usec(staged.get("since_usec"))
        if since is not None:
            hours = max(0.0, (now - since) / 3600)
            longest_wait = max(longest_wait, hours)
            if hours > pending_hours and not md.get("failed_before"):
                v.add(WARNING, f"{name}: a valid set has been staged for {_num(hours)} hours, not active")
    v.perfdata.append(f"staged_hours={_num(longest_wait)};{_num(pending_hours)};;0;")
    v.perfdata.append(f"pending={1 if status.get('pending') else 0};;;0;1")
    v.perfdata.append(f"mds={len(mds)};;;0;")
    if nearest is None:
        v.summary = f"{len(mds)} MDs, no certificate yet" if mds else "no managed domains"
    else:
        v.summary = (f"{len(mds)} MD{'' if len(mds) == 1 else 's'}, nearest expiry in "
                     f"{_num(nearest[0])} days ({nearest[1]})")
    return v
