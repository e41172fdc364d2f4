"""Authorization with the real components: the shipped bus policy in dbus-daemon, the shipped polkit
action and rules in polkitd, the real broker as root, callers run as www-data, nobody and root.

Callers are ``dbus-send`` run through ``runuser``: its output names the error, and it needs
nothing of this project (so the callers' view does not depend on the client modules). Two
refusals look alike to a caller, both ``org.freedesktop.DBus.Error.AccessDenied``; the message
tells who refused: the bus says "Rejected send message", the broker says what polkit answered.

The static checks of the deployment files and the bus policy against a stand-in broker are in
tests/test_deployment_files.py; the live introspection against the interface XML is in the mock
tier (tests/dbus). Each test starts its own stack (a quarter of a second) and waits only where a restart
or a timeout has to happen.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import broker
from broker import names
from harness import busutil
from tests.realstack.stack import REPO
from harness.procs import wait_for
from harness import storefactory
from tests.realstack.stack import (
    APACHE_USER,
    OTHER_USER,
    SETTLE_SECONDS,
    SHIPPED_RULES,
    RealStack,
    Reply,
    skip_or_fail,
)

pytestmark = pytest.mark.realstack

StartStack = Callable[..., RealStack]  # the realstack fixture

MD = "www.example.test"
ACCESS_DENIED = names.ERROR_ACCESS_DENIED
PROPERTIES = "org.freedesktop.DBus.Properties"
# What the bus daemon says when its policy refuses a message (and only then).
BUS_REFUSAL = "Rejected send message"
# What the broker says when polkit answered "no" / could not be asked (broker/authz.py).
POLKIT_SAID_NO = "not authorized to request a restart of Apache"
POLKIT_NOT_ASKED = "authorization could not be checked"

# A bus policy for one test only: everybody may send anything to the broker.
PERMISSIVE_POLICY = f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="{names.BUS_NAME}"/>
  </policy>
  <policy context="default">
    <allow send_destination="{names.BUS_NAME}"/>
  </policy>
</busconfig>
"""


def assert_nothing_changed(stack: RealStack, staged: storefactory.SetInfo) -> None:
    """No restart pending or carried out, and the staged set still where mod_md left it.

    Waits out the settle window first: a request that slipped through would restart by then.
    """
    time.sleep(SETTLE_SECONDS + 0.4)
    assert stack.prop("Pending") is False
    assert stack.prop("PlannedAt") == 0
    assert stack.prop("LastResult") == ""
    assert stack.apachectl_calls("configtest") == [] and stack.apachectl_calls("graceful") == []
    assert storefactory.read_staged_fingerprint(stack.store, MD) == staged.fingerprint
    assert storefactory.read_active_fingerprint(stack.store, MD) is None


def assert_bus_refused(reply: Reply) -> None:
    assert reply.error_name == ACCESS_DENIED, reply
    assert BUS_REFUSAL in reply.error_message, reply


def assert_restarted_once(stack: RealStack, staged: storefactory.SetInfo) -> None:
    assert stack.wait_for_restart_result() == "ok"
    assert len(stack.apachectl_calls("configtest")) == 1
    assert len(stack.apachectl_calls("graceful")) == 1
    assert stack.prop("Pending") is False
    assert storefactory.read_active_fingerprint(stack.store, MD) == staged.fingerprint


# --------------------------------------------------------------------------------------


def test_www_data_is_accepted_and_apache_restarts_once(realstack: StartStack) -> None:
    stack = realstack()
    staged = storefactory.add_staged(stack.store, MD, [MD])
    before = time.time()
    reply = stack.request(APACHE_USER, MD)
    after = time.time()
    assert reply.ok, reply
    planned = reply.value() / 1e6
    assert before + SETTLE_SECONDS - 0.05 <= planned <= after + SETTLE_SECONDS + 0.05, (before, planned, after)
    # The broker identified the caller as www-data through the bus.
    uid = pwd.getpwnam(APACHE_USER).pw_uid
    assert f"request from uid {uid} for {MD} accepted" in stack.broker_log()
    assert_restarted_once(stack, staged)
    # The set is active now: asking again finds nothing staged (and restarts nothing).
    again = stack.request(APACHE_USER, MD)
    assert again.error_name == names.ERROR_NOTHING_STAGED, again
    time.sleep(SETTLE_SECONDS + 0.2)
    assert len(stack.apachectl_calls("graceful")) == 1


def test_polkitd_and_its_rules_decide_for_www_data(realstack: StartStack) -> None:
    # The broker asks polkitd before it looks at the store, so an unstaged name tells the two
    # answers apart without restarting anything: NothingStaged = authorized, AccessDenied = not.
    stack = realstack()
    assert stack.request(APACHE_USER, MD).error_name == names.ERROR_NOTHING_STAGED

    stack.set_rules([])  # polkitd without the shipped rule: the action's defaults say no
    refused = stack.request(APACHE_USER, MD)
    assert refused.error_name == ACCESS_DENIED, refused
    assert refused.error_message == POLKIT_SAID_NO, refused
    assert "polkit did not authorize " + names.POLKIT_ACTION in stack.broker_log()

    stack.set_rules(SHIPPED_RULES)
    assert stack.request(APACHE_USER, MD).error_name == names.ERROR_NOTHING_STAGED


def test_nobody_is_refused_by_the_bus(realstack: StartStack) -> None:
    stack = realstack()
    staged = storefactory.add_staged(stack.store, MD, [MD])
    assert_bus_refused(stack.request(OTHER_USER, MD))
    # Nothing else of the broker either: no properties, no introspection.
    assert_bus_refused(stack.get_property(OTHER_USER, "Version"))
    assert_bus_refused(stack.call(OTHER_USER, "Introspect", interface="org.freedesktop.DBus.Introspectable"))
    # The bus daemon logged the refusal; the broker never saw the request (it logs every
    # refusal it makes itself).
    uid = pwd.getpwnam(OTHER_USER).pw_uid
    assert any(BUS_REFUSAL in line and f"uid={uid} " in line and 'member="RequestGracefulRestart"' in line
               for line in stack.bus_log().splitlines()), stack.bus_log()
    assert "refused" not in stack.broker_log()
    assert_nothing_changed(stack, staged)


def test_nobody_is_refused_by_polkit_when_the_bus_lets_everyone_through(realstack: StartStack, tmp_path: Path) -> None:
    permissive = tmp_path / f"{names.BUS_NAME}.conf"  # instead of the shipped policy
    permissive.write_text(PERMISSIVE_POLICY)
    stack = realstack(policy_files=[permissive])
    staged = storefactory.add_staged(stack.store, MD, [MD])
    # The bus lets nobody through now (the control: with the shipped policy this is refused).
    version = stack.get_property(OTHER_USER, "Version")
    assert version.ok and version.value() == broker.__version__, version

    reply = stack.request(OTHER_USER, MD)
    assert reply.error_name == ACCESS_DENIED, reply
    assert reply.error_message == POLKIT_SAID_NO, reply
    uid = pwd.getpwnam(OTHER_USER).pw_uid
    assert f"(uid {uid}): polkit did not authorize {names.POLKIT_ACTION}" in stack.broker_log()
    # The administrative methods check for root themselves, whatever the bus lets through;
    # GetStatus also for whom polkit grants the read action (the monitoring group).
    for member, refusal in (("GetStatus", "not authorized to read the status"),
                            ("CheckAll", "only root may do this")):
        admin = stack.call(OTHER_USER, member)
        assert admin.error_name == ACCESS_DENIED, admin
        assert admin.error_message == refusal, admin
    assert_nothing_changed(stack, staged)


def test_root_is_accepted(realstack: StartStack) -> None:
    # polkit authorizes uid 0 for every action without consulting rules or defaults.
    stack = realstack()
    staged = storefactory.add_staged(stack.store, MD, [MD])
    reply = stack.request("root", MD)
    assert reply.ok, reply
    assert reply.value() > 0
    assert f"request from uid 0 for {MD} accepted" in stack.broker_log()
    assert_restarted_once(stack, staged)
    # Not thanks to the shipped rule: without any rules polkit still says yes to root (the
    # unstaged name answers NothingStaged only after authorization), and no to www-data.
    stack.set_rules([])
    assert stack.request("root", MD).error_name == names.ERROR_NOTHING_STAGED
    assert stack.request(APACHE_USER, MD).error_name == ACCESS_DENIED


def test_polkitd_stopped_means_access_denied(realstack: StartStack) -> None:
    stack = realstack()
    staged = storefactory.add_staged(stack.store, MD, [MD])
    assert stack.polkit is not None
    stack.polkit.stop()
    wait_for(lambda: stack.name_owner("org.freedesktop.PolicyKit1") is None, 5, "polkitd's name to go")
    for user in (APACHE_USER, "root"):  # root too: the broker never skips polkit
        reply = stack.request(user, MD)
        assert reply.error_name == ACCESS_DENIED, reply
        assert reply.error_message == POLKIT_NOT_ASKED, reply
        # The bus answers for the missing polkitd at once: well within the broker's timeout.
        assert reply.seconds < stack.config["polkit_timeout_seconds"], reply
    assert_nothing_changed(stack, staged)


def test_polkitd_not_answering_means_access_denied_after_the_timeout(realstack: StartStack) -> None:
    timeout = 1.0
    stack = realstack(polkit_timeout_seconds=timeout)
    staged = storefactory.add_staged(stack.store, MD, [MD])
    assert stack.polkit is not None and stack.polkit.process is not None
    polkitd = stack.polkit.process.pid
    assert polkitd is not None
    assert Path(f"/proc/{polkitd}/comm").read_text().strip() == "polkitd"
    os.kill(polkitd, signal.SIGSTOP)
    try:
        reply = stack.request(APACHE_USER, MD)
    finally:
        os.kill(polkitd, signal.SIGCONT)
    assert reply.error_name == ACCESS_DENIED, reply
    assert reply.error_message == f"{POLKIT_NOT_ASKED} (polkit did not answer)", reply
    assert timeout <= reply.seconds < timeout + 1.5, reply
    # polkitd's late "yes" (it answers once it runs again) must not schedule anything.
    assert_nothing_changed(stack, staged)
    # And the broker asks again next time.
    assert stack.request(APACHE_USER, MD).ok


# Tries to own the broker's name with a Python D-Bus library, as a program of www-data would.
OWN_NAME = textwrap.dedent("""
    import asyncio, importlib, os, sys
    lib = os.environ.get("APACHE_RESTART_DBUS_LIB") or "dbus_fast"
    try:
        dbus = importlib.import_module(lib)
    except ImportError:
        lib, dbus = "dbus_next", importlib.import_module("dbus_next")
    aio = importlib.import_module(lib + ".aio")

    async def main():
        bus = await aio.MessageBus(bus_address=sys.argv[1]).connect()
        flags = dbus.NameFlag.REPLACE_EXISTING | dbus.NameFlag.DO_NOT_QUEUE
        try:
            reply = await bus.request_name(sys.argv[2], flags)
        except dbus.DBusError as e:
            print("error", e.type, e.text)
        else:
            print("reply", reply)
        bus.disconnect()

    asyncio.run(main())
""")


def test_www_data_may_not_own_the_name(realstack: StartStack) -> None:
    stack = realstack()
    owner = stack.name_owner(names.BUS_NAME)
    assert owner is not None and owner.startswith(":")
    for user in (APACHE_USER, OTHER_USER):
        reply = stack.dbus_send(user, "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus.RequestName", f"string:{names.BUS_NAME}",
                                "uint32:6")  # REPLACE_EXISTING | DO_NOT_QUEUE
        assert reply.error_name == ACCESS_DENIED, reply
        assert "is not allowed to own the service" in reply.error_message, reply

    probe = stack.run_as(APACHE_USER, [sys.executable, "-c", "import sys; print(sys.prefix)"])
    if probe.returncode != 0:
        skip_or_fail(f"{sys.executable} cannot be run by {APACHE_USER} (a venv that user can read is "
                     f"needed): {probe.stderr.strip()}")
    result = stack.run_as(APACHE_USER, [sys.executable, "-c", OWN_NAME, stack.address, names.BUS_NAME])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"error {ACCESS_DENIED} "), result.stdout + result.stderr
    assert "is not allowed to own the service" in result.stdout

    assert stack.name_owner(names.BUS_NAME) == owner
    assert stack.broker is not None and stack.broker.running()


def test_www_data_may_read_properties_but_not_call_admin_methods(realstack: StartStack) -> None:
    stack = realstack()
    version = stack.get_property(APACHE_USER, "Version")
    assert version.ok, version
    assert version.value() == broker.__version__
    every = stack.call(APACHE_USER, "GetAll", f"string:{names.INTERFACE}", interface=PROPERTIES)
    assert every.ok and "Pending" in every.stdout, every
    for member in ("GetStatus", "CheckAll"):
        assert_bus_refused(stack.call(APACHE_USER, member))
        # The control: the method is there and answers root.
        assert stack.call("root", member).ok
    status = stack.call("root", "GetStatus")
    assert isinstance(json.loads(status.value()), dict)


# -- apache-restart test: the whole path, restarting nothing ----------------------------------

VENV_BIN = Path(sys.executable).parent


def admin_test(stack: RealStack, *args: str) -> tuple[int, list[str]]:
    """`apache-restart test` as root on the stack's bus: (exit status, lines)."""
    result = subprocess.run([sys.executable, "-m", "client.admin", "--bus-address", stack.address, "test",
                             "--hook", str(VENV_BIN / "apache-restart-hook"), *args],
                            cwd=str(REPO), env=busutil.broker_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=90, check=False)
    print(result.stdout + result.stderr)
    return result.returncode, result.stdout.splitlines()


def test_self_test_checks_the_whole_path_restarting_nothing(realstack: StartStack) -> None:
    # Nothing listens on port 1: the probe step must fail, and say what to fix.
    stack = realstack(probe=["127.0.0.1:1"])
    storefactory.add_active(stack.store, MD, [MD])
    storefactory.add_staged(stack.store, MD, [MD])
    rc, lines = admin_test(stack, MD)
    assert rc == 1, lines
    assert lines[0] == f"apache-restart test {MD}: the path a renewal takes, restarting nothing"
    verdicts = [line.split(":", 1)[0] for line in lines[1:] if not line.startswith(" ")][:-1]
    assert verdicts == [
        "ok    root", "ok    broker", f"ok    hook as {APACHE_USER}", f"ok    bus policy and polkit for {APACHE_USER}",
        "ok    store", f"ok    managed {MD}", f"ok    staged {MD}", "ok    apache running", "ok    config test",
        "FAIL  probe 127.0.0.1",
    ], lines
    assert f"ok    bus policy and polkit for {APACHE_USER}: the hook's request for {MD} would be taken" in lines
    (probe,) = [i for i, line in enumerate(lines) if line.startswith("FAIL  probe 127.0.0.1:1")]
    assert "no certificate: connection refused" in lines[probe]
    assert lines[probe + 1].startswith("      fix: check the probe address")
    assert lines[-1] == "9 of 10 checks passed; 1 failed: fix them and run 'apache-restart test' again"
    # It really was www-data that the broker authorized (polkit, through the shipped rule) ...
    assert f"dry run from uid {pwd.getpwnam(APACHE_USER).pw_uid} for {MD}" in stack.broker_log()
    # ... and nothing was scheduled or restarted; the config test ran once.
    assert stack.prop("Pending") is False and stack.prop("LastRestart") == 0
    assert stack.apachectl_calls("graceful") == [] and len(stack.apachectl_calls("configtest")) == 1


def test_self_test_names_a_user_the_bus_policy_refuses(realstack: StartStack) -> None:
    stack = realstack()
    storefactory.add_active(stack.store, MD, [MD])
    rc, lines = admin_test(stack, "--apache-user", OTHER_USER)
    assert rc == 1, lines
    (refused,) = [i for i, line in enumerate(lines) if line.startswith(f"FAIL  bus policy and polkit for {OTHER_USER}")]
    assert lines[refused] == f"FAIL  bus policy and polkit for {OTHER_USER}: refused by the bus policy"
    assert lines[refused + 1].startswith("      fix: the bus policy (")
    assert f"must name {OTHER_USER}" in lines[refused + 1]
    # Without a NAME every MD of the store is checked.
    assert f"ok    managed {MD}: names {MD}" in lines
    assert f"ok    hook as {OTHER_USER}: " in "\n".join(lines)
    assert lines[-1].endswith("; 1 failed: fix them and run 'apache-restart test' again"), lines
