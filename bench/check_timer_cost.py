"""What the check timer costs a single host: one `apache-restart check-all` per run.

    python bench/check_timer_cost.py [--runs 20] [--mds 3]

The shipped timer runs every 5 minutes (288 runs a day) so that a cluster node catches up
with a renewal that another node activated. On a host where the broker exits when idle
(`idle_exit_seconds`), each run is one D-Bus activation of the broker plus CheckAll; where it
stays up, only the call. Measured here on a private bus whose activation starts the real
broker (store with --mds active sets, each probed over TLS at a loopback listener, nothing
staged: the common case), interleaved run by run:

    check-all, broker activated by the bus   (cold: the broker starts, answers, exits idle)
    check-all, broker running                (warm)
    python3 -c pass                          (baseline: the same interpreter starting)

Wall time per client process, and CPU time (user + system) of the client and, for the cold
row, of the broker process the bus started (measured by the shell that the activation file
runs it under). Prints medians, ratios against the baseline, and the CPU per day at 288 runs.
Needs root, dbus-daemon and busctl, like the test suite.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker import names  # noqa: E402
from harness import busutil, storefactory  # noqa: E402
from harness.certs import CertificateServer  # noqa: E402

RUNS_PER_DAY = 24 * 60 // 5
IDLE_EXIT = 1.0


def bus_config(directory: Path, service_dir: Path) -> Path:
    template = (REPO / "harness" / "mockbus.conf.in").read_text()
    text = template.replace("@SOCKET@", str(directory / "bus.sock"))
    text = text.replace("</busconfig>", f"  <servicedir>{service_dir}</servicedir>\n</busconfig>")
    path = directory / "bus.conf"
    path.write_text(text)
    return path


def cpu_of_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one client process."""
    cpu0, t0 = cpu_of_children(), time.perf_counter()
    proc = subprocess.run(argv, check=False, cwd=str(REPO), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall, cpu = time.perf_counter() - t0, cpu_of_children() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return wall, cpu


def broker_running(address: str) -> bool:
    out = subprocess.run(["busctl", f"--address={address}", "status", names.BUS_NAME],
                         capture_output=True, text=True, check=False)
    return out.returncode == 0


def wait_until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the broker to exit")
        time.sleep(0.05)


def parse_times(text: str) -> float:
    """The children's line of the shell's `times` (its second): "0m0.52s 0m0.07s" -> 0.59."""
    total = 0.0
    for part in text.split():
        minutes, _, seconds = part.rstrip("s").partition("m")
        total += int(minutes) * 60 + float(seconds)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="measured runs of each row (default 20)")
    p.add_argument("--mds", type=int, default=3, help="active MDs in the store, each probed (default 3)")
    args = p.parse_args()
    if shutil.which("busctl") is None or shutil.which("dbus-daemon") is None:
        raise SystemExit("dbus-daemon and busctl are needed (Debian packages dbus-daemon, systemd)")

    work = Path(tempfile.mkdtemp(prefix="arb-bench-check-"))
    procs: list[subprocess.Popen] = []
    try:
        mds = [f"site{i}.example.test" for i in range(args.mds)]
        listener = CertificateServer(work, storefactory.issue(mds)).start()
        store = storefactory.make_store(work)
        for md in mds:
            storefactory.add_active(store, md, [md])
        pid_file = work / "apache.pid"
        pid_file.write_text(f"{os.getpid()}\n")
        config = busutil.write_config(work / "broker.toml", {
            "md_store": str(store), "restart_via": "command", "configtest_command": ["/bin/true"],
            "graceful_command": ["/bin/true"], "pid_file": str(pid_file), "probe": [listener.address],
            "state_dir": str(work / "state"), "idle_exit_seconds": IDLE_EXIT,
        })
        address = f"unix:path={work / 'bus.sock'}"
        cpu_log = work / "broker-cpu.log"
        services = work / "services"
        services.mkdir()
        broker = " ".join(busutil.broker_command(config, address))
        env = " ".join(f"{k}={v}" for k, v in busutil.broker_env().items() if k in ("PYTHONPATH",
                                                                                    "APACHE_RESTART_DBUS_LIB"))
        # The shell's `times` reports the broker's CPU once it exited (idle): two lines, the
        # shell's own and its children's.
        (services / f"{names.BUS_NAME}.service").write_text(
            "[D-BUS Service]\n"
            f"Name={names.BUS_NAME}\n"
            f"Exec=/bin/sh -c 'env {env} {broker} 2>>{work}/broker.log; times >> {cpu_log}'\n")
        daemon, bus_address = busutil.start_dbus_daemon(bus_config(work, services))
        procs.append(daemon)
        client = [sys.executable, "-m", "client.admin", "--bus-address", bus_address, "check-all"]
        rows: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": [], "python": []}
        broker_cpu: list[float] = []
        for i in range(args.runs + 1):  # the first round warms caches and is not counted
            wait_until(lambda: not broker_running(bus_address), 10 + IDLE_EXIT)
            before = cpu_log.read_text().count("\n") if cpu_log.exists() else 0
            cold = run(client)
            warm = run(client)  # the broker activated just now is still up
            base = run([sys.executable, "-c", "pass"])
            wait_until(lambda n=before: cpu_log.exists() and cpu_log.read_text().count("\n") >= n + 2,
                       10 + IDLE_EXIT)
            if i:
                rows["cold"].append(cold)
                rows["warm"].append(warm)
                rows["python"].append(base)
                broker_cpu.append(parse_times(cpu_log.read_text().splitlines()[-1]))
    finally:
        for proc in reversed(procs):
            busutil.stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str, index: int) -> float:
        return statistics.median(v[index] for v in rows[key]) * 1000

    base_wall = med("python", 0)
    # The broker's CPU covers its start, both calls and its idle exit: all of it is put on the
    # cold row, which is what an activation per run costs.
    cold_cpu = med("cold", 1) + statistics.median(broker_cpu) * 1000
    print(f"check timer cost: median of {args.runs} runs, {args.mds} MDs probed over TLS, "
          f"Python {sys.version.split()[0]}")
    print()
    print(f"{'run':<46} {'wall ms':>8} {'CPU ms':>8}  ratio (wall) vs python3 -c pass")
    print(f"{'check-all, broker activated by the bus (cold)':<46} {med('cold', 0):>8.1f} {cold_cpu:>8.1f}  "
          f"{med('cold', 0) / base_wall:.1f}x")
    print(f"{'check-all, broker running (warm)':<46} {med('warm', 0):>8.1f} {med('warm', 1):>8.1f}  "
          f"{med('warm', 0) / base_wall:.1f}x")
    print(f"{'python3 -c pass (baseline)':<46} {base_wall:>8.1f} {med('python', 1):>8.1f}  1.0x")
    print()
    print(f"CPU per day at one run every 5 minutes ({RUNS_PER_DAY} runs): "
          f"{cold_cpu * RUNS_PER_DAY / 1000:.1f} s with the broker activated each time, "
          f"{med('warm', 1) * RUNS_PER_DAY / 1000:.1f} s (client; plus the broker's share) with it running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
