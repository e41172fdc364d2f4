"""The broker's core: takes requests, plans restarts, runs and verifies them. No D-Bus here.

The D-Bus layer (service.py) authorizes the caller and then calls `request`,
`check_all` or `status`; it learns about changes through the two listener callbacks.
Time, the store, the restart runner, the verifier and the state file are all injected,
so the whole flow runs in unit tests with a fake clock and fake Apache.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import __version__, log, metrics, selftest, storelock
from .config import Config
from .due import others_due
from .errors import AlreadyFailed, BrokerError, NothingStaged, RateLimited
from .ratelimit import RateLimiter
from .restart import Restarter, RestartOutcome
from .scheduler import MAX_PENDING, MAX_REASON_LEN, Scheduler, check_fingerprint_map
from .served import RefreshMemory, Served, behind, probe_all, sni_name
from .staging import CertSet, Store, validate_md_name
from .state import StateFile
from .text import MAX_TEXT, is_safe, safe
from .timefmt import local_iso
from .verify import Verdict, verify_activation

# How often job.json is looked at while a settle window is open: it decides an early end.
JOB_POLL_SECONDS = 0.25
# mod_md writes "notified-renewed" a few milliseconds after the hook got its answer, and the
# restart waits for it: right after a request job.json is looked at this often, then less and
# less often, down to JOB_POLL_SECONDS (a quarter of the time since the request).
JOB_POLL_FIRST_SECONDS = 0.01
# Once every MD of the window shows mod_md's "notified-renewed", the window still waits this
# long with no other renewal under way before it ends early, when another managed MD is due
# for renewal too. mod_md renews MDs one after another: the next MD's job starts a moment
# after the previous hook returned, and its `renewed` should join this restart rather than
# cause a second one. When no other MD is due, nothing will join: no wait.
QUIET_SECONDS = 1.0

# Store reads run in worker threads: a slow store (a huge staged certificate, a hanging
# file system) must never delay another caller's reply or a Properties.Get. Callers' checks
# (request, check_all, status) share a few threads; the restart loop (settle polling,
# re-check, verification) has its own, so callers cannot starve a restart that is due.
CALLER_WORKERS = 2
LOOP_WORKERS = 1
# LastResult and RestartFinished's detail: at most this many characters (escaped).
MAX_RESULT = MAX_TEXT
STATE_VERSION = 1
_STATE_KEYS = frozenset({"version", "scheduler", "in_progress", "last_restart_usec", "last_result"})
# Keys added after version 1, absent in older files; each one is checked where it is read.
_STATE_OPTIONAL_KEYS = frozenset({"last_result_usec", "refresh_pending", "refresh_failed", "restarts"})

T = TypeVar("T")
Verifier = Callable[[Store, Mapping[str, CertSet], Sequence[str], float], Awaitable[Verdict]]
# (probe addresses, md -> SNI name) -> md -> what each address serves
Prober = Callable[[Sequence[str], Mapping[str, str]], Awaitable[dict[str, list[Served]]]]


def _usec(t: float) -> int:
    return max(0, int(round(t * 1_000_000)))


def job_poll_seconds(since_request: float) -> float:
    """How long the restart loop waits before it looks at job.json again."""
    if since_request < 0:  # the wall clock stepped back: nothing tells how recent the request is
        return JOB_POLL_SECONDS
    return min(JOB_POLL_SECONDS, max(JOB_POLL_FIRST_SECONDS, since_request / 4))


class Engine:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        restarter: Restarter,
        state: StateFile,
        *,
        clock: Callable[[], float] = time.time,
        verifier: Verifier | None = None,
        prober: Prober | None = None,
        store_lock: Callable[[], Awaitable[object]] | None = None,
    ):
        self.cfg = cfg
        self.store = store
        self.restarter = restarter
        self.state = state
        self.clock = clock
        self._caller_pool = ThreadPoolExecutor(CALLER_WORKERS, thread_name_prefix="store-caller")
        self._loop_pool = ThreadPoolExecutor(LOOP_WORKERS, thread_name_prefix="store-loop")
        self.verifier: Verifier = verifier or (
            lambda st, batch, probes, timeout: verify_activation(st, batch, probes, timeout,
                                                                 run=self._loop_io))
        self.prober: Prober = prober or (lambda probes, names: probe_all(probes, names))
        self.store_lock = store_lock or (lambda: storelock.wait_until_free(cfg.md_store))
        # Cluster: MDs scheduled because this node serves them behind the store (md -> the
        # active fingerprint), and refresh restarts that did not help (never repeated).
        self.refresh_pending: dict[str, str] = {}
        self.refresh_failed = RefreshMemory()
        self.last_served: dict[str, list[Served]] = {}
        self._probe_task: asyncio.Future[dict[str, list[Served]]] | None = None
        self.restart_counts: dict[str, int] = {"ok": 0, "failed": 0}
        self.limiter = RateLimiter(cfg.rate_burst, cfg.rate_per_second)
        self.scheduler = Scheduler(cfg.settle_seconds, cfg.min_interval_seconds)
        self.last_restart_usec = 0
        self.last_result = ""
        # When the attempt that produced last_result ran: a config test that failed issued no
        # restart, so LastRestart still names an earlier one.
        self.last_result_usec = 0
        self.restarting = False
        self.on_properties_changed: Callable[[dict[str, Any]], None] = lambda changed: None
        self.on_restart_finished: Callable[[bool, str, list[str]], None] = lambda ok, detail, mds: None
        self._wakeup = asyncio.Event()
        # What the last look at job.json found (see poll_mod_md): the property getters and the
        # plan read only these, never the store.
        self._mod_md_done = False
        self._settled_since: float | None = None
        self._quiet_needed = True
        self._requested_at = float("-inf")
        # Staging checks running for requests, by MD (see _check_staged).
        self._checking: dict[str, asyncio.Future[CertSet]] = {}
        self._load_state()
        self._announced = self.properties()

    # -- state on disk -------------------------------------------------------------------

    def _load_state(self) -> None:
        data = self.state.load()
        if data:
            try:
                self._restore(data)
            except (ValueError, TypeError, KeyError) as e:
                # As strict as the configuration: acting on half-understood state is worse
                # than one restart that a later renewal or the daily check asks for again.
                self.state.discard(f"has unusable content ({safe(e)})")
                self.scheduler = Scheduler(self.cfg.settle_seconds, self.cfg.min_interval_seconds)
                self.last_restart_usec, self.last_result, self.last_result_usec = 0, "", 0
                self.refresh_pending, self.refresh_failed = {}, RefreshMemory()
                self.restart_counts = {"ok": 0, "failed": 0}
                self._save()
        if self.scheduler.pending:
            log.notice(f"resuming pending restart for {', '.join(sorted(self.scheduler.pending))}")

    def _restore(self, data: dict) -> None:
        """Take over a saved state; ValueError/TypeError/KeyError on anything malformed."""
        missing = _STATE_KEYS - set(data)
        unknown = set(data) - _STATE_KEYS - _STATE_OPTIONAL_KEYS
        if missing or unknown:
            raise ValueError(f"missing keys {sorted(missing)}, unknown keys {sorted(map(safe, unknown))}")
        if type(data["version"]) is not int or data["version"] != STATE_VERSION:
            raise ValueError("unsupported version")
        scheduler = Scheduler.from_dict(data["scheduler"], self.cfg.settle_seconds,
                                        self.cfg.min_interval_seconds)
        # A batch that was being restarted when the broker stopped goes back to pending:
        # the restart runs again if the set is still staged, and is a no-op if it was activated.
        in_progress = check_fingerprint_map("in_progress", data["in_progress"], MAX_PENDING)
        last_restart, last_result = data["last_restart_usec"], data["last_result"]
        # Older state files lack it: the result then belongs to the last restart.
        last_result_usec = data.get("last_result_usec", last_restart)
        for key, value in (("last_restart_usec", last_restart), ("last_result_usec", last_result_usec)):
            if type(value) is not int or not 0 <= value < 2**63:
                raise ValueError(f"{key} is not a time in µs")
        if not is_safe(last_result, MAX_RESULT) or not (
                last_result in ("", "ok") or last_result.startswith("failed: ")):
            raise ValueError("last_result is not a printable result of bounded length")
        # The cluster's keys (added after version 1: absent is empty).
        refresh_pending = check_fingerprint_map("refresh_pending", data.get("refresh_pending") or {},
                                                MAX_PENDING)
        refresh_failed = RefreshMemory.from_dict(data.get("refresh_failed") or {})
        counts = data.get("restarts") or {}
        if not isinstance(counts, dict) or not all(
                k in ("ok", "failed") and type(v) is int and 0 <= v < 2**63 for k, v in counts.items()):
            raise ValueError("restarts is not a count per result")
        left_out = scheduler.restore(in_progress, self.clock()) if in_progress else []
        for md in left_out:
            log.warning(f"{md}: not resumed: {MAX_PENDING} MDs already pending")
        self.scheduler, self.last_restart_usec, self.last_result = scheduler, last_restart, last_result
        self.last_result_usec = last_result_usec
        self.refresh_pending, self.refresh_failed = dict(refresh_pending), refresh_failed
        self.restart_counts = {"ok": counts.get("ok", 0), "failed": counts.get("failed", 0)}

    def _save(self, in_progress: Mapping[str, str] | None = None) -> None:
        data = {
            "version": STATE_VERSION,
            "scheduler": self.scheduler.to_dict(),
            "in_progress": dict(in_progress or {}),
            "last_restart_usec": self.last_restart_usec,
            "last_result": self.last_result,
            "last_result_usec": self.last_result_usec,
            "refresh_pending": dict(self.refresh_pending),
            "refresh_failed": self.refresh_failed.to_dict(),
            "restarts": dict(self.restart_counts),
        }
        try:
            self.state.save(data)
        except Exception as e:  # documented: saving never raises
            # Keep serving from memory: losing persistence is bad, refusing renewals is worse.
            log.err(f"could not save state: {type(e).__name__}: {e}")

    # -- properties ----------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self.scheduler.pending)

    @property
    def planned_at_usec(self) -> int:
        planned = self._planned_at(self.clock())
        return 0 if planned is None else _usec(planned)

    def _planned_at(self, now: float) -> float | None:
        settled = self._settled(now)
        return self.scheduler.planned_at(now, lambda md: settled)

    def _settled(self, now: float) -> bool:
        """May the settle window end early? mod_md is done with every MD in it, and quiet.

        Decided from what poll_mod_md() last saw: no store read here (properties use it).
        """
        if not self._mod_md_done or self._settled_since is None:
            return False
        if self._settled_since > now:
            self._settled_since = now
        return not self._quiet_needed or now - self._settled_since >= QUIET_SECONDS

    def _mod_md_done_now(self, pending: tuple[str, ...], refreshes: frozenset[str] = frozenset()) -> bool:
        """In a worker thread: job.json shows every MD of `pending` notified, none other renewing.

        `refreshes` (served behind the store, nothing staged) have no job of mod_md's to wait for.
        """
        try:
            return bool(pending) and all(
                md in refreshes or self.store.job_notified(md) for md in pending) and not any(
                md not in pending for md in self.store.renewals_in_progress())
        except (BrokerError, OSError) as e:
            # An unreadable store only costs the early end: the settle time still ends the window.
            log.warning(f"cannot tell whether mod_md is done: {e}")
            return False

    async def poll_mod_md(self) -> None:
        """Look at job.json again (in a worker thread) for the early end of the settle window."""
        pending = tuple(self.scheduler.pending)
        refreshes = frozenset(md for md, p in self.scheduler.pending.items() if self._is_refresh(md, p.fingerprint))
        done = bool(pending) and await self._loop_io(self._mod_md_done_now, pending, refreshes)
        if tuple(self.scheduler.pending) != pending:
            done = False  # the plan changed while we looked: look again next time
        if not done:
            self._settled_since = None
        elif self._settled_since is None:
            # Asked once per quiet period, not at every poll: it reads every managed MD.
            self._quiet_needed = await self._loop_io(self._others_due, pending, self.clock())
            self._settled_since = self.clock()
        self._mod_md_done = done

    def _others_due(self, pending: tuple[str, ...], now: float) -> bool:
        """In a worker thread: is another managed MD due for renewal (so worth a quiet second)?"""
        try:
            return bool(others_due(self.store, pending, now))
        except (BrokerError, OSError) as e:
            log.warning(f"cannot tell which other MDs are due for renewal: {e}")
            return True

    async def _caller_io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._caller_pool, functools.partial(fn, *args))

    async def _loop_io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._loop_pool, functools.partial(fn, *args))

    def properties(self) -> dict[str, Any]:
        return {
            "Version": __version__,
            "Pending": self.pending,
            "PlannedAt": self.planned_at_usec,
            "LastRestart": self.last_restart_usec,
            "LastResult": self.last_result,
        }

    @property
    def announced(self) -> dict[str, Any]:
        """The property values as last announced: what a D-Bus Get answers, never raising."""
        return dict(self._announced)

    def _announce(self) -> None:
        """Tell listeners which properties changed since they last heard (PropertiesChanged)."""
        now = self.properties()
        changed = {k: v for k, v in now.items() if self._announced.get(k) != v}
        self._announced = now
        if changed:
            self.on_properties_changed(changed)

    # -- requests ------------------------------------------------------------------------

    async def request(self, md: str, caller_uid: int) -> int:
        """Schedule a restart for `md`'s staged set; returns the planned time in µs.

        The caller is already authorized. Raises the core's BrokerErrors, each with a
        message fit for the caller.
        """
        # The engine's one clock: the limiter copes with a wall clock stepping backwards.
        if not self.limiter.allow(caller_uid, self.clock()):
            raise RateLimited("too many requests; try again later")
        validate_md_name(md)
        try:
            staged = await self._check_staged(md)
        except NothingStaged:
            active = await self._caller_io(_safe, self.store.active, md) if caller_uid == 0 else None
            if active is not None and self.refresh_failed.forget(md):
                log.info(f"{md}: root retries the restart that did not make this node serve "
                         "the active certificate")
                return await self._schedule_refresh({md: active}, override=True)
            if active is not None and self._is_refresh(md, active.fingerprint):
                # A refresh held back (config test): root retries it now, as for a staged set.
                log.info(f"{md}: root retries the held-back restart for the active certificate")
                return await self._schedule_refresh({md: active}, override=True)
            raise
        planned, _ = self._schedule({md: staged}, override=(caller_uid == 0))
        await self._write_metrics()
        return planned

    async def _check_staged(self, md: str) -> CertSet:
        """The staged set's check (in a worker thread), shared by the requests for `md` that
        arrive while it runs.

        A burst's calls are released together by one polkit answer (authz.py): each checking on
        its own re-read and re-parsed the same files (about two milliseconds of CPU) while the
        rest of the burst waited. A request that arrives during a check takes its answer, which
        is what it would have got a moment earlier; the next request after it checks again, and
        the restart re-checks every set before it is carried out.
        """
        running = self._checking.get(md)
        if running is None:
            running = asyncio.ensure_future(self._caller_io(self.store.check_staged, md))
            self._checking[md] = running
            running.add_done_callback(lambda f: self._check_done(md, f))
        # One caller giving up (its call was cancelled) must not cancel the others' check.
        return await asyncio.shield(running)

    def _check_done(self, md: str, check: asyncio.Future[CertSet]) -> None:
        if self._checking.get(md) is check:
            del self._checking[md]
        if not check.cancelled():
            check.exception()  # seen here, so a refusal nobody awaits any more is no warning

    async def dry_run(self, md: str, caller_uid: int) -> int:
        """What request() would answer now, scheduling nothing: the planned time, or its error.

        Limited like a request (it costs as much): `apache-restart test` runs it as the Apache
        user to prove that the bus policy and polkit let the hook through.
        """
        if not self.limiter.allow(caller_uid, self.clock()):
            raise RateLimited("too many requests; try again later")
        validate_md_name(md)
        staged = await self._caller_io(self.store.check_staged, md)
        trial = Scheduler.from_dict(self.scheduler.to_dict(), self.cfg.settle_seconds,
                                    self.cfg.min_interval_seconds)
        now = self.clock()
        planned = trial.add(md, staged.fingerprint, now, override=(caller_uid == 0))
        return _usec(max(now, planned))

    async def self_test(self, md: str) -> dict[str, Any]:
        """The broker's checks for `apache-restart test` (see selftest.py); changes nothing."""
        running = getattr(self.restarter, "apache_running", None)
        apache_running = None
        if self.cfg.restart_via == "command" and callable(running):
            pid_file = self.cfg.pid_file

            def apache_running() -> tuple[bool, str]:
                if running():
                    return True, f"a live process is named in {pid_file}"
                return False, f"no live process is named in {pid_file}"
        steps = await selftest.run(self.cfg.md_store, self.store, md, dict(self.scheduler.failed),
                                   self.cfg.configtest_command, self.cfg.command_timeout_seconds,
                                   self.cfg.probe, apache_running, run=self._caller_io)
        return selftest.as_json(steps)

    def _schedule(self, sets: Mapping[str, CertSet], override: bool) -> tuple[int, list[str]]:
        """Add `sets` to the plan; (planned time in µs, MDs added). Raises the first refusal
        when none could be added."""
        now = self.clock()
        planned = now
        before = set(self.scheduler.pending)
        added: list[str] = []
        refusal: BrokerError | None = None
        for md, staged in sets.items():
            was_failed = self.scheduler.failed.get(md) == staged.fingerprint
            try:
                planned = self.scheduler.add(md, staged.fingerprint, now, override=override)
            except RateLimited as e:  # the plan is at MAX_PENDING
                log.warning(f"{md}: restart not scheduled: {e.message}")
                refusal = refusal or e
                continue
            added.append(md)
            log.info(f"{md}: restart requested for staged serial "
                     f"{', '.join(c.serial for c in staged.certs)}"
                     + (" (root retries a set that failed before)" if was_failed else ""))
        if not added and refusal is not None:
            raise refusal
        self._requested_at = now
        if set(self.scheduler.pending) != before:
            # job.json was looked at for another set of MDs: the early end needs a new look.
            self._mod_md_done, self._settled_since = False, None
        planned_at = self._planned_at(now)
        self._save()
        self._announce()
        self._wakeup.set()
        # "Due now" may come back as a moment just past; a reply never names the past.
        return _usec(max(now, planned_at if planned_at is not None else planned)), added

    def _check_every_md(self) -> dict[str, CertSet]:
        """In a worker thread: every MD whose staged set verifies."""
        found: dict[str, CertSet] = {}
        for md in self.store.list_mds():
            try:
                found[md] = self.store.check_staged(md)
            except NothingStaged:
                continue
            except BrokerError as e:
                log.notice(f"{md}: staged set not scheduled: {e.message}")
        return found

    async def check_all(self) -> tuple[list[str], int]:
        """Schedule every MD whose staged set verifies (the daily safety net for lost hooks)."""
        found = await self._caller_io(self._check_every_md)
        for md, staged in list(found.items()):
            if self.scheduler.failed.get(md) == staged.fingerprint:
                log.notice(f"{md}: staged set already failed to activate once; not scheduled again")
                del found[md]
        if not found:
            return [], self.planned_at_usec
        try:
            planned, added = self._schedule(found, override=False)
        except RateLimited:
            return [], self.planned_at_usec
        return sorted(added), planned

    async def check(self) -> tuple[list[str], int]:
        """CheckAll: every valid staged set, and every MD this node serves behind the store."""
        scheduled, planned = await self.check_all()
        served = await self.probe_served()
        refresh: dict[str, CertSet] = {}
        for md, entries in served.items():
            if md in self.scheduler.pending:
                continue  # a restart is coming anyway
            active = await self._caller_io(_safe, self.store.active, md)
            name = None if active is None else sni_name(active)
            if active is None or name is None:
                continue
            lagging = behind(entries, active, name)
            if not lagging:
                continue
            what = ", ".join(f"{e.probe} serves serial {e.serial}" for e in lagging)
            if self.refresh_failed.failed_before(md, active.fingerprint):
                log.notice(f"{md}: served behind the store ({what}), but a restart did not change "
                           "that before; not restarted again (root may request it)")
                continue
            log.notice(f"{md}: served behind the store ({what}; active serial "
                       f"{', '.join(c.serial for c in active.certs)}): restart planned")
            refresh[md] = active
        if refresh:
            planned = await self._schedule_refresh(refresh)
            scheduled = sorted(set(scheduled) | (set(refresh) & set(self.refresh_pending)))
        else:
            await self._write_metrics()
        return scheduled, planned

    def _is_refresh(self, md: str, fingerprint: str) -> bool:
        return self.refresh_pending.get(md) == fingerprint

    async def _schedule_refresh(self, sets: Mapping[str, CertSet], override: bool = False) -> int:
        """Schedule restarts that make this node serve the active sets (no staged set involved).

        `override`: root asked, which (as for a staged set) also ends a retry's back-off."""
        now = self.clock()
        before = set(self.scheduler.pending)
        for md, active in sets.items():
            try:
                self.scheduler.add(md, active.fingerprint, now, override=override)
            except AlreadyFailed:
                # This node failed to activate exactly this set itself: the scheduler's rule.
                log.notice(f"{md}: the active set failed to activate here before; not scheduled")
                continue
            except RateLimited as e:  # the plan is at MAX_PENDING
                log.warning(f"{md}: restart not scheduled: {e.message}")
                continue
            self.refresh_pending[md] = active.fingerprint
        if set(self.scheduler.pending) != before:
            self._mod_md_done, self._settled_since = False, None
        planned_at = self._planned_at(now)
        self._save()
        self._announce()
        self._wakeup.set()
        await self._write_metrics()
        return _usec(max(now, planned_at)) if planned_at is not None else self.planned_at_usec

    def _probe_names(self, mds: Sequence[str] | None) -> dict[str, str]:
        """In a worker thread: md -> the SNI name to probe, for each MD managed by this Apache
        (domains/<md>/, root-owned and written by mod_md, has a set with a non-wildcard name)."""
        names: dict[str, str] = {}
        for md in self.store.list_mds() if mds is None else mds:
            active = _safe(self.store.active, md)
            name = None if active is None else sni_name(active)
            if name is not None:
                names[md] = name
        return names

    async def probe_served(self, mds: Sequence[str] | None = None, fresh: bool = True) -> dict[str, list[Served]]:
        """Ask every probe address what it serves for each managed MD (bounded in time).

        Not `fresh` (GetStatus): a round for every MD that is already under way is joined, not
        repeated: the monitoring group may call GetStatus as often as it likes, and each call
        must not cost a round of TLS handshakes. What decides a restart (CheckAll, the look
        after a restart) starts its own round: one begun before a restart would show what
        Apache served before it.
        """
        if mds is not None:
            return await self._probe_round(mds)
        if fresh or self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.ensure_future(self._probe_round(None))
        # shield: a caller that goes away (its D-Bus call timed out) leaves the round to the others.
        return await asyncio.shield(self._probe_task)

    async def _probe_round(self, mds: Sequence[str] | None) -> dict[str, list[Served]]:
        if not self.cfg.probe:
            self.last_served = {}
            return {}
        names = await self._caller_io(self._probe_names, mds)
        served = await self.prober(self.cfg.probe, names)
        if mds is None:
            self.last_served = dict(served)
        else:
            self.last_served.update(served)
        return served

    async def status_probed(self) -> dict[str, Any]:
        """GetStatus: `status` with what every probe address serves right now."""
        await self.probe_served(fresh=False)
        status = await self.status()
        await self._write_metrics(status)
        return status

    async def _write_metrics(self, status: dict[str, Any] | None = None) -> None:
        """The Prometheus file (metrics_file), after each event and check; never raises."""
        if not self.cfg.metrics_file:
            return
        try:
            status = status or await self.status()
            await self._caller_io(metrics.write, self.cfg.metrics_file, status, dict(self.restart_counts))
        except Exception as e:  # the file is a report: it must never stop the broker
            log.warning(f"could not write the metrics file: {type(e).__name__}: {e}")

    def _status_of_mds(self, pending: frozenset[str], failed: Mapping[str, str],
                       served_now: Mapping[str, list[Served]], refresh_failed: Mapping[str, str]
                       ) -> tuple[list[dict[str, Any]], int]:
        """In a worker thread: the per-MD part of status() and how many unmanaged staging
        directories it left out (`pending`, `failed`, `served_now`,
        `refresh_failed`: snapshots)."""
        mds = []
        listed, left_out = self.store.survey()
        for md in listed:
            entry: dict[str, Any] = {"name": md, "active": None, "staged": None,
                                     "pending": md in pending, "failed_before": False}
            try:
                active = self.store.active(md)
            except BrokerError as e:
                active, entry["active_problem"] = None, e.message
            if active is not None:
                entry["active"] = _set_summary(active)
            try:
                staged = self.store.check_staged(md)
                entry["staged"] = dict(_set_summary(staged), valid=True, problem="")
                entry["failed_before"] = failed.get(md) == staged.fingerprint
            except NothingStaged:
                pass
            except BrokerError as e:
                entry["staged"] = {"valid": False, "problem": e.message}
            served = served_now.get(md, [])
            entry["served"] = [s.to_json() for s in served]
            # Cluster: this node serves an older certificate than the store's active one, and
            # whether a restart for exactly that already failed to change it (not repeated).
            name = None if active is None else sni_name(active)
            entry["served_behind"] = bool(active is not None and name is not None and behind(served, active, name))
            entry["served_behind_failed"] = bool(
                active is not None and refresh_failed.get(md) == active.fingerprint)
            mds.append(entry)
        return mds, left_out

    async def status(self) -> dict[str, Any]:
        """Everything the admin command shows, as plain JSON-able data."""
        mds, left_out = await self._caller_io(self._status_of_mds, frozenset(self.scheduler.pending),
                                    dict(self.scheduler.failed), dict(self.last_served),
                                    self.refresh_failed.to_dict())
        props = self.properties()
        now = self.clock()
        settled = self._settled(now)
        plan = self.scheduler.plan(now, lambda md: settled)
        retry = self.scheduler.retry
        return {
            "version": props["Version"],
            "pending": props["Pending"],
            "planned_at_usec": props["PlannedAt"],
            "waiting_for": plan[1] if plan is not None and plan[0] > now else "",
            "retry": None if retry is None else {
                "attempts": retry.attempts, "at_usec": _usec(retry.at), "reason": retry.reason},
            "last_restart_usec": props["LastRestart"],
            "last_result": props["LastResult"],
            "last_result_usec": self.last_result_usec,
            "restarting": self.restarting,
            "md_store": self.cfg.md_store,
            "mds": mds,
            "unmanaged_not_listed": left_out,
        }

    # -- the restart loop ----------------------------------------------------------------

    def idle(self) -> bool:
        return not self.scheduler.pending and not self.restarting

    async def run(self) -> None:
        """Carry out planned restarts, forever."""
        await self._write_metrics()  # a fresh file at start: the previous one may be a broker ago
        while True:
            await self.poll_mod_md()
            planned = self._planned_at(self.clock())
            self._announce()  # the window may have ended early: PlannedAt moved
            if planned is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = planned - self.clock()
            if delay > 0:
                # Re-evaluate often: job.json may end the settle window early, and new
                # requests may arrive.
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(),
                                           min(delay, job_poll_seconds(self.clock() - self._requested_at)))
                except TimeoutError:
                    pass
                continue
            await self.restart_now()

    async def restart_now(self) -> None:
        batch = self.scheduler.take_batch()
        if not batch:
            return
        self.restarting = True
        self._save(in_progress=batch)
        try:
            await self._restart_batch(batch)
        finally:
            self.restarting = False
            # Whatever became of them, these refresh requests are answered (a new check asks
            # again), except those held back for a retry: they are pending again, as they were.
            for md, fingerprint in batch.items():
                again = self.scheduler.pending.get(md)
                if self._is_refresh(md, fingerprint) and (again is None or again.fingerprint != fingerprint):
                    del self.refresh_pending[md]
            self._save()

    async def _restart_batch(self, batch: Mapping[str, str]) -> None:
        refreshing = frozenset(md for md, fp in batch.items() if self._is_refresh(md, fp))
        sets, already_active, dropped = await self._loop_io(
            self._recheck, batch, dict(self.scheduler.failed), refreshing)
        # The last look before the restart: a set swapped while (or after) it was verified is
        # not what was verified, so it is not restarted for. (A refresh is for the active set:
        # nothing staged to swap.)
        changed, activated = await self._loop_io(
            self._changed_since_check, {md: s for md, s in sets.items() if md not in refreshing})
        for md in changed:
            del sets[md]
            dropped.append(f"{md}: staged set changed after verification")
            log.warning(f"dropped from restart: {md}: staged set changed after verification")
        for md in activated:
            del sets[md]
            already_active.append(md)
        names = sorted(safe(md) for md in batch)
        if not sets:
            if already_active:
                log.info(f"{', '.join(already_active)}: already active, no restart needed")
            if not self.scheduler.pending:
                self.scheduler.clear_retry()  # nothing left that a retry would be for
            if dropped:
                self._finish(False, f"no restart: {'; '.join(dropped)}", names)
            self._announce()
            return
        # Another node of a cluster may be activating from the shared store right now.
        await self.store_lock()
        outcome: RestartOutcome = await self.restarter.restart()
        now = self.clock()
        self.last_result_usec = _usec(now)
        if not outcome.issued:
            self._hold({md: s.fingerprint for md, s in sets.items()}, now, outcome.detail)
        if outcome.issued:
            self.scheduler.record_restart(now)
            self.last_restart_usec = _usec(now)
        refreshes = {md: s for md, s in sets.items() if md in refreshing}
        fingerprints = {md: s.fingerprint for md, s in sets.items() if md not in refreshes}
        if outcome.ok:
            verdict = await self.verifier(self.store, sets, self.cfg.probe, self.cfg.verify_timeout_seconds)
            self._forget(self.scheduler.record_outcome(fingerprints, set(verdict.activated)))
            ok, detail = verdict.ok, verdict.detail
        else:
            if outcome.issued:
                # A graceful that failed may still have activated something: ask the store.
                verdict = await self.verifier(self.store, sets, (), 0.0)
                self._forget(self.scheduler.record_outcome(fingerprints, set(verdict.activated)))
            ok, detail = False, outcome.detail
        if refreshes:
            await self._record_refreshes(refreshes, issued=outcome.issued)
        if dropped:
            detail += f" ({len(dropped)} MD(s) dropped before the restart: {'; '.join(dropped)})"
        self.restart_counts["ok" if ok else "failed"] += 1
        self._finish(ok, detail, names)
        if self.cfg.metrics_file:
            if not refreshes:  # (those were probed just now)
                await self.probe_served()
            await self._write_metrics()

    async def _record_refreshes(self, refreshes: Mapping[str, CertSet], issued: bool) -> None:
        """Remember each MD that the restart did not bring up to the store, so it is not repeated.

        A restart that was never issued (config test failed, Apache not running) proved nothing:
        the next check may try again, as it does for staged sets.
        """
        if not issued:
            return
        served = await self.probe_served()
        for md, active in refreshes.items():
            entries = served.get(md, [])
            name = sni_name(active)
            fixed = bool(entries) and name is not None and not any(e.error for e in entries) \
                and not behind(entries, active, name)
            if not fixed:
                self.refresh_failed.remember(md, active.fingerprint)
                log.warning(f"{md}: the restart did not make this node serve the active certificate; "
                            "it will not be restarted for it again (root may request it)")

    def _finish(self, ok: bool, detail: str, names: list[str]) -> None:
        """Record and announce a restart's result: LastResult, the log, RestartFinished."""
        detail = safe(detail, MAX_RESULT)
        self.last_result = "ok" if ok else safe(f"failed: {detail}", MAX_RESULT)
        (log.notice if ok else log.err)(f"restart for {', '.join(names)}: {self.last_result}"
                                         + (f" ({detail})" if ok else ""))
        self._save()
        self._announce()
        self.on_restart_finished(ok, detail, names)

    def _hold(self, batch: dict[str, str], now: float, why: str) -> None:
        """No restart was issued (config test, Apache not running): retry the batch later."""
        # `why` carries the config test's output: escaped and bounded like LastResult.
        why = safe(why, MAX_REASON_LEN)
        retry = self.scheduler.hold(batch, now, why)
        first = sorted(batch)[0]
        log.warning(f"restart for {', '.join(sorted(batch))} held back ({why}); retry {retry.attempts} "
                    f"at the latest at {local_iso(retry.at)}; after fixing the cause, retry now with: "
                    f"apache-restart request {first}")
        for md in sorted(set(batch) - set(self.scheduler.pending)):
            log.warning(f"{md}: not kept for the retry: {MAX_PENDING} MDs already pending")

    @staticmethod
    def _forget(forgotten: list[str]) -> None:
        for md in forgotten:
            log.notice(f"{md}: forgetting that a restart failed for its staged set "
                       "(the oldest of too many remembered)")

    def _changed_since_check(self, sets: Mapping[str, CertSet]) -> tuple[list[str], list[str]]:
        """In a worker thread: (MDs whose staged set is no longer the one in `sets`, MDs whose
        set in `sets` became active meanwhile, e.g. through a restart by someone else)."""
        changed: list[str] = []
        activated: list[str] = []
        for md, cset in sets.items():
            try:
                now_staged = self.store.staged_fingerprint(md)
            except BrokerError:
                now_staged = None
            if now_staged == cset.fingerprint:
                continue
            active = _safe(self.store.active, md) if now_staged is None else None
            (activated if active is not None and active.fingerprint == cset.fingerprint
             else changed).append(md)
        return changed, activated

    def _recheck(self, batch: Mapping[str, str], failed: Mapping[str, str],
                 refreshing: frozenset[str] = frozenset()
                 ) -> tuple[dict[str, CertSet], list[str], list[str]]:
        """In a worker thread: look at each MD again just before restarting, since staging may
        have changed meanwhile. `failed` is a snapshot of the scheduler's; `refreshing` the MDs
        of the batch that are restarted for being served behind the store."""
        sets: dict[str, CertSet] = {}
        already_active: list[str] = []
        dropped: list[str] = []
        for md, fingerprint in batch.items():
            try:
                staged = self.store.check_staged(md)
            except NothingStaged:
                active = _safe(self.store.active, md)
                if active is not None and active.fingerprint == fingerprint and md in refreshing:
                    sets[md] = active  # served behind the store: the restart is the point
                elif active is not None and active.fingerprint == fingerprint:
                    already_active.append(md)
                else:
                    dropped.append(f"{md}: nothing staged any more")
                continue
            except BrokerError as e:
                dropped.append(f"{md}: {e.message}")
                continue
            # Staging changed since the request to a set that already failed once (a request
            # for exactly that set was root's override, and is kept).
            if failed.get(md) == staged.fingerprint and staged.fingerprint != fingerprint:
                dropped.append(f"{md}: the set staged now already failed to activate once")
                continue
            sets[md] = staged
        for item in dropped:
            log.warning(f"dropped from restart: {item}")
        return sets, already_active, dropped


def _safe(fn: Callable[[str], CertSet | None], md: str) -> CertSet | None:
    try:
        return fn(md)
    except BrokerError:
        return None


def _set_summary(s: CertSet) -> dict[str, Any]:
    return {
        "since_usec": _usec(s.since),
        "fingerprint": s.fingerprint,
        "names": list(s.names),
        "certs": [
            {"key_type": c.key_type, "serial": c.serial, "sha256": c.sha256, "issuer": c.issuer,
             "not_before_usec": _usec(c.not_before), "not_after_usec": _usec(c.not_after)}
            for c in s.certs
        ],
    }
