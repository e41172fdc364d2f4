"""The restart plan: when the next graceful restart runs and which MDs it is for.

Pure bookkeeping, no I/O and no clock of its own: every method that needs the time is given
it (epoch seconds), so the plan is the same in tests with a fake clock as in the daemon.

Rules, and why:
- A settle window opens with the first request and every later request joins it, so that a
  burst of renewals costs one restart. The window exists because mod_md writes
  `staging/<md>/job.json` after the hook returns; restarting earlier races it. The window ends
  early once every pending MD shows `notified-renewed`, since then that write has happened.
- Two restarts are at least `min_interval` apart. A request in between is deferred, never
  dropped: dropping it would leave a staged certificate inactive until some later renewal.
- A staged set that a restart already failed to activate is not restarted for again unless
  root asks: www-data could otherwise make Apache restart every `min_interval` forever with a
  set that can never be activated.
- A restart that was never issued (the config test failed, Apache was not running) is
  retried on its own, `min_interval` after the failure and then twice as long each time, up
  to RETRY_CAP: the admin usually fixes the config soon, and the renewed certificate should
  follow without waiting for the daily timer; backing off keeps a config that stays broken
  from running the config test every few minutes for weeks. Root's request retries at once.

Wall-clock time is used because plans are reported to callers and persisted across restarts
of the broker; the clock may therefore jump. A jump backwards must not postpone a restart by
the size of the jump, so times in the future relative to `now` are pulled back to `now`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import errors
from .staging import validate_md_name
from .text import is_safe, safe

STATE_VERSION = 2
# Version 1 had no `retry`; it is read as "no retry scheduled".
_KEYS_V1 = frozenset({"version", "pending", "window_opened_at", "last_restart_at", "failed"})
_KEYS_V2 = _KEYS_V1 | {"retry"}

# Retries of a restart that was held back by a failed config test: the first after
# `min_interval` (at least RETRY_FLOOR), then doubling, at most RETRY_CAP apart (unless
# min_interval is longer).
RETRY_FLOOR = 1.0
RETRY_CAP = 3600.0
MAX_REASON_LEN = 512

# Why the pending restart waits (Scheduler.plan): the settle window, min_interval since the
# last restart, or the retry schedule after a held-back restart.
WAIT_SETTLE, WAIT_INTERVAL, WAIT_RETRY = "settle", "min_interval", "retry"

# www-data decides which MD names get staged; keep what an endless stream of failing sets can
# make us remember bounded. Forgetting the oldest only allows one more restart for it.
# The bounds keep the whole state file (state.MAX_SIZE, 1 MiB) in reach even at 253-character
# names: about 330 bytes per failed entry, 380 per pending one.
MAX_FAILED = 1024
# MDs waiting for one restart. A request for one more is refused (RateLimited: the hook
# retries later, after this batch's restart has emptied the plan).
MAX_PENDING = 512
# A set's fingerprint: lower-case hex SHA-256 (staging._fingerprint).
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class Pending:
    fingerprint: str
    requested_at: float


@dataclass
class Retry:
    """A restart held back (not issued): how often so far, when again, and why."""

    attempts: int
    at: float
    reason: str


def _check_duration(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number")
    return float(value)


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError("now must be a number")
    if not math.isfinite(now):
        raise ValueError("now must be finite")
    return float(now)


class Scheduler:
    def __init__(self, settle: float, min_interval: float):
        self.settle = _check_duration("settle", settle)
        self.min_interval = _check_duration("min_interval", min_interval)
        self.pending: dict[str, Pending] = {}
        self.window_opened_at: float | None = None
        self.last_restart_at: float = 0.0
        self.failed: dict[str, str] = {}
        self.retry: Retry | None = None

    def _clamp(self, now: float) -> None:
        # Stored on purpose: clamping only in the computation would make the planned time
        # move along with `now` until the clock caught up with the old value.
        if self.window_opened_at is not None and self.window_opened_at > now:
            self.window_opened_at = now
        self.last_restart_at = min(self.last_restart_at, now)

    def add(self, md: str, fingerprint: str, now: float, override: bool = False) -> float:
        """Accept a request for `md`, whose staged set is `fingerprint`; return the planned time.

        The time returned assumes mod_md has not yet marked the set as notified (the hook that
        sends the request runs before it does), and it is never earlier than `now`.
        Raises errors.AlreadyFailed when a restart already failed to activate exactly this set,
        unless `override` (root asked), which forgets any failure recorded for `md`.
        """
        now = _check_now(now)
        if not isinstance(md, str) or not isinstance(fingerprint, str):
            raise TypeError("md and fingerprint must be strings")
        if not md or not fingerprint:
            raise ValueError("md and fingerprint must not be empty")
        if override:
            self.failed.pop(md, None)
            self.retry = None  # root asks to try now: the admin has fixed what held it back
        elif self.failed.get(md) == fingerprint:
            raise errors.AlreadyFailed(
                f"a restart already failed to activate the certificate set staged for {md}; "
                "root may retry it"
            )
        if md not in self.pending and len(self.pending) >= MAX_PENDING:
            raise errors.RateLimited(
                f"{MAX_PENDING} MDs already wait for the next restart; try again after it")
        self._clamp(now)
        if not self.pending:
            self.window_opened_at = now
        current = self.pending.get(md)
        if current is None or current.fingerprint != fingerprint:
            self.pending[md] = Pending(fingerprint, now)
        planned = self.planned_at(now, lambda _md: False)
        assert planned is not None
        return max(planned, now)

    def planned_at(self, now: float, notified: Callable[[str], bool]) -> float | None:
        """When the pending restart should run; None when nothing is pending.

        A result at or before `now` means "due". `notified(md)` is asked only while the settle
        window is still open; it should answer False when it cannot tell.
        """
        plan = self.plan(now, notified)
        return None if plan is None else plan[0]

    def plan(self, now: float, notified: Callable[[str], bool]) -> tuple[float, str] | None:
        """planned_at() and what it waits for (WAIT_*): the latest of the constraints."""
        if not self.pending:
            return None
        now = _check_now(now)
        self._clamp(now)
        if self.window_opened_at is None:
            # Only reachable by assigning `pending` directly; treat it as a window opening now.
            self.window_opened_at = now
        window_end = self.window_opened_at + self.settle
        if window_end > now and all(notified(md) for md in self.pending):
            window_end = now
        waits = [(window_end, WAIT_SETTLE), (self.last_restart_at + self.min_interval, WAIT_INTERVAL)]
        if self.retry is not None:
            waits.append((self.retry.at, WAIT_RETRY))
        # On a tie the first wins: the settle window is what a request expects to wait for.
        return max(waits, key=lambda w: w[0])

    def retry_delay(self, attempts: int) -> float:
        """How long after the `attempts`-th held-back restart the next try runs."""
        base = max(self.min_interval, RETRY_FLOOR)
        return min(base * 2.0 ** min(attempts - 1, 32), max(RETRY_CAP, base))

    def hold(self, batch: dict[str, str], now: float, reason: str) -> Retry:
        """A taken batch was not restarted for (config test failed, ...): retry it later."""
        now = _check_now(now)
        attempts = (self.retry.attempts if self.retry else 0) + 1
        self.restore(batch, now)
        # The reason holds command output: kept as it will be shown (escaped, bounded).
        self.retry = Retry(attempts, now + self.retry_delay(attempts), safe(reason, MAX_REASON_LEN))
        return self.retry

    def clear_retry(self) -> None:
        self.retry = None

    def take_batch(self) -> dict[str, str]:
        """Pop everything pending (md -> fingerprint) and close the window."""
        batch = {md: p.fingerprint for md, p in self.pending.items()}
        self.pending.clear()
        self.window_opened_at = None
        return batch

    def restore(self, batch: dict[str, str], now: float) -> list[str]:
        """Put a taken batch back without losing requests that arrived after it was taken.

        A newer request for the same MD wins, since it names the set staged now. The batch's
        window had already ended, so when nothing else is pending it is due again at once
        (still subject to `min_interval`); when newer requests are pending, their window is
        kept, because their hooks may still be running. Returns the MDs left out because the
        plan is at MAX_PENDING (their hooks or the daily check ask again).
        """
        now = _check_now(now)
        self._clamp(now)
        if not batch:
            return []
        if not self.pending:
            self.window_opened_at = now - self.settle
        left_out = []
        for md, fingerprint in batch.items():
            if md in self.pending:
                continue
            if len(self.pending) >= MAX_PENDING:
                left_out.append(md)
                continue
            self.pending[md] = Pending(fingerprint, now)
        return left_out

    def record_restart(self, now: float) -> None:
        self.last_restart_at = _check_now(now)
        self.retry = None

    def record_outcome(self, batch: dict[str, str], activated: set[str]) -> list[str]:
        """After verification: remember the sets of `batch` that did not become active.

        An MD whose new set did activate keeps its failed entry: that entry names another
        set, and www-data staging the failed one again must not buy it another restart.
        Returns the MDs whose (oldest) entries were forgotten to stay within MAX_FAILED.
        """
        for md, fingerprint in batch.items():
            if md not in activated:
                self.failed.pop(md, None)  # re-inserted at the end, so the oldest go first
                self.failed[md] = fingerprint
        forgotten = []
        while len(self.failed) > MAX_FAILED:
            oldest = next(iter(self.failed))
            del self.failed[oldest]
            forgotten.append(oldest)
        return forgotten

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "pending": {
                md: {"fingerprint": p.fingerprint, "requested_at": p.requested_at}
                for md, p in self.pending.items()
            },
            "window_opened_at": self.window_opened_at,
            "last_restart_at": self.last_restart_at,
            "failed": dict(self.failed),
            "retry": None if self.retry is None else {
                "attempts": self.retry.attempts, "at": self.retry.at, "reason": self.retry.reason},
        }

    @classmethod
    def from_dict(cls, d: object, settle: float, min_interval: float) -> Scheduler:
        """Rebuild a scheduler from `to_dict()` output; ValueError on anything malformed.

        Strict on purpose: the caller then starts from an empty plan instead of acting on
        half-understood state.
        """
        s = cls(settle, min_interval)
        _expect(isinstance(d, dict), "not an object")
        assert isinstance(d, dict)
        version = d.get("version")
        _expect(type(version) is int and version in (1, STATE_VERSION), f"unsupported version {version!r}")
        expected = _KEYS_V1 if version == 1 else _KEYS_V2
        if set(d) != expected:
            unknown = sorted(str(k) for k in set(d) - expected)
            missing = sorted(expected - set(d))
            raise ValueError(f"scheduler state: unknown keys {unknown}, missing keys {missing}")

        pending = d["pending"]
        _expect(isinstance(pending, dict), "pending is not an object")
        _expect(len(pending) <= MAX_PENDING, "too many pending entries")
        for md, entry in pending.items():
            _check_name("pending", md)
            _expect(isinstance(entry, dict) and set(entry) == {"fingerprint", "requested_at"},
                    "a pending entry is malformed")
            _check_fingerprint("pending fingerprint", entry["fingerprint"])
            s.pending[md] = Pending(entry["fingerprint"], _time("requested_at", entry["requested_at"]))

        opened = d["window_opened_at"]
        if opened is None:
            _expect(not s.pending, "requests pending but no window open")
        else:
            _expect(bool(s.pending), "window open with nothing pending")
            s.window_opened_at = _time("window_opened_at", opened)

        s.last_restart_at = _time("last_restart_at", d["last_restart_at"])

        s.failed.update(check_fingerprint_map("scheduler state: failed", d["failed"], MAX_FAILED))

        retry = d.get("retry")
        if retry is not None:
            _expect(isinstance(retry, dict) and set(retry) == {"attempts", "at", "reason"},
                    "retry is malformed")
            attempts = retry["attempts"]
            _expect(type(attempts) is int and 0 < attempts < 10**6, "retry attempts is not a count")
            _expect(is_safe(retry["reason"], MAX_REASON_LEN),
                    "retry reason is not a short printable string")
            _expect(bool(s.pending), "retry scheduled with nothing pending")
            s.retry = Retry(attempts, _time("retry at", retry["at"]), retry["reason"])
        return s


# from_dict() promises ValueError for every kind of malformed state, type errors included,
# so that its caller needs one except clause; hence a helper rather than isinstance/raise.
def _expect(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(f"scheduler state: {problem}")


def _check_name(what: str, value: object) -> None:
    """An MD name exactly as a request would have to give it (the messages never quote it)."""
    _expect(isinstance(value, str), f"{what}: not a string")
    try:
        validate_md_name(value)  # type: ignore[arg-type]
    except errors.InvalidName:
        raise ValueError(f"scheduler state: {what}: not a valid MD name") from None


def check_fingerprint(what: str, value: object) -> None:
    if not isinstance(value, str) or not _FINGERPRINT_RE.fullmatch(value):
        raise ValueError(f"{what}: not a set fingerprint (64 lower-case hex digits)")


def check_fingerprint_map(what: str, value: object, bound: int) -> dict[str, str]:
    """A state file's map of MD name -> set fingerprint, each name as a request would have to
    give it: the map, or ValueError."""
    if not isinstance(value, dict) or len(value) > bound:
        raise ValueError(f"{what} is not a map of at most {bound} entries")
    for md, fingerprint in value.items():
        try:
            validate_md_name(md)
        except errors.InvalidName:
            raise ValueError(f"{what} names an invalid MD") from None
        check_fingerprint(what, fingerprint)
    return value


def _check_fingerprint(what: str, value: object) -> None:
    check_fingerprint(f"scheduler state: {what}", value)


def _time(what: str, value: object) -> float:
    # Negative values are allowed: restore() backdates a window by `settle`, which a fake
    # clock near 0 (or a badly set one) can take below the epoch.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"scheduler state: {what} is not a finite number")
    return float(value)
