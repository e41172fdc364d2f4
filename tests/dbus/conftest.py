"""Fixtures for the mock tier: a private bus, python-dbusmock's polkitd, the broker."""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker import dbuslib, names
from harness import busutil

HERE = Path(__file__).resolve().parent


@pytest.fixture
def bus_daemon(tmp_path):
    """A private bus: (dbus-daemon process, address); DBUS_SYSTEM_BUS_ADDRESS points at it."""
    proc, address = busutil.start_test_bus(tmp_path)
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    yield proc, address
    if old is None:
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    else:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
    busutil.stop(proc)


@pytest.fixture
def bus_address(bus_daemon):
    return bus_daemon[1]


@pytest.fixture
async def client(bus_address):
    bus = await dbuslib.connect(bus_address)
    yield bus
    bus.disconnect()


class Mock:
    """A python-dbusmock template in its own process, and its control interface."""

    def __init__(self, proc: subprocess.Popen, bus_name: str, path: str):
        self.proc, self.bus_name, self.path = proc, bus_name, path

    async def control(self, bus, member: str, signature: str = "", body: list | None = None):
        reply = await busutil.call(bus, member, signature, body, destination=self.bus_name,
                                   path=self.path, interface="org.freedesktop.DBus.Mock")
        assert busutil.error_of(reply) is None, busutil.error_of(reply)
        return reply.body

    async def calls(self, bus, method: str) -> list:
        """Arguments of each call of `method` the mock received (python-dbusmock's GetMethodCalls)."""
        (calls,) = await self.control(bus, "GetMethodCalls", "s", [method])
        return [busutil.plain(args) for _ts, args in calls]


async def start_mock(bus_address, template: str, bus_name: str, path: str,
                     parameters: str = "{}") -> Mock:
    env = busutil.broker_env({"DBUS_SYSTEM_BUS_ADDRESS": bus_address})
    proc = subprocess.Popen([sys.executable, "-m", "dbusmock", "--system", "--template", template,
                             "--parameters", parameters],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = await dbuslib.connect(bus_address)
    try:
        await busutil.wait_for_name(probe, bus_name, proc=proc)
    finally:
        probe.disconnect()
    return Mock(proc, bus_name, path)


@pytest.fixture
async def polkit(bus_address, client):
    mock = await start_mock(bus_address, "polkitd", names.POLKIT_BUS_NAME, names.POLKIT_PATH)
    yield mock
    busutil.stop(mock.proc)


@pytest.fixture
async def allow(polkit, client):
    """polkit (mock) grants the broker's action."""
    await polkit.control(client, "SetAllowed", "as", [[names.POLKIT_ACTION]])
    return polkit


@dataclass
class Broker:
    proc: subprocess.Popen
    config: dict
    config_file: Path
    log_file: Path
    store: Path
    control: Path
    env: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def calls(self, action: str | None = None) -> list[str]:
        try:
            lines = (self.control / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if action is None or line.startswith(action + " ")]


@pytest.fixture
def store(tmp_path):
    from harness import storefactory
    return Path(storefactory.make_store(tmp_path))


@pytest.fixture
async def start_broker(tmp_path, bus_address, client, store, request):
    """start_broker(**config) runs the real broker process on the private bus."""
    started: list[Broker] = []
    control = tmp_path / "control"
    control.mkdir(exist_ok=True)
    pid_file = tmp_path / "apache.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # "Apache" runs as long as the test does

    async def start(wait: bool = True, **overrides) -> Broker:
        cfg = busutil.fake_apache_config(store, control, pid_file, tmp_path / "state",
                                         {"settle_seconds": 0.3, "polkit_timeout_seconds": 2, **overrides})
        n = len(started)
        config_file = busutil.write_config(tmp_path / f"broker{n}.toml", cfg)
        log_file = tmp_path / f"broker{n}.log"
        proc = subprocess.Popen(busutil.broker_command(config_file, bus_address),
                                env=busutil.broker_env(), stdin=subprocess.DEVNULL,
                                stdout=log_file.open("wb"), stderr=subprocess.STDOUT)
        b = Broker(proc, cfg, config_file, log_file, store, control)
        started.append(b)
        if wait:
            await busutil.wait_for_name(client, names.BUS_NAME, proc=proc)
        return b

    yield start
    for b in started:
        busutil.stop(b.proc)
        sys.stderr.write(f"--- broker log ({b.log_file.name}) ---\n{b.log()}\n")


def pytest_collection_modifyitems(items):
    """A missing reply must fail the test within a minute, not hang CI (pytest-timeout)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))


@pytest.fixture
def open_bus_address(tmp_path):
    """Like `bus_address`, with the socket in a 0755 folder so that other users (www-data) can
    connect: pytest's tmp_path lies under a 0700 folder. A module whose tests run clients as
    www-data overrides `bus_address` with it (then `start_broker` and `client` use it too)."""
    import shutil
    import tempfile
    sock_dir = Path(tempfile.mkdtemp(prefix="arb-bus-"))
    sock_dir.chmod(0o755)
    proc, address = busutil.start_test_bus(tmp_path, sock_dir)
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    yield address
    if old is None:
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    else:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old
    busutil.stop(proc)
    shutil.rmtree(sock_dir, ignore_errors=True)
