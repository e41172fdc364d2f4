"""How long mod_md waits for apache-restart-hook: process wall time, median of N runs.

    python bench/hook_latency.py [--runs 30] [--user www-data]

Starts a private bus (dbus-daemon), python-dbusmock's polkitd (granting the action) and the
real broker with a staged set whose restart never comes due (settle time of an hour, no rate
limit), then times, interleaved run by run:

    apache-restart-hook renewed MD       vs  busctl call ... RequestGracefulRestart s MD
    apache-restart-hook renewing MD      vs  python3 -c pass   (the same interpreter)

and prints medians and ratios. Needs root (like the test suite) and the project installed in
the interpreter's venv (for the `apache-restart-hook` script; else `-m client.hook` is used).
With --user the hook, busctl and python run as that user through runuser, as mod_md runs the
hook (runuser's own cost is then in every row).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker import dbuslib, names  # noqa: E402
from harness import busutil, storefactory  # noqa: E402

MD = "www.example.test"


class Stack:
    """dbus-daemon + polkitd mock + broker, in a temporary 0755 folder."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="arb-bench-"))
        self.dir.chmod(0o755)
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    async def start(self) -> None:
        daemon, self.address = busutil.start_test_bus(self.dir)
        self.procs.append(daemon)
        probe = await dbuslib.connect(self.address)
        try:
            env = busutil.broker_env({"DBUS_SYSTEM_BUS_ADDRESS": self.address})
            polkit = subprocess.Popen(
                [sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(polkit)
            await busutil.wait_for_name(probe, names.POLKIT_BUS_NAME, proc=polkit)
            await busutil.call(probe, "SetAllowed", "as", [[names.POLKIT_ACTION]],
                               destination=names.POLKIT_BUS_NAME, path=names.POLKIT_PATH,
                               interface="org.freedesktop.DBus.Mock")

            store = storefactory.make_store(self.dir)
            storefactory.add_staged(store, MD, [MD])
            pid_file = self.dir / "apache.pid"
            pid_file.write_text(f"{os.getpid()}\n")
            config = busutil.write_config(self.dir / "broker.toml", {
                "md_store": str(store),
                "restart_via": "command",
                "configtest_command": ["/bin/true"],
                "graceful_command": ["/bin/true"],
                "pid_file": str(pid_file),
                "settle_seconds": 3600,        # the restart never comes due while we measure
                "min_interval_seconds": 0,
                "verify_timeout_seconds": 1,
                "probe": [],
                "state_dir": str(self.dir / "state"),
                "trust_anchors": [str(storefactory.ca_file(self.dir))],
                "rate_burst": 1e9,             # no rate limit: every run makes the same call
            })
            self.log = (self.dir / "broker.log").open("wb")
            broker = subprocess.Popen(
                busutil.broker_command(config, self.address), env=busutil.broker_env(),
                                      stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
            self.procs.append(broker)
            await busutil.wait_for_name(probe, names.BUS_NAME, proc=broker)
        finally:
            probe.disconnect()

    def stop(self) -> None:
        for p in reversed(self.procs):
            busutil.stop(p)
        shutil.rmtree(self.dir, ignore_errors=True)


def hook_argv() -> list[str]:
    script = Path(sys.executable).parent / "apache-restart-hook"
    return [str(script)] if script.exists() else [sys.executable, "-m", "client.hook"]


def timed(argv: list[str], cwd: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, check=False, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="measured runs of each command (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured runs first (default 3)")
    p.add_argument("--user", help="run every command as this user (runuser), e.g. www-data")
    args = p.parse_args()
    if shutil.which("busctl") is None:
        raise SystemExit("busctl is needed (Debian package systemd)")

    stack = Stack()
    try:
        asyncio.run(stack.start())
        a = stack.address
        hook = hook_argv()
        cwd = "/" if hook[0].endswith("apache-restart-hook") else str(REPO)
        commands = {
            "hook renewed": hook + ["--bus-address", a, "renewed", MD],
            "busctl call": ["busctl", f"--address={a}", "call", names.BUS_NAME, names.OBJECT_PATH,
                            names.INTERFACE, "RequestGracefulRestart", "s", MD],
            "hook renewing": hook + ["--bus-address", a, "renewing", MD],
            "python3 -c pass": [sys.executable, "-c", "pass"],
        }
        if args.user:
            commands = {k: ["runuser", "-u", args.user, "--", *v] for k, v in commands.items()}
        times: dict[str, list[float]] = {k: [] for k in commands}
        for i in range(args.warmup + args.runs):
            for name, argv in commands.items():  # interleaved, so drifts hit every row alike
                t = timed(argv, cwd)
                if i >= args.warmup:
                    times[name].append(t)
    finally:
        stack.stop()

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    p90 = {k: sorted(v)[int(0.9 * (len(v) - 1))] * 1000 for k, v in times.items()}
    print(f"apache-restart-hook latency: median of {args.runs} runs, wall time per process"
          f"{' as ' + args.user if args.user else ''}; D-Bus library {dbuslib.LIB_NAME}, "
          f"Python {sys.version.split()[0]}")
    print()
    rows = [
        ("hook renewed  (RequestGracefulRestart)", "hook renewed", "busctl call"),
        ("busctl call   (RequestGracefulRestart)", "busctl call", None),
        ("hook renewing (no bus, no D-Bus import)", "hook renewing", "python3 -c pass"),
        ("python3 -c pass (same interpreter)", "python3 -c pass", None),
    ]
    print(f"{'command':<42} {'median ms':>10} {'p90 ms':>8}  ratio")
    for label, key, base in rows:
        ratio = f"{med[key] / med[base]:.1f}x {base}" if base else ""
        print(f"{label:<42} {med[key]:>10.1f} {p90[key]:>8.1f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
