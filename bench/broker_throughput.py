"""The broker under dbus-next and under dbus-fast, side by side: latency, throughput, memory.

    python bench/broker_throughput.py [--calls 300] [--rounds 5] [--callers 50] [--load-calls 1000]
                                      [--flood 2000] [--flood-only] [--baseline-tree DIR]

Starts two identical stacks, one per D-Bus library of the broker (APACHE_RESTART_DBUS_LIB):
each is a private bus (dbus-daemon), python-dbusmock's polkitd (granting the action) and
the real broker with the fake apachectl of the test tier and a staged set whose restart
never comes due (settle time of an hour, no rate limit). Then, in rounds that alternate
which library goes first (so that drifts of a shared machine hit both alike), it measures
from client connections of this process:

    RequestGracefulRestart   sequential round trips (the broker asks the bus daemon for the
                             caller's uid and polkit for the action, checks what is staged,
                             saves its state): median and p95
    Properties.Get           sequential round trips of Get(Version), answered by the D-Bus
                             library alone (no polkit, no store): the library's own overhead
    load                     --callers connections calling RequestGracefulRestart at once
                             (--load-calls per round): calls/s, median over rounds; the same
                             for Properties.Get shows where the library itself tops out
    VmRSS                    of the broker process: idle after start, after the load, and
                             its peak (VmHWM)
    flood                    --flood RequestGracefulRestart calls sent at once over four
                             connections (what a local user can do; the test tier does it
                             too), each timed from its own send to its answer, which is
                             mostly RateLimited (max_in_flight): p50, p99 and max per round,
                             median over rounds, and how the answers split; and the CPU
                             time the broker spent on it, which load from other processes
                             on the machine inflates far less than the latencies

and prints one table with both libraries and the ratio dbus_next / dbus_fast per figure,
plus "request / Properties.Get" per library: what authorization and the staging checks cost
relative to a bare call. The polkit mock (python-dbusmock, single-threaded) and the client
are the same for both libraries, so their share narrows the ratios of the request rows.
The client uses the library broker.dbuslib picks in this process (APACHE_RESTART_DBUS_LIB
in the environment sets it). Needs dbus-daemon, python-dbusmock and both libraries; run it
as root like the test suite (the broker reads the store as root would).

--baseline-tree DIR also runs the broker from another checkout (say, `git worktree add DIR
main`), two more stacks, and prints the flood figures of both side by side with their ratio
(this tree / baseline): before and after a change, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker import dbuslib, names  # noqa: E402
from broker.dbuslib import MessageType  # noqa: E402
from harness import busutil, storefactory  # noqa: E402

MD = "www.example.test"
LIBS = ("dbus_next", "dbus_fast")
PROPS = "org.freedesktop.DBus.Properties"


FLOOD_CONNECTIONS = 4


class Stack:
    """dbus-daemon + polkitd mock + the broker under one D-Bus library, in a temporary folder."""

    def __init__(self, lib: str, callers: int, tree: Path = REPO) -> None:
        self.lib = lib
        self.tree = tree  # the checkout the broker runs from
        self.n_callers = callers
        self.dir = Path(tempfile.mkdtemp(prefix=f"arb-bench-{lib}-"))
        self.procs: list[subprocess.Popen] = []
        self.broker: subprocess.Popen | None = None
        self.address = ""
        self.client = None          # the connection for sequential calls
        self.callers: list = []     # one connection per concurrent caller
        self.flooders: list = []    # the connections a flood is sent over
        self.log_file = self.dir / "broker.log"
        self.control = self.dir / "control"

    async def start(self) -> None:
        daemon, self.address = busutil.start_test_bus(self.dir)
        self.procs.append(daemon)
        self.client = await dbuslib.connect(self.address)

        env = busutil.broker_env({"DBUS_SYSTEM_BUS_ADDRESS": self.address})
        polkit = subprocess.Popen(
            [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(polkit)
        await busutil.wait_for_name(self.client, names.POLKIT_BUS_NAME, proc=polkit)
        reply = await busutil.call(self.client, "SetAllowed", "as", [[names.POLKIT_ACTION]],
                                   destination=names.POLKIT_BUS_NAME, path=names.POLKIT_PATH,
                                   interface="org.freedesktop.DBus.Mock")
        if busutil.error_of(reply):
            raise RuntimeError(f"polkitd mock: SetAllowed failed: {busutil.error_of(reply)}")

        store = storefactory.make_store(self.dir)
        storefactory.add_active(store, MD, [MD])
        storefactory.add_staged(store, MD, [MD])
        self.control.mkdir()
        pid_file = self.dir / "apache.pid"
        pid_file.write_text(f"{os.getpid()}\n")  # "Apache" runs as long as the bench does
        config = busutil.write_config(self.dir / "broker.toml", busutil.fake_apache_config(
            store, self.control, pid_file, self.dir / "state", {
                "settle_seconds": 3600,    # the restart never comes due while we measure
                "verify_timeout_seconds": 1,
                # The largest the config allows: the rate limit never answers in the bench.
                "rate_burst": 100000,
                "rate_per_second": 10000,
            }))
        with self.log_file.open("wb") as log:
            self.broker = subprocess.Popen(
                busutil.broker_command(config, self.address),
                env=busutil.broker_env({"APACHE_RESTART_DBUS_LIB": self.lib,
                                        "PYTHONPATH": str(self.tree)}),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.tree)  # `python -m` looks in the current folder before PYTHONPATH
        self.procs.append(self.broker)
        try:
            await busutil.wait_for_name(self.client, names.BUS_NAME, proc=self.broker)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}:\n{self.log()}") from None
        # The broker logs its start line just after it owns the name: give it a moment.
        deadline = time.monotonic() + 2
        while f"({self.lib})" not in self.log_file.read_text(errors="replace") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if f"({self.lib})" not in self.log_file.read_text(errors="replace"):
            raise RuntimeError(f"the broker does not say it serves with {self.lib}:\n{self.log()}")
        self.callers = list(await asyncio.gather(
            *(dbuslib.connect(self.address) for _ in range(self.n_callers))))
        self.flooders = list(await asyncio.gather(
            *(dbuslib.connect(self.address) for _ in range(FLOOD_CONNECTIONS))))
        for bus in self.flooders:
            # The flooding side needs the broker's EAGAIN fix too, or it drops its own connection.
            dbuslib.harden_writer(bus)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def restarts_run(self) -> list[str]:
        """What the fake apachectl recorded: must stay empty (no restart during the bench)."""
        try:
            return (self.control / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def cpu_seconds(self) -> float:
        """CPU time the broker process has used (user + system)."""
        with open(f"/proc/{self.broker.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_kib(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.broker.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0])
        return out

    def disconnect(self) -> None:
        for bus in [self.client, *self.callers, *self.flooders]:
            if bus is not None:
                try:
                    bus.disconnect()
                except Exception:
                    pass
        self.client, self.callers, self.flooders = None, [], []

    def stop(self) -> None:
        self.disconnect()
        for p in reversed(self.procs):
            busutil.stop(p)
        shutil.rmtree(self.dir, ignore_errors=True)


def request_msg() -> tuple[str, str, list, dict]:
    return "RequestGracefulRestart", "s", [MD], {}


def get_msg() -> tuple[str, str, list, dict]:
    return "Get", "ss", [names.INTERFACE, "Version"], {"interface": PROPS}


CALLS = {"request": request_msg(), "get": get_msg()}


async def one(bus, kind: str) -> None:
    member, signature, body, kw = CALLS[kind]
    reply = await busutil.call(bus, member, signature, body, **kw)
    if reply.message_type != MessageType.METHOD_RETURN:
        raise RuntimeError(f"{member}: {busutil.error_of(reply)}")


async def sequential(stack: Stack, kind: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await one(stack.client, kind)
        times.append(time.perf_counter() - start)
    return times


async def load(stack: Stack, kind: str, total: int) -> float:
    """`total` calls spread over every caller connection, each calling back to back; calls/s."""
    left = total

    async def caller(bus) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(bus, kind)

    start = time.perf_counter()
    await asyncio.gather(*(caller(bus) for bus in stack.callers))
    return total / (time.perf_counter() - start)


async def flood(stack: Stack, total: int) -> tuple[list[float], dict[str, int], float]:
    """`total` calls sent at once, round robin over the flood connections: each one's time
    from its send to its answer, how many got which answer, and the broker's CPU seconds."""
    member, signature, body, kw = request_msg()
    answers: dict[str, int] = {}

    async def timed(bus) -> float:
        start = time.perf_counter()
        reply = await busutil.call(bus, member, signature, body, timeout=60, **kw)
        took = time.perf_counter() - start
        error = busutil.error_of(reply)
        key = "ok" if error is None else error[0].rsplit(".", 1)[-1]
        answers[key] = answers.get(key, 0) + 1
        return took

    conns = stack.flooders
    cpu = stack.cpu_seconds()
    times = await asyncio.gather(*(timed(conns[i % len(conns)]) for i in range(total)))
    return list(times), answers, stack.cpu_seconds() - cpu


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def p95(values: list[float]) -> float:
    return percentile(values, 0.95)


def _quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A Ctrl-C in a terminal stops the bus daemons too: their clients' EOF is no news."""
    if isinstance(context.get("exception"), (EOFError, ConnectionError)):
        return
    loop.default_exception_handler(context)


BASELINE = "@baseline"


async def run(args: argparse.Namespace, stacks: dict[str, Stack]) -> dict[str, dict[str, float]]:
    asyncio.get_running_loop().set_exception_handler(_quiet_lost_connections)
    await asyncio.gather(*(s.start() for s in stacks.values()))
    await asyncio.sleep(0.5)  # idle: whatever the start left behind has settled
    rss_idle = {lib: s.memory_kib()["VmRSS"] for lib, s in stacks.items()}
    own = [key for key in stacks if not key.endswith(BASELINE)]

    for s in stacks.values():  # warm up: first-call paths, caches, connections
        for kind in CALLS:
            await sequential(s, kind, 20)
            await load(s, kind, 2 * args.callers)

    per_round = max(1, math.ceil(args.calls / args.rounds))
    lat: dict[str, dict[str, list[float]]] = {lib: {k: [] for k in CALLS} for lib in stacks}
    rate: dict[str, dict[str, list[float]]] = {lib: {k: [] for k in CALLS} for lib in stacks}
    floods: dict[str, list[tuple[list[float], dict[str, int], float]]] = {lib: [] for lib in stacks}
    for r in range(args.rounds):
        if not args.flood_only:
            order = own if r % 2 == 0 else list(reversed(own))
            for kind in CALLS:
                for lib in order:
                    lat[lib][kind] += await sequential(stacks[lib], kind, per_round)
                for lib in reversed(order):
                    rate[lib][kind].append(await load(stacks[lib], kind, args.load_calls))
        if args.flood:
            order = list(stacks) if r % 2 == 0 else list(reversed(stacks))
            for lib in order:
                floods[lib].append(await flood(stacks[lib], args.flood))
                await asyncio.sleep(0.2)  # the broker's polkit calls of this flood are over

    results = {}
    for lib, s in stacks.items():
        mem = s.memory_kib()
        res: dict[str, float] = {
            "rss_idle": rss_idle[lib] / 1024,
            "rss_load": mem["VmRSS"] / 1024,
            "rss_peak": mem["VmHWM"] / 1024,
        }
        if not args.flood_only and lib in own:
            res.update({
                "req_med": statistics.median(lat[lib]["request"]) * 1000,
                "req_p95": p95(lat[lib]["request"]) * 1000,
                "get_med": statistics.median(lat[lib]["get"]) * 1000,
                "get_p95": p95(lat[lib]["get"]) * 1000,
                "req_rate": statistics.median(rate[lib]["request"]),
                "get_rate": statistics.median(rate[lib]["get"]),
                "n_seq": len(lat[lib]["request"]),
            })
        if floods[lib]:
            rounds = floods[lib]
            res.update({
                "flood_p50": statistics.median(percentile(t, 0.50) for t, _, _ in rounds) * 1000,
                "flood_p99": statistics.median(percentile(t, 0.99) for t, _, _ in rounds) * 1000,
                "flood_max": statistics.median(max(t) for t, _, _ in rounds) * 1000,
                "flood_p99_worst": max(percentile(t, 0.99) for t, _, _ in rounds) * 1000,
                "flood_cpu": statistics.median(cpu for _, _, cpu in rounds) * 1000,
            })
            answers: dict[str, int] = {}
            for _, counts, _ in rounds:
                for key, n in counts.items():
                    answers[key] = answers.get(key, 0) + n
            res["flood_answers"] = answers  # type: ignore[assignment]
            res["flood_p99_rounds"] = [percentile(t, 0.99) * 1000 for t, _, _ in rounds]  # type: ignore[assignment]
        results[lib] = res
        if s.restarts_run():
            raise RuntimeError(f"{lib}: a restart ran during the bench: {s.restarts_run()}")
        if s.broker.poll() is not None:
            raise RuntimeError(f"{lib}: the broker exited ({s.broker.returncode}):\n{s.log()}")
    for s in stacks.values():
        s.disconnect()
    return results


def report(args: argparse.Namespace, res: dict[str, dict[str, float]]) -> None:
    a, b = LIBS
    print(f"apache-restart-broker under each D-Bus library: {args.rounds} interleaved rounds; "
          f"client {dbuslib.LIB_NAME}, Python {sys.version.split()[0]}")
    print()
    width = 46
    if not args.flood_only:
        n = res[a]["n_seq"]
        print(f"{n} sequential calls per figure, {args.callers} callers x {args.load_calls} calls per "
              "round under load")
        rows = [
            ("RequestGracefulRestart median ms", "req_med", ".2f"),
            ("RequestGracefulRestart p95 ms", "req_p95", ".2f"),
            (f"RequestGracefulRestart calls/s, {args.callers} callers", "req_rate", ".0f"),
            ("Properties.Get median ms", "get_med", ".2f"),
            ("Properties.Get p95 ms", "get_p95", ".2f"),
            (f"Properties.Get calls/s, {args.callers} callers", "get_rate", ".0f"),
            ("broker VmRSS MiB, idle after start", "rss_idle", ".1f"),
            ("broker VmRSS MiB, after the load", "rss_load", ".1f"),
            ("broker VmHWM MiB (peak)", "rss_peak", ".1f"),
        ]
        print(f"{'figure':<{width}} {a:>10} {b:>10}  {a}/{b}")
        for label, key, fmt in rows:
            print(f"{label:<{width}} {res[a][key]:>10{fmt}} {res[b][key]:>10{fmt}}  "
                  f"{res[a][key] / res[b][key]:.2f}")
        ratio = {lib: res[lib]["req_med"] / res[lib]["get_med"] for lib in LIBS}
        print(f"{'request / Properties.Get (median latency)':<{width}} {ratio[a]:>9.1f}x {ratio[b]:>9.1f}x")
        ratio = {lib: res[lib]["get_rate"] / res[lib]["req_rate"] for lib in LIBS}
        print(f"{'request / Properties.Get (time per call, load)':<{width}} {ratio[a]:>9.1f}x {ratio[b]:>9.1f}x")
        print()
    if not args.flood:
        return
    print(f"flood: {args.flood} RequestGracefulRestart calls at once over {FLOOD_CONNECTIONS} "
          "connections, ms from each call's send to its answer (median over rounds)")
    cols = [lib for lib in LIBS] + [lib + BASELINE for lib in LIBS if lib + BASELINE in res]
    print(f"{'figure':<{width}} " + " ".join(f"{c:>18}" for c in cols))
    for label, key in (("p50", "flood_p50"), ("p99", "flood_p99"), ("max", "flood_max"),
                       ("p99, worst round", "flood_p99_worst"),
                       ("broker CPU ms per flood", "flood_cpu")):
        print(f"{label:<{width}} " + " ".join(f"{res[c][key]:>18.1f}" for c in cols))
    for lib in LIBS:
        if lib + BASELINE in res:
            base = res[lib + BASELINE]
            print(f"{lib + ': this tree / baseline, p99':<{width}} {res[lib]['flood_p99'] / base['flood_p99']:>18.2f}")
            print(f"{lib + ': this tree / baseline, CPU':<{width}} {res[lib]['flood_cpu'] / base['flood_cpu']:>18.2f}")
    for c in cols:
        rounds = " ".join(f"{v:.0f}" for v in res[c]["flood_p99_rounds"])  # type: ignore[attr-defined]
        print(f"  {c}: p99 per round {rounds}; answers {res[c]['flood_answers']}")


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300,
                   help="sequential calls of each kind per library, over all rounds (default 300)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--callers", type=int, default=50, help="concurrent caller connections (default 50)")
    p.add_argument("--load-calls", type=int, default=1000,
                   help="calls of each kind per library and round under load (default 1000)")
    p.add_argument("--flood", type=int, default=2000,
                   help="calls sent at once in each round's flood (default 2000; 0: no flood)")
    p.add_argument("--flood-only", action="store_true", help="measure the flood alone")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help="another checkout whose broker is flooded in the same rounds (before/after)")
    args = p.parse_args()
    if args.calls < 1 or args.rounds < 1 or args.callers < 1 or args.load_calls < 1 or args.flood < 0:
        p.error("--calls, --rounds, --callers and --load-calls must be positive, --flood not negative")
    if args.flood_only and not args.flood:
        p.error("--flood-only needs --flood")
    if args.baseline_tree is not None and not (args.baseline_tree / "broker" / "main.py").is_file():
        p.error(f"--baseline-tree: {args.baseline_tree} holds no broker/main.py")
    if shutil.which("dbus-daemon") is None:
        raise SystemExit("dbus-daemon is needed (Debian package dbus-daemon)")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    stacks = {lib: Stack(lib, args.callers) for lib in LIBS}
    if args.baseline_tree is not None:
        tree = args.baseline_tree.resolve()
        stacks.update({lib + BASELINE: Stack(lib, args.callers, tree) for lib in LIBS})
    try:
        results = asyncio.run(run(args, stacks))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"broker_throughput: {e}", file=sys.stderr)
        return 1
    finally:
        for s in stacks.values():
            s.stop()
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
