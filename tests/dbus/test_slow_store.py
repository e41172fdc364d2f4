"""A slow store delays nobody else: while one request's check of staging/ is stuck, the broker
still answers Properties.Get and other callers at once."""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from broker import names
from harness import busutil, storefactory
from harness.busutil import call, error_of

MD = "www.example.test"


# Every method that reads the store, as its caller sends it (root here, as in the suite).
STORE_READERS = {
    "RequestGracefulRestart": ("s", [MD]),
    "DryRunRequest": ("s", [MD]),
    "GetStatus": ("", []),
    "SelfTest": ("s", [MD]),
}


@pytest.mark.parametrize("method", sorted(STORE_READERS))
async def test_a_blocked_store_read_delays_no_other_reply(tmp_path, bus_address, client, allow, store, method):
    storefactory.add_staged(store, MD, [MD])
    control = tmp_path / "control"
    control.mkdir()
    pid_file = tmp_path / "apache.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    cfg = busutil.fake_apache_config(store, control, pid_file, tmp_path / "state", {"settle_seconds": 0.3})
    config_file = busutil.write_config(tmp_path / "broker.toml", cfg)
    log_file = tmp_path / "broker.log"
    argv = [sys.executable, "-m", "tests.dbus.slow_store_broker", str(control),
            *busutil.broker_command(config_file, bus_address)[3:]]
    proc = subprocess.Popen(argv, env=busutil.broker_env(), stdin=subprocess.DEVNULL,
                            stdout=log_file.open("wb"), stderr=subprocess.STDOUT)
    try:
        await busutil.wait_for_name(client, names.BUS_NAME, proc=proc)
        signature, body = STORE_READERS[method]
        slow = asyncio.ensure_future(call(client, method, signature, body, timeout=20))
        await busutil.wait_until(lambda: (control / "check-started").exists(), 10)

        t0 = time.monotonic()
        version = await call(client, "Get", "ss", [names.INTERFACE, "Version"],
                             interface="org.freedesktop.DBus.Properties", timeout=20)
        get_seconds = time.monotonic() - t0
        t0 = time.monotonic()
        invalid = await call(client, "RequestGracefulRestart", "s", ["Not A Name"], timeout=20)
        other_seconds = time.monotonic() - t0
        assert error_of(version) is None and get_seconds < 1.0, (get_seconds, error_of(version))
        assert error_of(invalid)[0] == names.ERROR_INVALID_NAME and other_seconds < 1.0, other_seconds
        assert not slow.done()  # the store read is still stuck

        (control / "check-release").touch()
        reply = await slow
        assert error_of(reply) is None and reply.body[0]  # the slow call still succeeds
    finally:
        busutil.stop(proc)
        sys.stderr.write(f"--- broker log ---\n{log_file.read_text(errors='replace')}\n")
