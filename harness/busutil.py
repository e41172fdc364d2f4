"""Helpers shared by the D-Bus test tiers: private buses, raw calls, the broker process."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker import config, dbuslib, names
from broker.dbuslib import Message, MessageType
from . import storefactory

REPO = Path(__file__).resolve().parent.parent


def start_dbus_daemon(config_file: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        ["dbus-daemon", "--nofork", "--print-address=1", f"--config-file={config_file}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        raise RuntimeError(f"dbus-daemon did not start: {proc.stderr.read()}")
    return proc, address


def start_test_bus(config_dir: Path, socket_dir: Path | None = None) -> tuple[subprocess.Popen, str]:
    """The mock tier's permissive private bus (harness/mockbus.conf.in); its config goes to
    `config_dir`, its socket to `socket_dir` (default: the same folder)."""
    template = (REPO / "harness" / "mockbus.conf.in").read_text()
    conf = config_dir / "bus.conf"
    conf.write_text(template.replace("@SOCKET@", str((socket_dir or config_dir) / "bus.sock")))
    return start_dbus_daemon(conf)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def call(bus, member: str, signature: str = "", body: list | None = None, *,
               destination: str = names.BUS_NAME, path: str = names.OBJECT_PATH,
               interface: str = names.INTERFACE, flags: int = 0, timeout: float = 10) -> Message:
    """A raw method call; returns the reply Message (METHOD_RETURN or ERROR) without raising."""
    msg = Message(destination=destination, path=path, interface=interface, member=member,
                  signature=signature, body=body or [], flags=dbuslib.MessageFlag(flags))
    return await asyncio.wait_for(bus.call(msg), timeout)


def error_of(reply: Message) -> tuple[str, str] | None:
    if reply.message_type != MessageType.ERROR:
        return None
    return reply.error_name, (reply.body[0] if reply.body else "")


async def get_property(bus, prop: str):
    reply = await call(bus, "Get", "ss", [names.INTERFACE, prop],
                       interface="org.freedesktop.DBus.Properties")
    assert reply.message_type == MessageType.METHOD_RETURN, error_of(reply)
    return reply.body[0].value


async def name_has_owner(bus, name: str) -> bool:
    reply = await call(bus, "NameHasOwner", "s", [name], destination=names.DBUS_BUS_NAME,
                       path=names.DBUS_PATH, interface=names.DBUS_INTERFACE)
    return bool(reply.body[0])


async def wait_until(predicate, timeout: float, interval: float = 0.01) -> None:
    """Return as soon as `predicate()` holds; fail with AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_for_name(bus, name: str, timeout: float = 10, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not await name_has_owner(bus, name):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process owning {name} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not appear on the bus")
        await asyncio.sleep(0.02)


class SignalRecorder:
    """Collects signals from the broker (RestartFinished, PropertiesChanged)."""

    def __init__(self, bus):
        self.bus = bus
        self.signals: list[Message] = []
        self.event = asyncio.Event()

    async def start(self) -> "SignalRecorder":
        self.bus.add_message_handler(self._on)
        rule = f"type='signal',path='{names.OBJECT_PATH}'"
        await call(self.bus, "AddMatch", "s", [rule], destination=names.DBUS_BUS_NAME,
                   path=names.DBUS_PATH, interface=names.DBUS_INTERFACE)
        return self

    def _on(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.path == names.OBJECT_PATH:
            self.signals.append(msg)
            self.event.set()
        return False

    def of(self, member: str) -> list[Message]:
        return [m for m in self.signals if m.member == member]

    async def wait_for(self, member: str, count: int = 1, timeout: float = 15) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.of(member)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{count} {member} signal(s) expected, got {len(self.of(member))}")
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), remaining)
            except TimeoutError:
                pass
        return self.of(member)


def broker_command(config_file: Path, bus_address: str) -> list[str]:
    return [sys.executable, "-m", "broker.main", "--config", str(config_file),
            "--bus-address", bus_address]


def broker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def fake_apache_config(store: Path, control: Path, pid_file: Path, state_dir: Path,
                       overrides: dict | None = None) -> dict:
    """A broker config that restarts the stand-in apachectl (harness/fake_apache.py)
    against `store`; `overrides` add or replace any key."""
    fake = [sys.executable, str(REPO / "harness" / "fake_apache.py")]
    return {
        "md_store": str(store),
        "restart_via": "command",
        "configtest_command": fake + ["configtest", str(control), str(store)],
        "graceful_command": fake + ["graceful", str(control), str(store)],
        "pid_file": str(pid_file),
        "min_interval_seconds": 0,
        "verify_timeout_seconds": 2,
        "probe": [],
        "state_dir": str(state_dir),
        # The test CA that harness/storefactory.py signs with, in this process.
        "trust_anchors": [str(storefactory.ca_file(store.parent))],
        **(overrides or {}),
    }


def config_text(values: dict, header: str = "") -> str:
    """A broker configuration file with these keys (broker.config writes each value)."""
    lines = [header] if header else []
    lines += [f"{key} = {config.toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, values: dict) -> Path:
    path.write_text(config_text(values))
    return path


def plain(value):
    """A value as the D-Bus library gave it (Variants inside lists and dicts, as python-dbusmock's
    GetMethodCalls and the broker's properties arrive) as plain Python values, for comparing."""
    if hasattr(value, "signature") and hasattr(value, "value"):
        return plain(value.value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
