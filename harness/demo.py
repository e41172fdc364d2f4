"""``python -m harness.demo``: the whole loop, told as it happens (``make demo`` runs it as root).

Starts, on loopback only and inside one temporary directory: pebble (a real ACME server), a
private system bus with the project's policy, the real polkitd with the project's rules, the
broker, and Apache with mod_md whose MDMessageCmd is the real hook. Then it prints a timeline:
the fallback certificate, mod_md's order, the certificate staged, the hook's ``renewed``, the
restart the broker schedules, the graceful restart, the new certificate seen on the wire; then
one renewal (pebble issues short-lived certificates), and stops everything.

Exit status: 0 when both certificates were activated and everything stopped, 1 when something
did not happen in time, 2 when the machine lacks what the demo needs (it says what), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pwd
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .apache import MODULE_DIR
from .broker import HOOK_PROGRAM, BusEvent, HookLine, hook_lines, hook_program
from .certs import CertInfo
from .procs import HarnessError
from .stack import Stack, StackOptions, running_stack

MD = "www.example.test"
HOLD = 0.5  # seconds an event waits, so that events seen late still print in order
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# (what, how to find it, the Debian package that brings it)
REQUIREMENTS = (
    ("apache2", "program", "apache2"),
    (str(MODULE_DIR / "mod_md.so"), "file", "apache2"),
    ("pebble", "program", "pebble"),
    ("dbus-daemon", "program", "dbus-daemon"),
    ("dbus-send", "program", "dbus-bin"),
    ("/usr/lib/polkit-1/polkitd", "file", "polkitd"),
    ("unshare", "program", "util-linux"),
    ("setpriv", "program", "util-linux"),
)


def missing_requirements() -> list[str]:
    """What this machine lacks for the demo, each with how to get it; empty when all is there."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root: the demo starts Apache, polkitd and a bus of its own (run it as root)")
    packages: dict[str, list[str]] = {}
    for what, kind, package in REQUIREMENTS:
        found = shutil.which(what, path=SEARCH_PATH) if kind == "program" else (Path(what).exists() or None)
        if not found:
            packages.setdefault(package, []).append(what)
    for package, things in packages.items():
        problems.append(f"{', '.join(things)}: install the Debian package {package}")
    try:
        pwd.getpwnam("www-data")
    except KeyError:
        problems.append("user www-data: install the Debian package apache2")
    if not hook_program().exists():
        problems.append(
            f"{HOOK_PROGRAM} beside {sys.executable}: install the project into this Python's venv "
            "(./scripts/setup-env does both)"
        )
    return problems


def _clock(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%H:%M:%S.%f")[:-3] + " UTC"


def _serial(value: int | str) -> str:
    return format(value, "x") if isinstance(value, int) else value


@dataclass
class Timeline:
    """Prints events with the time since the start; the sources are polled by ``Demo.poll``."""

    start: float
    lines: list[str] = field(default_factory=list)

    def say(self, when: float, text: str) -> None:
        line = f"  +{when - self.start:7.3f} s  {text}"
        self.lines.append(line)
        print(line, flush=True)

    @staticmethod
    def heading(text: str) -> None:
        print(f"\n{text}", flush=True)


class Demo:
    def __init__(self, stack: Stack, timeline: Timeline) -> None:
        self.stack = stack
        self.t = timeline
        assert stack.apache is not None and stack.broker is not None and stack.broker.watcher is not None
        self.apache = stack.apache
        self.broker = stack.broker
        self.watcher = stack.broker.watcher
        self.seen_events = 0
        self.seen_hook_lines = 0
        self.seen_gracefuls = 0
        self.staged_serial: int | None = None
        self.served: CertInfo | None = None
        self.last_renewed_at: float | None = None
        self.renewed_to_served: list[float] = []
        self.finished: list[BusEvent] = []
        self.held: list[tuple[float, str]] = []

    # -- the sources ---------------------------------------------------------------------------

    def poll(self, flush: bool = False) -> None:
        """Look at every source once and print what is new, in the order it happened.

        The sources are seen at slightly different moments (a log line is written after the
        handshake that already shows its effect), so events wait ``HOLD`` seconds before they
        are printed, sorted by the time they happened.
        """
        self.held += self._hook_lines()
        self.held += self._bus_events()
        self.held += self._gracefuls()
        self.held += self._staged()
        self.held += self._served()
        self.held.sort(key=lambda item: item[0])
        limit = float("inf") if flush else time.time() - HOLD
        while self.held and self.held[0][0] <= limit:
            when, text = self.held.pop(0)
            self.t.say(when, text)

    def _hook_lines(self) -> list[tuple[float, str]]:
        lines = hook_lines(self.apache.error_log)
        new, self.seen_hook_lines = lines[self.seen_hook_lines :], len(lines)
        out = []
        for line in new:
            text = self._describe_hook(line)
            if text:
                out.append((line.time, text))
        return out

    def _describe_hook(self, line: HookLine) -> str | None:
        if line.reason == "renewing":
            return f"mod_md starts to order a certificate for {line.md} (hook called: renewing)"
        if line.reason == "renewed":
            answer = line.text.split(": ", 1)[1] if ": " in line.text else line.text
            if "restart planned" in answer:
                self.last_renewed_at = line.time
            return f"hook called by mod_md as www-data: renewed {line.md} -> the broker answered: {answer}"
        if line.reason == "installed":
            return f"hook called by Apache's parent during the restart: installed {line.md}"
        return None

    def _bus_events(self) -> list[tuple[float, str]]:
        events = self.watcher.events[self.seen_events :]
        self.seen_events += len(events)
        out = []
        for event in events:
            if event.member == "PropertiesChanged":
                planned = event.values.get("PlannedAt")
                if event.values.get("Pending") is True and planned:
                    seconds = planned / 1e6 - event.time
                    out.append(
                        (
                            event.time,
                            f"broker: graceful restart scheduled for {_clock(planned / 1e6)} (in {seconds:.1f} s at "
                            "most; sooner once mod_md has recorded that the hook delivered)",
                        )
                    )
            elif event.member == "RestartFinished":
                self.finished.append(event)
                v = event.values
                verdict = "verified" if v["ok"] else "FAILED"
                out.append((event.time, f"broker: restart {verdict} for {', '.join(v['names'])}: {v['detail']}"))
        return out

    def _gracefuls(self) -> list[tuple[float, str]]:
        times = self.broker.gracefuls()
        new, self.seen_gracefuls = times[self.seen_gracefuls :], len(times)
        return [(t, "broker: config test passed, graceful restart issued (apache2 -k graceful)") for t in new]

    def _staged(self) -> list[tuple[float, str]]:
        cert = self.apache.staged_certificate(MD)
        if cert is None or cert.serial == self.staged_serial:
            return []
        self.staged_serial = cert.serial
        lifetime = (cert.not_after - cert.not_before).total_seconds()
        return [
            (
                time.time(),
                f"pebble issued serial {_serial(cert.serial)} (valid {lifetime:.0f} s); mod_md staged it "
                "(not served yet: Apache must restart)",
            )
        ]

    def _served(self) -> list[tuple[float, str]]:
        try:
            cert = self.apache.served_certificate(MD, timeout=2)
        except OSError:
            return []
        now = time.time()
        if self.served is not None and cert.serial == self.served.serial:
            return []
        self.served = cert
        if "Fallback" in cert.subject:
            return [(now, f"HTTPS serves mod_md's self-signed fallback certificate ({cert.subject}), answering 503")]
        timing = ""
        if self.last_renewed_at is not None:
            took = now - self.last_renewed_at
            self.renewed_to_served.append(took)
            timing = f"; renewed -> served {took:.3f} s"
        return [(now, f"HTTPS serves the new certificate: serial {_serial(cert.serial)}, issuer {cert.issuer}{timing}")]

    # -- waiting -------------------------------------------------------------------------------

    def until(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done():
                time.sleep(HOLD)
                self.poll(flush=True)
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"{what} did not happen within {timeout:g} s")
            time.sleep(0.05)

    def served_from_pebble(self, not_serial: int | None = None) -> bool:
        cert = self.served
        return (
            cert is not None
            and "Fallback" not in cert.subject
            and cert.serial != not_serial
            and any(e.values["ok"] for e in self.finished)
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(validity: int, renew_window: int) -> int:
    start = time.time()
    t = Timeline(start)
    print(
        "apache-restart-broker demo: mod_md renews a certificate, its hook asks the broker, the broker\n"
        "restarts Apache gracefully and checks the new certificate on the wire. Everything runs on\n"
        "loopback in a temporary directory and is stopped at the end.",
        flush=True,
    )
    options = StackOptions(
        domains=[[MD]],
        validity_seconds=validity,
        renew_window=f"{renew_window}s",
        with_broker=True,
        start_apache=False,
    )
    stopped_ok = False
    with running_stack(options) as stack:
        assert stack.apache is not None and stack.pebble is not None and stack.broker is not None
        t.heading(f"Started in {stack.root}:")
        t.say(time.time(), f"pebble (ACME server) at {stack.pebble.directory_url}, issuing {validity} s certificates")
        t.say(time.time(), "a private system bus with the project's policy, the real polkitd with the project's rule")
        t.say(
            time.time(),
            f"the broker (restart via command, settle {stack.broker.options.settle_seconds:g} s, "
            f"probe {stack.https_address})",
        )
        stack.apache.start()
        t.say(
            time.time(),
            f"Apache with mod_md: MDomain {MD}, HTTPS on {stack.https_address}, "
            f"MDMessageCmd {HOOK_PROGRAM} --bus-address ...",
        )
        demo = Demo(stack, t)
        try:
            ok = _story(stack, demo, t, validity, renew_window)
        except HarnessError:
            print("\nThe logs, before everything is stopped:\n" + stack.dump_logs(15), file=sys.stderr)
            raise
        print("\nStopping everything ...", flush=True)
    leftovers = stack.leftovers
    if leftovers:
        print(f"  the teardown left processes behind, killed: {leftovers}")
    else:
        stopped_ok = True
        print(f"  all processes stopped, {stack.root} removed ({time.time() - start:.1f} s in all)")
    return 0 if ok and stopped_ok else 1


def _story(stack: Stack, demo: Demo, t: Timeline, validity: int, renew_window: int) -> bool:
    """The first certificate, then one renewal; True when every restart was verified."""
    assert stack.broker is not None
    t.heading("First certificate (no step by anyone):")
    demo.until(demo.served_from_pebble, 90, "the first certificate being served")
    demo.until(lambda: len(demo.finished) >= 1, 20, "the broker's verification")
    first = demo.served
    assert first is not None

    lead = validity - renew_window
    t.heading(
        f"Renewal: the certificate lives {validity} s and mod_md renews {renew_window} s before its end, "
        f"so in about {lead} s:"
    )
    finished_before = len(demo.finished)
    demo.until(
        lambda: demo.served is not None
        and demo.served.serial != first.serial
        and len(demo.finished) > finished_before,
        lead + 60,
        "the renewed certificate being served",
    )
    gracefuls = len(stack.broker.gracefuls())
    ok = all(e.values["ok"] for e in demo.finished)
    t.heading("Summary:")
    timings = ", ".join(f"{x:.3f} s" for x in demo.renewed_to_served)
    print(f"  renewed -> served: {timings}", flush=True)
    print(f"  graceful restarts: {gracefuls} (one per certificate), all verified: {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--validity", type=int, default=30, help="certificate lifetime pebble gives (s)")
    parser.add_argument("--renew-window", type=int, default=22, help="MDRenewWindow (s), less than --validity")
    args = parser.parse_args(argv)
    if not 0 < args.renew_window < args.validity:
        parser.error("--renew-window must be positive and less than --validity")

    missing = missing_requirements()
    if missing:
        print("demo: cannot run on this machine; missing:", file=sys.stderr)
        for item in missing:
            print(f"  - {item}", file=sys.stderr)
        print("On Debian 12, ./scripts/setup-env (as root) installs all of it.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    try:
        return run(args.validity, args.renew_window)
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started has been stopped", file=sys.stderr)
        return 130
    except HarnessError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        print("everything the demo started has been stopped", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
