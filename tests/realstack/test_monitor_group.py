"""The monitoring group with the real components: the bus policy and polkit rule as the installer
writes them for a group, in the real dbus-daemon and polkitd, and the real broker.

A member may read GetStatus (and run `apache-restart check` on it); a non-member may not; the
member may not ask for a restart or CheckAll. The group is "daemon" here (its member "daemon"
exists on every Debian system; "nagios" exists only where a monitoring agent is installed),
and "nobody" is not in it. With a bus that lets everyone through, the broker and polkit still
decide the same: the bus policy is not the only guard.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import names
from harness import storefactory
from tests.realstack.stack import RealStack
from tests.realstack.test_realstack import PERMISSIVE_POLICY, assert_bus_refused

pytestmark = pytest.mark.realstack

StartStack = Callable[..., RealStack]
REPO = Path(__file__).resolve().parent.parent.parent
MD = "www.example.test"
GROUP = MEMBER = "daemon"
NON_MEMBER = "nobody"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployment files as `scripts/install --monitor-group daemon` writes them."""
    assert MEMBER in grp.getgrnam(GROUP).gr_mem or pwd.getpwnam(MEMBER).pw_gid == grp.getgrnam(GROUP).gr_gid
    assert pwd.getpwnam(NON_MEMBER).pw_gid != grp.getgrnam(GROUP).gr_gid
    dest = tmp_path_factory.mktemp("stage")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "install"), "--destdir", str(dest),
                             "--monitor-group", GROUP], capture_output=True, text=True, timeout=120,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stdout + result.stderr
    return dest


def start(realstack: StartStack, installed: Path, permissive: bool = False, tmp: Path | None = None) -> RealStack:
    policy = installed / f"usr/share/dbus-1/system.d/{names.BUS_NAME}.conf"
    if permissive:
        assert tmp is not None
        policy = tmp / "permissive.conf"
        policy.write_text(PERMISSIVE_POLICY)
    stack = realstack(policy_files=[policy])
    stack.set_rules(sorted((installed / "usr/share/polkit-1/rules.d").glob("*.rules")))
    storefactory.add_active(stack.store, MD, [MD])
    return stack


def test_a_member_reads_the_status_and_a_non_member_is_refused_by_the_bus(realstack: StartStack,
                                                                           installed: Path) -> None:
    stack = start(realstack, installed)
    reply = stack.call(MEMBER, "GetStatus")
    assert reply.ok, reply
    status = json.loads(str(reply.value()))
    assert [m["name"] for m in status["mds"]] == [MD]
    assert stack.call(MEMBER, "GetAll", f"string:{names.INTERFACE}",
                      interface="org.freedesktop.DBus.Properties").ok
    assert_bus_refused(stack.call(NON_MEMBER, "GetStatus"))
    # Reading is all: no restart, no check of every MD.
    assert_bus_refused(stack.request(MEMBER, MD))
    assert_bus_refused(stack.call(MEMBER, "CheckAll"))


def test_the_member_runs_the_monitoring_plugin(realstack: StartStack, installed: Path) -> None:
    stack = start(realstack, installed)
    result = stack.run_as(MEMBER, [sys.executable, "-m", "client.admin", "--bus-address", stack.address, "check"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("APACHE-RESTART OK - 1 MD, nearest expiry in "), result.stdout
    assert "days (www.example.test) | 'www.example.test days_left'=" in result.stdout, result.stdout
    denied = stack.run_as(NON_MEMBER, [sys.executable, "-m", "client.admin", "--bus-address", stack.address,
                                       "check"])
    assert denied.returncode == 3 and denied.stdout.startswith("APACHE-RESTART UNKNOWN - cannot ask the broker"), \
        denied.stdout + denied.stderr


def test_polkit_and_the_broker_decide_when_the_bus_lets_everyone_through(realstack: StartStack, installed: Path,
                                                                         tmp_path: Path) -> None:
    stack = start(realstack, installed, permissive=True, tmp=tmp_path)
    assert stack.call(MEMBER, "GetStatus").ok
    refused = stack.call(NON_MEMBER, "GetStatus")
    assert refused.error_name == names.ERROR_ACCESS_DENIED, refused
    assert "not authorized to read the status" in refused.error_message, refused
    request = stack.request(MEMBER, MD)
    assert request.error_name == names.ERROR_ACCESS_DENIED, request
    assert "not authorized to request a restart" in request.error_message, request
    check_all = stack.call(MEMBER, "CheckAll")
    assert check_all.error_name == names.ERROR_ACCESS_DENIED and "only root" in check_all.error_message, check_all
    # polkit was asked about the read action for both callers, by the broker.
    assert stack.broker_log().count(f"polkit did not authorize {names.POLKIT_ACTION_READ_STATUS}") == 1


def test_as_shipped_the_group_block_is_off(realstack: StartStack) -> None:
    stack = realstack()
    assert_bus_refused(stack.call(MEMBER, "GetStatus"))
