"""Does a slow staging check hold up other callers? Properties.Get while the broker checks a
staged leaf with many SANs, against Properties.Get on an idle broker, side by side.

    python bench/slow_check.py [--sans 25000] [--domains 1000] [--gets 40] [--rounds 3]

One stack: a private bus (dbus-daemon), python-dbusmock's polkitd (granting the action) and the
real broker with the fake apachectl of the test tier. The store holds a managed MD whose
root-owned md.json lists --domains names and whose staged leaf carries --sans DNS names (every
MD name among them), so that checking that the leaf covers the MD costs real CPU, as the
attacker's certificate of the issue did. In rounds, it measures sequential Get(Version) round
trips
    idle      nothing else going on (the baseline)
    checking  while another connection asks RequestGracefulRestart for that MD back to back
and prints median, p95 and max of both and the ratio checking / idle, plus how long one check
takes. Where the check runs on the event loop, a Get waits for it (ratio in the thousands);
where it runs in a worker thread, only the GIL is shared (ratio near 1, a few ms at most).
Run it as root like the test suite.
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
from broker.dbuslib import MessageType  # noqa: E402
from harness import busutil, storefactory  # noqa: E402

MD = "big.example.test"
PROPS = "org.freedesktop.DBus.Properties"


def _b36(i: int) -> str:
    digits, out = "0123456789abcdefghijklmnopqrstuvwxyz", ""
    while True:
        out, i = digits[i % 36] + out, i // 36
        if not i:
            return out


async def _get(bus) -> float:
    start = time.perf_counter()
    reply = await busutil.call(bus, "Get", "ss", [names.INTERFACE, "Version"], interface=PROPS, timeout=120)
    if reply.message_type != MessageType.METHOD_RETURN:
        raise RuntimeError(f"Get: {busutil.error_of(reply)}")
    return time.perf_counter() - start


async def _gets(bus, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(await _get(bus))
        await asyncio.sleep(0.01)
    return out


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="arb-bench-slow-"))
    procs: list[subprocess.Popen] = []
    try:
        daemon, address = busutil.start_test_bus(workdir)
        procs.append(daemon)
        client = await dbuslib.connect(address)
        caller = await dbuslib.connect(address)
        env = busutil.broker_env({"DBUS_SYSTEM_BUS_ADDRESS": address})
        polkit = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "--template", "polkitd"],
                                  env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        procs.append(polkit)
        await busutil.wait_for_name(client, names.POLKIT_BUS_NAME, proc=polkit)
        await busutil.call(client, "SetAllowed", "as", [[names.POLKIT_ACTION]], destination=names.POLKIT_BUS_NAME,
                           path=names.POLKIT_PATH, interface="org.freedesktop.DBus.Mock")

        store = storefactory.make_store(workdir)
        domains = [MD] + [f"{_b36(i)}.t" for i in range(args.domains - 1)]
        sans = domains + [f"{_b36(i)}.u" for i in range(max(0, args.sans - len(domains)))]
        storefactory.add_active(store, MD, domains)
        storefactory.add_staged(store, MD, domains, cert_names=sans)
        control = workdir / "control"
        control.mkdir()
        pid_file = workdir / "apache.pid"
        pid_file.write_text(f"{os.getpid()}\n")
        config = busutil.write_config(workdir / "broker.toml", busutil.fake_apache_config(
            store, control, pid_file, workdir / "state",
            {"settle_seconds": 3600, "rate_burst": 100000, "rate_per_second": 10000}))
        log_file = workdir / "broker.log"
        with log_file.open("wb") as log:
            broker = subprocess.Popen(busutil.broker_command(config, address), env=busutil.broker_env(),
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        procs.append(broker)
        await busutil.wait_for_name(client, names.BUS_NAME, proc=broker)

        idle: list[float] = []
        busy: list[float] = []
        checks: list[float] = []
        for _ in range(args.rounds):
            idle += await _gets(client, args.gets)
            stop = asyncio.Event()

            async def keep_checking(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    start = time.perf_counter()
                    reply = await busutil.call(caller, "RequestGracefulRestart", "s", [MD], timeout=300)
                    if reply.message_type != MessageType.METHOD_RETURN:
                        raise RuntimeError(f"request: {busutil.error_of(reply)}\n{log_file.read_text()}")
                    checks.append(time.perf_counter() - start)

            checking = asyncio.ensure_future(keep_checking(stop))
            await asyncio.sleep(0.2)  # the first check is under way
            busy += await _gets(client, args.gets)
            stop.set()
            await checking
        client.disconnect()
        caller.disconnect()
    finally:
        for p in reversed(procs):
            busutil.stop(p)
        shutil.rmtree(workdir, ignore_errors=True)

    def ms(v: float) -> str:
        return f"{v * 1000:9.2f}"

    print(f"staged leaf with {args.sans} SANs, md.json with {args.domains} names; "
          f"{len(checks)} checks, median {statistics.median(checks):.2f} s each")
    print(f"{'Properties.Get (ms)':<22}{'median':>9}{'p95':>9}{'max':>9}")
    for label, values in (("idle", idle), ("while checking", busy)):
        print(f"{label:<22}{ms(statistics.median(values))}{ms(_p95(values))}{ms(max(values))}")
    print(f"{'ratio checking/idle':<22}{statistics.median(busy) / statistics.median(idle):9.1f}"
          f"{_p95(busy) / _p95(idle):9.1f}{max(busy) / max(idle):9.1f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sans", type=int, default=25000)
    p.add_argument("--domains", type=int, default=1000)
    p.add_argument("--gets", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
