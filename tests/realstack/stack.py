"""The real stack of one test: a private dbus-daemon with the shipped bus policy, the real polkitd
with the shipped polkit action and rules, the real broker process as root; callers run as other users.

Everything runs in a fresh 0755 folder under the system's temp dir (www-data and nobody must reach
the bus socket; pytest's tmp_path is 0700). polkitd sees copies of the project's files through
bind mounts in a private mount namespace (harness.bus.Polkitd); the host's files are never touched.
Every process carries the run's marker in its environment, so the teardown can prove none is left.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker import names
from harness.bus import POLKIT_BUS_POLICY, POLKITD, Polkitd, PrivateBus
from harness.procs import BASE_ENV, ManagedProcess, harness_env, make_dir, tail, wait_for
from harness import busutil, storefactory
from tests import tiers

REPO = Path(__file__).resolve().parent.parent.parent
SHIPPED_BUS_POLICY = REPO / "dbus" / f"{names.BUS_NAME}.conf"
SHIPPED_ACTIONS = sorted((REPO / "polkit").glob("*.policy"))
SHIPPED_RULES = sorted((REPO / "polkit").glob("*.rules"))

APACHE_USER = "www-data"
OTHER_USER = "nobody"
REQUIRED_PROGRAMS = ("dbus-daemon", "dbus-send", "runuser", "unshare", "mount")
REQUIRED_FILES = (POLKITD, POLKIT_BUS_POLICY)
REQUIRED_USERS = (APACHE_USER, OTHER_USER)

# The broker's configuration in this tier (the stand-in apachectl, no TLS probe, short windows).
SETTLE_SECONDS = 0.3
POLKIT_TIMEOUT_SECONDS = 2.0


def missing_requirements() -> list[str]:
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=BASE_ENV["PATH"]) is None]
    missing += [str(f) for f in REQUIRED_FILES if not Path(f).exists()]
    for user in REQUIRED_USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing.append(f"the user {user}")
    if os.geteuid() != 0:
        missing.append("root")
    return missing


skip_or_fail = tiers.unavailable


# --------------------------------------------------------------------------------------
# What a caller gets back


_ERROR = re.compile(r"^Error ([A-Za-z0-9_.]+): ?(.*)$", re.MULTILINE | re.DOTALL)
_BASIC = re.compile(r"^\s*(?:variant\s+)?(string|boolean|uint64|uint32|int32|int64|double|object path) (.*)$")


@dataclass(repr=False)
class Reply:
    """What ``dbus-send --print-reply`` printed for one call, and how long it took."""

    who: str
    what: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def error(self) -> tuple[str, str] | None:
        """(error name, message) of an error reply; None for a method return."""
        if self.ok:
            return None
        m = _ERROR.search(self.stderr)
        return (m.group(1), m.group(2).strip()) if m else ("(no D-Bus error)", self.stderr.strip())

    @property
    def error_name(self) -> str | None:
        return self.error[0] if self.error else None

    @property
    def error_message(self) -> str:
        return self.error[1] if self.error else ""

    def values(self) -> list[str | int | bool]:
        """The basic values in the reply, in order (strings unquoted)."""
        assert self.ok, self
        out: list[str | int | bool] = []
        for line in self.stdout.splitlines()[1:]:
            m = _BASIC.match(line)
            if not m:
                continue
            kind, text = m.groups()
            if kind in ("string", "object path"):
                out.append(text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text)
            elif kind == "boolean":
                out.append(text.strip() == "true")
            elif kind == "double":
                out.append(text.strip())  # not used as a number here
            else:
                out.append(int(text.split()[0]))
        return out

    def value(self) -> Any:
        (v,) = self.values()
        return v

    def __repr__(self) -> str:  # what an assertion shows
        return (f"<{self.who}: {self.what} -> status {self.returncode} in {self.seconds:.3f} s; "
                f"stdout: {self.stdout.strip()!r}; stderr: {self.stderr.strip()!r}>")

    __str__ = __repr__


# --------------------------------------------------------------------------------------
# The stack


class RealStack:
    """The private bus, polkitd and the broker of one test, and the means to call it as anyone."""

    def __init__(self, root: Path, run_id: str, cleanup: ExitStack) -> None:
        self.root = root
        self.run_id = run_id
        self._cleanup = cleanup
        self.store = storefactory.make_store(root)
        self.control = make_dir(root / "control")
        self.pid_file = root / "apache.pid"
        # "Apache" runs as long as the test does: the broker checks that this pid is alive.
        self.pid_file.write_text(f"{os.getpid()}\n")
        self.bus: PrivateBus | None = None
        self.polkit: Polkitd | None = None
        self.broker: ManagedProcess | None = None
        self.config: dict[str, Any] = {}

    # -- bring-up ------------------------------------------------------------------------

    def start(self, policy_files: Sequence[Path] | None, broker_config: dict[str, Any]) -> None:
        policies = [SHIPPED_BUS_POLICY] if policy_files is None else list(policy_files)
        self.bus = PrivateBus(self.root / "bus", self.run_id, policies)
        self._cleanup.callback(self.bus.stop)
        self.bus.start()

        self.polkit = Polkitd(self.root / "polkit", self.run_id, self.bus.address,
                              actions=SHIPPED_ACTIONS, rules=SHIPPED_RULES)
        self._cleanup.callback(self._stop_polkitd)
        self.polkit.start()

        self.config = busutil.fake_apache_config(
            self.store, self.control, self.pid_file, self.root / "state",
            {"settle_seconds": SETTLE_SECONDS, "polkit_timeout_seconds": POLKIT_TIMEOUT_SECONDS,
             **broker_config})
        config_file = busutil.write_config(self.root / "broker.toml", self.config)
        extra = {"PYTHONPATH": str(REPO)}
        if os.environ.get("APACHE_RESTART_DBUS_LIB"):
            extra["APACHE_RESTART_DBUS_LIB"] = os.environ["APACHE_RESTART_DBUS_LIB"]
        self.broker = ManagedProcess(
            "broker",
            [sys.executable, "-m", "broker.main", "--config", str(config_file),
             "--bus-address", self.bus.address],
            harness_env(self.run_id, extra),
            self.root / "broker.log",
            cwd=REPO,
        )
        self._cleanup.callback(self.broker.stop)
        self.broker.start()
        self._wait_for_broker()

    def _wait_for_broker(self) -> None:
        def broker_owns_the_name() -> bool:
            assert self.broker is not None
            self.broker.check_alive()
            return self.name_owner(names.BUS_NAME) is not None

        wait_for(broker_owns_the_name, 15, f"the broker to own {names.BUS_NAME}", interval=0.05)

    def restart_broker(self) -> None:
        """Stop the broker and start it again on the same configuration and state."""
        assert self.broker is not None
        self.broker.stop()
        wait_for(lambda: self.name_owner(names.BUS_NAME) is None, 5, f"{names.BUS_NAME} to go")
        self.broker.start()
        self._wait_for_broker()

    def _stop_polkitd(self) -> None:
        # A test may have stopped it with SIGSTOP: SIGTERM would wait for the kill timeout.
        if self.polkit is not None and self.polkit.process is not None and self.polkit.process.running():
            self.polkit.process.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        if self.polkit is not None:
            self.polkit.stop()

    # -- calls -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        assert self.bus is not None
        return self.bus.address

    def dbus_send(self, user: str, *args: str, timeout: float = 10.0) -> Reply:
        """``dbus-send --print-reply`` as ``user`` (root directly, anyone else through runuser).

        The bus is named by its address (never the host's system bus, whatever the environment).
        """
        argv = ["dbus-send", f"--bus={self.address}", "--print-reply",
                f"--reply-timeout={int(timeout * 1000)}", *args]
        if user != "root":
            argv = ["runuser", "-u", user, "--", *argv]
        t0 = time.monotonic()
        result = subprocess.run(argv, env=harness_env(self.run_id), cwd="/", stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=timeout + 10, check=False)
        return Reply(user, " ".join(args), result.returncode, result.stdout, result.stderr,
                     time.monotonic() - t0)

    def call(self, user: str, member: str, *args: str, interface: str = names.INTERFACE,
             timeout: float = 10.0) -> Reply:
        """A method of the broker's object, called as ``user``."""
        return self.dbus_send(user, f"--dest={names.BUS_NAME}", names.OBJECT_PATH,
                              f"{interface}.{member}", *args, timeout=timeout)

    def request(self, user: str, md: str) -> Reply:
        return self.call(user, "RequestGracefulRestart", f"string:{md}")

    def get_property(self, user: str, prop: str) -> Reply:
        return self.call(user, "Get", f"string:{names.INTERFACE}", f"string:{prop}",
                         interface="org.freedesktop.DBus.Properties")

    def prop(self, prop: str) -> Any:
        """A property's value, read as root."""
        reply = self.get_property("root", prop)
        assert reply.ok, reply
        return reply.value()

    def name_owner(self, name: str) -> str | None:
        reply = self.dbus_send("root", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                               "org.freedesktop.DBus.GetNameOwner", f"string:{name}", timeout=5)
        return str(reply.value()) if reply.ok else None

    def run_as(self, user: str, argv: Sequence[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Any program as ``user``, with only the harness's environment."""
        extra = {}
        if os.environ.get("APACHE_RESTART_DBUS_LIB"):
            extra["APACHE_RESTART_DBUS_LIB"] = os.environ["APACHE_RESTART_DBUS_LIB"]
        return subprocess.run(["runuser", "-u", user, "--", *argv], env=harness_env(self.run_id, extra),
                              cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)

    # -- what happened -----------------------------------------------------------------------

    def apachectl_calls(self, action: str) -> list[str]:
        """The stand-in apachectl's record: one line per ``configtest`` or ``graceful``."""
        try:
            lines = (self.control / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if line.startswith(action + " ")]

    def broker_log(self) -> str:
        assert self.broker is not None
        return self.broker.log_path.read_text(errors="replace")

    def bus_log(self) -> str:
        assert self.bus is not None
        return self.bus.log_path.read_text(errors="replace")

    def polkitd_log(self) -> str:
        assert self.polkit is not None
        return self.polkit.log_path.read_text(errors="replace")

    def wait_for_restart_result(self, timeout: float = 15.0) -> str:
        """Wait until a restart was carried out (LastResult set); returns LastResult."""
        return wait_for(lambda: self.prop("LastResult"), timeout, "a restart to be carried out", interval=0.05)

    def set_rules(self, rules: Sequence[Path], timeout: float = 5.0) -> None:
        """Make polkitd's rules exactly copies of ``rules`` and wait until it has reloaded them.

        Files are moved in and out by rename, so polkitd never reads a half-written rule.
        """
        assert self.polkit is not None and self.polkit.process is not None
        since = self.polkit.log_path.stat().st_size
        aside = make_dir(self.root / "rules-aside")
        for old in self.polkit.rules_dir.iterdir():
            old.rename(aside / f"{old.name}.{time.monotonic_ns()}")
        for rule in rules:
            staged = aside / f"{rule.name}.new"
            staged.write_bytes(rule.read_bytes())
            staged.chmod(0o644)
            staged.rename(self.polkit.rules_dir / rule.name)
        needle = f"Finished loading, compiling and executing {len(rules)} rules"

        def reloaded() -> bool:
            self.polkit.process.check_alive()  # type: ignore[union-attr]
            text = self.polkit.log_path.read_bytes()[since:].decode(errors="replace")  # type: ignore[union-attr]
            return "Reloading rules" in text and needle in text

        wait_for(reloaded, timeout, f"polkitd to reload its rules ({len(rules)})")

    def dump_logs(self, lines: int = 60) -> str:
        parts = []
        logs = {"broker": self.root / "broker.log", "polkitd": self.root / "polkit" / "polkitd.log",
                "dbus-daemon": self.root / "bus" / "dbus-daemon.log",
                "stand-in apachectl": self.control / "calls.log"}
        for name, path in logs.items():
            parts.append(f"----- {name} (last {lines} lines)\n{tail(path, lines)}")
        return "\n".join(parts)


def check_reachable(directory: Path) -> None:
    for parent in [directory, *directory.parents]:
        if not parent.stat().st_mode & stat.S_IXOTH:
            pytest.fail(f"{parent} is not searchable by other users: www-data and nobody could not reach "
                        "the bus socket (set TMPDIR to a folder they can reach)")
