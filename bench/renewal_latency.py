"""Renewed -> new certificate served, on the real stack: one MD alone against the baseline.

    python bench/renewal_latency.py [--renewals 5] [--rounds 2] [--budget 300]

Starts three stacks of the end-to-end tier one after the other (pebble, Apache with mod_md, a private
bus, the real polkitd, the broker with the harness's settings, the real hook as MDMessageCmd),
all issuing short-lived certificates, so that mod_md renews by itself every few seconds:

    alone      one MD; no other MD is due for renewal, so the broker's settle window ends as
               soon as mod_md recorded that the hook delivered
    baseline   the same MD, plus a second managed MD that mod_md does not renew by itself
               (MDRenewMode manual, no certificate): it counts as due for renewal, so the
               window still waits a quiet second for it (what every renewal paid before)
    three      three MDs: their first certificates, which mod_md orders in one go while the
               other two are due (must cost exactly one graceful restart), then renewal rounds,
               with how far apart mod_md renewed them: MDs whose renewals are more than the
               quiet second apart, and not due yet when the first one is notified, are not
               "renewed together" and may each get their own restart

"renewed" is when mod_md logged the hook's answer (Apache's error log, microseconds), "served"
the first TLS handshake (polled every 20 ms) presenting the new serial, as in tests/e2e. For
each renewal it also splits the time at the graceful restart the broker issued (the harness's
graceful counter notes it after the config test), and notes when the broker accepted the
request (its PropertiesChanged signal). It prints the median and spread of each, the ratio
alone / baseline, and exits 1 when a stack fails or does not renew in time, 2 when three MDs
took other than one graceful restart a round. Run it as root, with the project installed
into the interpreter's venv (./scripts/setup-env), like the e2e tier.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import CertInfo, HarnessError, Stack, StackOptions, running_stack  # noqa: E402
from harness.broker import hook_lines  # noqa: E402

MD = "www.example.test"
# Managed, never renewed by mod_md on its own, no certificate: due for renewal in the broker's eyes.
IDLE_MD = "idle.example.test"
THREE = [f"www{i}.example.test" for i in range(1, 4)]
# As tests/e2e: mod_md renews about 8 s after each issue.
VALIDITY = 30
RENEW_WINDOW = "22s"
# mod_md's first order includes making its ACME account (seconds of key generation).
FIRST_CERT_TIMEOUT = 60
POLL = 0.02


def idle_md_config(https_port: int) -> str:
    return "\n".join([
        f"<MDomain {IDLE_MD}>",
        "    MDRenewMode manual",
        "</MDomain>",
        f"<VirtualHost *:{https_port}>",
        f"    ServerName {IDLE_MD}",
        "    SSLEngine on",
        "</VirtualHost>",
    ])


@dataclass
class Renewal:
    renewed: float        # mod_md logged the hook's answer (the last of a round)
    accepted: float | None  # the broker announced Pending (first of the round)
    graceful: float | None  # the broker issued the graceful restart (last before served)
    served: float         # the new serial on the wire (the last MD of a round)
    gracefuls: int        # graceful restarts since the previous renewal was served
    spread: float = 0.0   # first to last renewed hook of a round

    @property
    def total(self) -> float:
        return self.served - self.renewed


@dataclass
class Scenario:
    name: str
    mds: list[str]
    extra_config: Callable[[Stack], str] | None = None
    renewals: list[Renewal] = field(default_factory=list)
    first: Renewal | None = None
    error: str = ""
    stack: Stack | None = None


def served_serial(stack: Stack, md: str) -> int | None:
    assert stack.apache is not None
    try:
        cert = stack.apache.served_certificate(md, timeout=2)
    except OSError:
        return None
    return None if _fallback(cert) else cert.serial


def _fallback(cert: CertInfo) -> bool:
    return "Fallback" in cert.subject and cert.issuer == cert.subject


def wait_all_changed(stack: Stack, mds: Sequence[str], old: dict[str, int | None],
                     deadline: float) -> dict[str, tuple[int, float]]:
    """Poll until every MD serves another (non-fallback) serial than ``old``: serial and time seen."""
    seen: dict[str, tuple[int, float]] = {}
    while len(seen) < len(mds):
        for md in mds:
            if md in seen:
                continue
            serial = served_serial(stack, md)
            if serial is not None and serial != old.get(md):
                seen[md] = (serial, time.time())
        if time.monotonic() > deadline:
            missing = [md for md in mds if md not in seen]
            raise HarnessError(f"no new certificate served for {', '.join(missing)} in time")
        time.sleep(POLL)
    return seen


def renewed_time(stack: Stack, md: str, before: float) -> float:
    assert stack.apache is not None
    times = [h.time for h in hook_lines(stack.apache.error_log)
             if h.reason == "renewed" and h.md == md and "restart planned" in h.text and h.time <= before + 0.001]
    if not times:
        raise HarnessError(f"no delivered renewed hook call for {md} in Apache's log")
    return max(times)


def measure(s: Scenario, rounds: int, deadline: float) -> None:
    """First certificates, then ``rounds`` renewals (every MD of the scenario renewed once each)."""
    stack = s.stack
    assert stack is not None and stack.broker is not None and stack.broker.watcher is not None
    watcher = stack.broker.watcher
    old: dict[str, int | None] = {md: None for md in s.mds}
    since = 0.0
    for n in range(rounds + 1):
        limit = min(deadline, time.monotonic() + (FIRST_CERT_TIMEOUT if n == 0 else VALIDITY + 15))
        seen = wait_all_changed(stack, s.mds, old, limit)
        served_at = max(t for _, t in seen.values())
        renewed = [renewed_time(stack, md, t) for md, (_, t) in seen.items()]
        gracefuls = [g for g in stack.broker.gracefuls() if since < g <= served_at]
        accepted = [e.time for e in watcher.events
                    if e.member == "PropertiesChanged" and e.values.get("Pending") is True
                    and min(renewed) - 2 <= e.time <= served_at]
        r = Renewal(max(renewed), min(accepted) if accepted else None,
                    max(gracefuls) if gracefuls else None, served_at, len(gracefuls),
                    max(renewed) - min(renewed))
        if n == 0:
            s.first = r
        else:
            s.renewals.append(r)
        old = {md: serial for md, (serial, _) in seen.items()}
        since = served_at


def run_scenario(s: Scenario, rounds: int, deadline: float) -> None:
    try:
        measure(s, rounds, deadline)
    except Exception as e:  # reported with the stack's logs; the other scenarios go on
        s.error = f"{type(e).__name__}: {e}"


def start(s: Scenario, cleanup: ExitStack) -> None:
    options = StackOptions(
        domains=[[md] for md in s.mds],
        validity_seconds=VALIDITY,
        renew_window=RENEW_WINDOW,
        with_broker=True,
        start_apache=False,
    )
    stack = cleanup.enter_context(running_stack(options))
    s.stack = stack
    assert stack.apache is not None
    if s.extra_config is not None:
        stack.apache.settings.extra_config = s.extra_config(stack)
        stack.apache.write_config()
    stack.apache.start()


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):7.3f} {min(values):7.3f} {max(values):7.3f}"


def report(scenarios: dict[str, Scenario], renewals: int) -> int:
    alone, base, three = scenarios["alone"], scenarios["baseline"], scenarios["three"]
    print(f"renewed -> served, seconds ({renewals} renewals each; median, min, max)")
    width = 44
    print(f"{'':<{width}} {'median':>7} {'min':>7} {'max':>7}  all")
    for s, label in ((alone, "one MD alone"), (base, "one MD, another MD due (baseline)")):
        totals = [r.total for r in s.renewals]
        print(f"{label:<{width}} {spread(totals)}  " + " ".join(f"{t:.3f}" for t in totals))
    ratio = statistics.median(r.total for r in alone.renewals) / statistics.median(
        r.total for r in base.renewals)
    print(f"{'ratio alone / baseline (medians)':<{width}} {ratio:7.2f}")
    print()
    print("where the time goes (medians, s): renewed -> graceful issued -> served;"
          " broker accepted relative to renewed")
    for s, label in ((alone, "one MD alone"), (base, "baseline"), (three, "three MDs (renewal rounds)")):
        rs = [r for r in s.renewals if r.graceful is not None]
        if not rs:
            continue
        to_graceful = statistics.median(r.graceful - r.renewed for r in rs)  # type: ignore[operator]
        to_served = statistics.median(r.served - r.graceful for r in rs)  # type: ignore[operator]
        acc = [r.accepted - r.renewed for r in rs if r.accepted is not None]
        print(f"  {label:<{width - 2}} {to_graceful:7.3f} {to_served:7.3f}"
              + (f"   accepted {statistics.median(acc):+.3f}" if acc else ""))
    print()
    rounds = ([three.first] if three.first else []) + three.renewals
    print(f"three MDs renewed together ({', '.join(three.mds)}):")
    status = 0
    for i, r in enumerate(rounds):
        what = "first certificates" if i == 0 else f"renewal {i}"
        print(f"  {what:<20} graceful restarts {r.gracefuls}   renewed -> served {r.total:.3f} s"
              f" (last renewed hook to last MD served); renewed hooks {r.spread:.3f} s apart")
    if three.first is not None and three.first.gracefuls != 1:
        status = 2
        print("  FAILED: three MDs renewed together must cost exactly one graceful restart")
    return status


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--renewals", type=int, default=5, help="renewals measured per single-MD stack (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="renewal rounds of the three-MD stack (default 2)")
    p.add_argument("--budget", type=float, default=300, help="give up after this many seconds (default 300)")
    args = p.parse_args()
    if args.renewals < 1 or args.rounds < 1 or args.budget <= 0:
        p.error("--renewals, --rounds and --budget must be positive")
    if os.geteuid() != 0:
        raise SystemExit("run it as root, like the e2e tier (Apache, polkitd and a bus of its own)")
    signal.signal(signal.SIGTERM, _terminate)

    scenarios = {
        "alone": Scenario("alone", [MD]),
        "baseline": Scenario("baseline", [MD], lambda st: idle_md_config(st.https_port)),
        "three": Scenario("three", list(THREE)),
    }
    deadline = time.monotonic() + args.budget
    loads = []
    try:
        # One stack at a time: stacks side by side would renew at the same moments and share
        # the CPUs for their config tests and graceful restarts, inflating every figure.
        for name, s in scenarios.items():
            before = os.getloadavg()[0]
            with ExitStack() as cleanup:
                start(s, cleanup)
                run_scenario(s, args.rounds if name == "three" else args.renewals, deadline)
                if s.error:
                    print(f"{s.name}: {s.error}", file=sys.stderr)
                    if s.stack is not None:
                        print(s.stack.dump_logs(20), file=sys.stderr)
                    return 1
            loads.append(f"{name} {before:.2f} -> {os.getloadavg()[0]:.2f}")
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    except HarnessError as e:
        print(f"renewal_latency: the stack failed: {e}", file=sys.stderr)
        return 1
    print(f"load average (1 min) over each stack: {'; '.join(loads)} ({os.cpu_count()} CPUs)")
    print()
    return report(scenarios, args.renewals)


if __name__ == "__main__":
    sys.exit(main())
