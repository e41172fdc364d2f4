"""A private system-like D-Bus and the real polkitd on it, without touching the host.

The bus is a dbus-daemon with a config shaped like Debian's system.conf (deny by default, policy
files from an include directory); it takes copies of the given policy files and of polkit's own.
polkitd has no option for other action or rule folders, so it runs in a private mount namespace
(``unshare -m --propagation private``) where copies made here are bind-mounted over its three
folders; the host's folders are never written and the mounts vanish with the process.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from .procs import HarnessError, ManagedProcess, ServiceProcess, harness_env, make_dir, write_file

POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_AUTHORITY_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
# Where polkitd 122 reads actions and rules (it has no other rule folders).
POLKIT_ACTIONS_DIR = "/usr/share/polkit-1/actions"
POLKIT_PACKAGE_RULES_DIR = "/usr/share/polkit-1/rules.d"
POLKIT_ADMIN_RULES_DIR = "/etc/polkit-1/rules.d"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- A private bus shaped like the system bus (Debian's system.conf), for tests. -->
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>

  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>

  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>

  <includedir>{includedir}</includedir>
</busconfig>
"""


def dbus_send(address: str, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    """``dbus-send --print-reply`` on ``address``; the reply (or the error's name) in stdout/stderr."""
    return subprocess.run(
        ["dbus-send", f"--bus={address}", "--print-reply", f"--reply-timeout={int(timeout * 1000)}", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout + 5,
        stdin=subprocess.DEVNULL,
    )


def name_has_owner(address: str, name: str) -> bool:
    result = dbus_send(
        address,
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.NameHasOwner",
        f"string:{name}",
    )
    return result.returncode == 0 and "boolean true" in result.stdout


def gdbus_call(
    address: str, dest: str, path: str, method: str, *args: str, timeout: float = 5.0
) -> subprocess.CompletedProcess[str]:
    """``gdbus call`` (GVariant text arguments); an error's D-Bus name shows in stderr."""
    return subprocess.run(
        [
            "gdbus",
            "call",
            "--address",
            address,
            "--dest",
            dest,
            "--object-path",
            path,
            "--method",
            method,
            "--timeout",
            str(max(1, int(timeout))),
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout + 5,
        stdin=subprocess.DEVNULL,
    )


def check_authorization(
    address: str, pid: int, action: str, timeout: float = 5.0
) -> subprocess.CompletedProcess[str]:
    """Ask polkit whether process ``pid`` may do ``action`` (no interaction).

    On success stdout is ``((is_authorized, is_challenge, {details}),)``.
    """
    subject = f"('unix-process', {{'pid': <uint32 {pid}>, 'start-time': <uint64 0>}})"
    return gdbus_call(
        address,
        POLKIT_NAME,
        POLKIT_AUTHORITY_PATH,
        f"{POLKIT_AUTHORITY_INTERFACE}.CheckAuthorization",
        subject,
        action,
        "@a{ss} {}",
        "uint32 0",
        "",
        timeout=timeout,
    )


def _copy_into(directory: Path, files: Sequence[Path]) -> Path:
    """A fresh 0755 folder holding 0644 copies of ``files`` (readable by any daemon user)."""
    make_dir(directory)
    for source in files:
        source = Path(source)
        if not source.is_file():
            raise HarnessError(f"no such file: {source}")
        write_file(directory / source.name, source.read_bytes())
    return directory


class PrivateBus(ServiceProcess):
    """A dbus-daemon on a socket in ``workdir`` with copies of ``policy_files`` in its includedir.

    The socket's folder is 0755 so that www-data (mod_md's hook) can connect.
    """

    def __init__(
        self,
        workdir: Path,
        run_id: str,
        policy_files: Sequence[Path] = (),
        *,
        with_polkit_policy: bool = True,
    ) -> None:
        self.workdir = make_dir(workdir)
        self.run_id = run_id
        self.policy_files = [Path(p) for p in policy_files]
        if with_polkit_policy:
            # Without it polkitd may not own its name on the bus, and exits.
            self.policy_files.append(POLKIT_BUS_POLICY)
        self.socket_path = self.workdir / "system_bus_socket"
        self.policy_dir = self.workdir / "system.d"
        self.config_path = self.workdir / "system.conf"
        self.address_path = self.workdir / "address"
        self.log_path = self.workdir / "dbus-daemon.log"
        self.process: ManagedProcess | None = None
        self.address = ""

    def write_config(self) -> Path:
        _copy_into(self.policy_dir, self.policy_files)
        text = BUS_CONFIG.format(
            socket=escape(str(self.socket_path)), includedir=escape(str(self.policy_dir))
        )
        return write_file(self.config_path, text)

    def _read_address(self) -> str:
        assert self.process is not None
        self.process.check_alive()
        try:
            line = self.address_path.read_text()
        except OSError:
            return ""
        return line.strip() if line.endswith("\n") else ""

    def start(self, timeout: float = 5.0) -> str:
        """Start the daemon; returns its address (the first line it prints)."""
        self.write_config()
        process = ManagedProcess(
            "dbus-daemon",
            ["dbus-daemon", "--nofork", "--print-address=1", f"--config-file={self.config_path}"],
            harness_env(self.run_id),
            self.log_path,
            stdout_path=self.address_path,
        )
        self.address = self._run_until(process, self._read_address, timeout, "dbus-daemon to print its address")
        return self.address


# Runs as root inside the new mount namespace: bind the copies over polkit's folders (the rules
# where a package installs them, an empty folder over the admin's), then become polkitd (exec
# keeps the pid, so stopping the process group stops polkitd and ends the namespace).
POLKITD_WRAPPER = """set -e
mount --bind "$1" {actions}
mount --bind "$2" {package_rules}
mount --bind "$3" {admin_rules}
exec {polkitd}
"""


class Polkitd(ServiceProcess):
    """The real polkitd on ``bus_address``, seeing only ``actions`` and ``rules`` (copied here)."""

    def __init__(
        self,
        workdir: Path,
        run_id: str,
        bus_address: str,
        *,
        actions: Sequence[Path] = (),
        rules: Sequence[Path] = (),
    ) -> None:
        self.workdir = make_dir(workdir)
        self.run_id = run_id
        self.bus_address = bus_address
        self.actions = [Path(p) for p in actions]
        self.rules = [Path(p) for p in rules]
        self.actions_dir = self.workdir / "actions"
        self.rules_dir = self.workdir / "rules.d"
        self.empty_dir = self.workdir / "empty"
        self.log_path = self.workdir / "polkitd.log"
        self.process: ManagedProcess | None = None

    def _owns_name(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        return name_has_owner(self.bus_address, POLKIT_NAME)

    def start(self, timeout: float = 10.0) -> None:
        if not POLKITD.exists():
            raise HarnessError(f"{POLKITD} is missing (Debian package: polkitd)")
        _copy_into(self.actions_dir, self.actions)
        _copy_into(self.rules_dir, self.rules)
        make_dir(self.empty_dir)
        wrapper = POLKITD_WRAPPER.format(
            actions=POLKIT_ACTIONS_DIR,
            package_rules=POLKIT_PACKAGE_RULES_DIR,
            admin_rules=POLKIT_ADMIN_RULES_DIR,
            polkitd=POLKITD,
        )
        process = ManagedProcess(
            "polkitd",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                wrapper,
                "polkitd-wrapper",
                str(self.actions_dir),
                str(self.rules_dir),
                str(self.empty_dir),
            ],
            harness_env(self.run_id, {"DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}),
            self.log_path,
        )
        self._run_until(process, self._owns_name, timeout, f"polkitd to own {POLKIT_NAME}", interval=0.05)
