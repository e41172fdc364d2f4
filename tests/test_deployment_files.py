"""The deployment files, checked without any service running.

The bus policy, the activation file, the polkit action and rules, the systemd units and
the installer (staged into a temporary DESTDIR). The tools are the ones the files are
made for: xmllint, dbus-daemon (a private bus, started and killed here), systemd-analyze.
A test that needs a missing tool is skipped and says which. Each check that could
pass vacuously has a negative control next to it: a broken input that must fail it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from broker import config as broker_config
from harness.bus import BUS_CONFIG
from tests import tiers
from broker import names

REPO = Path(__file__).resolve().parent.parent
DBUS_DIR = REPO / "dbus"
POLKIT_DIR = REPO / "polkit"
SYSTEMD_DIR = REPO / "systemd"
INSTALL = REPO / "scripts" / "install"
UNINSTALL = REPO / "scripts" / "uninstall"

BUS_POLICY = DBUS_DIR / f"{names.BUS_NAME}.conf"
ACTIVATION = DBUS_DIR / f"{names.BUS_NAME}.service"
POLKIT_POLICY = POLKIT_DIR / "org.masysma.apacherestart.policy"
POLKIT_RULES = POLKIT_DIR / "49-apache-restart-broker.rules"
BROKER_UNIT = "apache-restart-broker.service"
CHECK_UNIT = "apache-restart-broker-check.service"
CHECK_TIMER = "apache-restart-broker-check.timer"
DROPIN = "command-mode.conf"
POLKIT_DTD = Path("/usr/share/polkit-1/policyconfig-1.dtd")

APACHE_USER = "www-data"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
PEER = "org.freedesktop.DBus.Peer"

# Where the installer puts things (the layout the unit files and the Apache snippet rely on).
VENV_BIN = "/opt/apache-restart-broker/venv/bin"
UNIT_DIR = "/usr/local/lib/systemd/system"
LINKS = {
    "/usr/local/sbin/apache-restart-broker": f"{VENV_BIN}/apache-restart-broker",
    "/usr/local/bin/apache-restart-hook": f"{VENV_BIN}/apache-restart-hook",
    "/usr/local/bin/apache-restart": f"{VENV_BIN}/apache-restart",
}
SHIPPED = {  # installed path -> source in the tree (copied as is, or with the Apache user)
    f"/usr/share/dbus-1/system.d/{names.BUS_NAME}.conf": BUS_POLICY,
    f"/usr/share/dbus-1/system-services/{names.BUS_NAME}.service": ACTIVATION,
    f"/usr/share/dbus-1/interfaces/{names.INTERFACE}.xml": DBUS_DIR / f"{names.INTERFACE}.xml",
    "/usr/share/polkit-1/actions/org.masysma.apacherestart.policy": POLKIT_POLICY,
    "/usr/share/polkit-1/rules.d/49-apache-restart-broker.rules": POLKIT_RULES,
    "/usr/share/polkit-1/rules.d/49-apache-restart-broker-monitor.rules":
        POLKIT_DIR / "49-apache-restart-broker-monitor.rules",
    f"{UNIT_DIR}/{BROKER_UNIT}": SYSTEMD_DIR / BROKER_UNIT,
    f"{UNIT_DIR}/{CHECK_UNIT}": SYSTEMD_DIR / CHECK_UNIT,
    f"{UNIT_DIR}/{CHECK_TIMER}": SYSTEMD_DIR / CHECK_TIMER,
}
WITH_APACHE_USER = {f"/usr/share/dbus-1/system.d/{names.BUS_NAME}.conf",
                    "/usr/share/polkit-1/rules.d/49-apache-restart-broker.rules"}
INSTALLED_DROPIN = f"{UNIT_DIR}/{BROKER_UNIT}.d/{DROPIN}"
CONFIG_FILE = "/etc/apache-restart-broker.toml"
APACHE_SNIPPET = "/etc/apache2/conf-available/apache-restart-broker.conf"
HOOK_LINK = "/usr/local/bin/apache-restart-hook"

# dbus-daemon says this when it may not raise its fd limit (no CAP_SYS_RESOURCE, e.g. in
# a container); it is about the machine, not about the configuration.
DBUS_ENVIRONMENT_NOISE = re.compile(r"Failed to set fd limit")


need = tiers.need


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------
# XML


XML_FILES = sorted([*DBUS_DIR.glob("*.conf"), *DBUS_DIR.glob("*.xml"), *POLKIT_DIR.glob("*.policy")])


def test_the_xml_files_are_there() -> None:
    assert BUS_POLICY in XML_FILES and POLKIT_POLICY in XML_FILES


@pytest.mark.parametrize("path", XML_FILES, ids=lambda p: p.name)
def test_xml_is_well_formed(path: Path) -> None:
    xmllint = need("xmllint")
    result = run([xmllint, "--noout", "--nonet", str(path)])
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_xmllint_reports_malformed_xml(tmp_path: Path) -> None:
    xmllint = need("xmllint")
    bad = tmp_path / "bad.conf"
    bad.write_text(BUS_POLICY.read_text().replace("</busconfig>", ""))
    assert run([xmllint, "--noout", "--nonet", str(bad)]).returncode != 0


# --------------------------------------------------------------------------------------
# The bus policy: rpmlint's D-Bus policy rules, and this project's stricter ones


ALLOWED_INTERFACES = {names.INTERFACE, INTROSPECTABLE, PROPERTIES, PEER}


# systemd's "job finished" signal to the broker, from root only, and nothing else like it.
SYSTEMD_JOB_SIGNAL = {
    "send_destination": names.BUS_NAME, "send_type": "signal", "send_path": "/org/freedesktop/systemd1",
    "send_interface": "org.freedesktop.systemd1.Manager", "send_member": "JobRemoved",
}


def dbus_policy_findings(xml_text: str, apache_user: str = APACHE_USER) -> list[str]:
    """Problems in a system bus policy file, named like rpmlint's DBusPolicyCheck.

    rpmlint's rules (rpmlint/checks/DBusPolicyCheck.py), then this project's own:
    only root owns the name, every allow names our destination and one of our
    interfaces, nothing but the Apache user and root gets an allow, no blanket rules.
    """
    findings: list[str] = []
    root = ET.fromstring(xml_text)
    if root.tag != "busconfig":
        return [f"not a busconfig: <{root.tag}>"]
    send_policy_seen = False
    own_rules = 0
    for policy in root.iter("policy"):
        for allow in policy.iter("allow"):
            a = allow.attrib
            shown = ET.tostring(allow, encoding="unicode").strip()
            # --- rpmlint
            if {"send_interface", "send_member", "send_path"} & a.keys() and "send_destination" not in a:
                findings.append(f"dbus-policy-allow-without-destination: {shown}")
                send_policy_seen = True
            elif "send_destination" in a:
                send_policy_seen = True
            if "receive_sender" in a or "receive_interface" in a:
                findings.append(f"dbus-policy-allow-receive: {shown}")
            for key, value in a.items():
                if key != "send_member" and key.startswith("send_") and "*" in value:
                    findings.append(f"dbus-policy-allow-wildcard: {shown}")
            # --- this project
            if any("*" in v for v in a.values()):
                findings.append(f"wildcard: {shown}")
            if any(k.startswith("receive_") or k == "eavesdrop" for k in a):
                findings.append(f"receive or eavesdrop rule: {shown}")
            if "own" in a or "own_prefix" in a:
                own_rules += 1
                if policy.attrib != {"user": "root"} or set(a) != {"own"} or a["own"] != names.BUS_NAME:
                    findings.append(f"own by anyone but root, or of another name: {shown}")
                continue
            if a == SYSTEMD_JOB_SIGNAL and policy.attrib == {"user": "root"}:
                continue  # the one signal the broker must receive (restart_via = "systemd")
            if a.get("send_destination") != names.BUS_NAME:
                findings.append(f"allow without our send_destination (a blanket rule): {shown}")
            if a.get("send_interface") not in ALLOWED_INTERFACES:
                findings.append(f"allow without one of our interfaces: {shown}")
            if not set(a) <= {"send_destination", "send_interface", "send_member"}:
                findings.append(f"allow with other attributes (send_type, send_path, ...): {shown}")
        for deny in policy.iter("deny"):
            d = deny.attrib
            shown = ET.tostring(deny, encoding="unicode").strip()
            if "send_interface" in d and "send_destination" not in d:
                findings.append(f"dbus-policy-deny-without-destination: {shown}")
        # --- who the policies are for
        who = policy.attrib
        if who == {"context": "default"}:
            if policy.findall("allow"):
                findings.append("an allow in the default context (everybody)")
        elif who not in ({"user": "root"}, {"user": apache_user}):
            findings.append(f"policy for someone else: {who}")
    if not send_policy_seen:
        findings.append("dbus-policy-missing-allow")
    if own_rules != 1:
        findings.append(f"{own_rules} own rules, expected exactly one (root)")
    return findings


def allowed_calls(xml_text: str, user: str) -> set[tuple[str, str | None]]:
    """(interface, member or None for all) that the file lets `user` send to the broker."""
    root = ET.fromstring(xml_text)
    calls = set()
    for policy in root.iter("policy"):
        if policy.attrib.get("user") != user:
            continue
        for allow in policy.iter("allow"):
            if "send_destination" in allow.attrib and allow.attrib.get("send_type") != "signal":
                calls.add((allow.attrib["send_interface"], allow.attrib.get("send_member")))
    return calls


def test_bus_policy_passes_the_dbus_policy_rules() -> None:
    assert dbus_policy_findings(BUS_POLICY.read_text()) == []


def _send_rule(who: str, interface: str) -> str:
    return (f'<policy {who}><allow send_destination="{names.BUS_NAME}" '
            f'send_interface="{interface}"/></policy>')


@pytest.mark.parametrize("bad, finding", [
    ('<policy user="root"><allow send_interface="org.masysma.ApacheRestart"/></policy>',
     "dbus-policy-allow-without-destination"),
    ('<policy user="root"><allow receive_sender="org.masysma.ApacheRestart"/></policy>',
     "dbus-policy-allow-receive"),
    ('<policy user="root"><allow send_destination="*"/></policy>', "dbus-policy-allow-wildcard"),
    ('<policy context="default"><deny send_interface="org.masysma.ApacheRestart"/></policy>',
     "dbus-policy-deny-without-destination"),
    (f'<policy user="{APACHE_USER}"><allow own="org.masysma.ApacheRestart"/></policy>',
     "own by anyone but root"),
    ('<policy user="root"><allow send_type="method_call"/></policy>', "blanket rule"),
    (_send_rule('context="default"', names.INTERFACE), "default context"),
    (_send_rule('user="nobody"', names.INTERFACE), "someone else"),
    (_send_rule('user="root"', "org.freedesktop.systemd1.Manager"), "one of our interfaces"),
    ('<policy user="www-data"><allow send_destination="org.masysma.ApacheRestart" send_type="signal" '
     'send_path="/org/freedesktop/systemd1" send_interface="org.freedesktop.systemd1.Manager" '
     'send_member="JobRemoved"/></policy>', "one of our interfaces"),
])
def test_dbus_policy_rules_catch_a_bad_rule(bad: str, finding: str) -> None:
    text = BUS_POLICY.read_text().replace("</busconfig>", bad + "\n</busconfig>")
    assert any(finding in f for f in dbus_policy_findings(text)), dbus_policy_findings(text)


def test_bus_policy_gives_exactly_the_contracts_access() -> None:
    text = BUS_POLICY.read_text()
    assert allowed_calls(text, "root") == {(i, None) for i in ALLOWED_INTERFACES}
    assert allowed_calls(text, APACHE_USER) == {
        (names.INTERFACE, "RequestGracefulRestart"),
        (names.INTERFACE, "DryRunRequest"),
        (PROPERTIES, "Get"),
        (PROPERTIES, "GetAll"),
    }
    assert {p.attrib.get("user") or p.attrib.get("context") for p in ET.fromstring(text).iter("policy")} \
        == {"default", "root", APACHE_USER}


# --------------------------------------------------------------------------------------
# The bus policy in a real dbus-daemon (a private, system-like bus)


def bus_config(tmp: Path, policy_files: dict[str, str], socket: Path, extra: str = "") -> Path:
    """A config shaped like Debian's system.conf (deny by default), including our files."""
    system_d = tmp / "system.d"
    system_d.mkdir(exist_ok=True)
    for name, text in policy_files.items():
        (system_d / name).write_text(text)
    config = tmp / "bus.conf"
    text = BUS_CONFIG.format(socket=escape(str(socket)), includedir=escape(str(system_d)))
    config.write_text(text.replace("  <includedir>", f"  {extra}\n  <includedir>", 1))
    return config


class Bus:
    def __init__(self, proc: subprocess.Popen[str], address: str):
        self.proc = proc
        self.address = address
        self.stderr = ""

    def complaints(self) -> list[str]:
        return [line for line in self.stderr.splitlines()
                if line.strip() and not DBUS_ENVIRONMENT_NOISE.search(line)]


@contextmanager
def private_bus(config: Path) -> Iterator[Bus]:
    daemon = need("dbus-daemon")
    proc = subprocess.Popen([daemon, "--nofork", "--print-address=1", f"--config-file={config}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    bus = Bus(proc, "")
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        bus.address = proc.stdout.readline().strip() if ready else ""
        if not bus.address:
            proc.kill()
            pytest.fail(f"dbus-daemon did not start: {proc.communicate(timeout=10)[1]}")
        yield bus
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            _, bus.stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, bus.stderr = proc.communicate()


def load_complaints(tmp: Path, policy_text: str) -> list[str]:
    config = bus_config(tmp, {f"{names.BUS_NAME}.conf": policy_text}, tmp / "bus.socket")
    with private_bus(config) as bus:
        pass
    return bus.complaints()


def test_dbus_daemon_loads_the_bus_policy_without_complaint(tmp_path: Path) -> None:
    assert load_complaints(tmp_path, BUS_POLICY.read_text()) == []


def test_dbus_daemon_complaints_are_seen(tmp_path: Path) -> None:
    # The negative control: dbus-daemon starts even with a broken file (it skips it), so
    # its complaints on stderr are the only sign. An unknown attribute must show up.
    broken = BUS_POLICY.read_text().replace('send_member="GetAll"', 'send_membr="GetAll"')
    complaints = load_complaints(tmp_path, broken)
    assert any("send_membr" in line for line in complaints), complaints


# A stand-in for the broker: owns the name and answers every call with "interface.member".
# It first calls a helper connection and must get the reply: the policy's default-context
# deny must not keep the broker from hearing back from polkit and systemd.
STUB_BROKER = """
import asyncio, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def main():
    address, name = sys.argv[1], sys.argv[2]
    helper = await MessageBus(bus_address=address).connect()
    helper.add_message_handler(
        lambda m: Message.new_method_return(m, "s", ["pong"])
        if m.message_type == MessageType.METHOD_CALL and m.member == "Ping" else None)
    await helper.request_name("org.example.Helper")
    bus = await MessageBus(bus_address=address).connect()
    bus.add_message_handler(
        lambda m: Message.new_method_return(m, "s", [f"{m.interface}.{m.member}"])
        if m.message_type == MessageType.METHOD_CALL and m.sender != "org.freedesktop.DBus" else None)
    await bus.request_name(name)
    reply = await bus.call(Message(destination="org.example.Helper", path="/",
                                   interface="org.example.Helper", member="Ping"))
    print("ready" if reply.body == ["pong"] else f"no reply from the helper: {reply.error_name}",
          flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder that other users can reach (pytest's tmp_path is not)."""
    d = Path(tempfile.mkdtemp(prefix="arb-bus-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_bus_enforces_the_policy(tmp_path: Path, shared_dir: Path) -> None:
    if os.geteuid() != 0:
        tiers.unavailable("needs root (to run callers as other users)")
    runuser, dbus_send = need("runuser"), need("dbus-send")
    for user in (APACHE_USER, "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            tiers.unavailable(f"no user {user}")
    helper_policy = ('<policy user="root"><allow own="org.example.Helper"/>'
                     '<allow send_destination="org.example.Helper"/></policy>')
    config = bus_config(tmp_path, {f"{names.BUS_NAME}.conf": BUS_POLICY.read_text()},
                        shared_dir / "bus", extra=helper_policy)
    stub = tmp_path / "stub_broker.py"
    stub.write_text(STUB_BROKER)
    with private_bus(config) as bus:
        broker = subprocess.Popen([sys.executable, str(stub), bus.address, names.BUS_NAME],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert broker.stdout is not None
            ready, _, _ = select.select([broker.stdout], [], [], 15)
            line = broker.stdout.readline().strip() if ready else ""
            assert line == "ready", line or broker.stderr

            def call(user: str | None, interface: str, member: str, *args: str) -> str:
                argv = [dbus_send, f"--bus={bus.address}", "--print-reply", "--reply-timeout=5000",
                        f"--dest={names.BUS_NAME}", names.OBJECT_PATH, f"{interface}.{member}", *args]
                if user is not None:
                    argv = [runuser, "-u", user, "--", *argv]
                result = run(argv)
                if result.returncode == 0:
                    assert f"{interface}.{member}" in result.stdout  # it reached the broker
                    return "ok"
                assert "org.freedesktop.DBus.Error.AccessDenied" in result.stderr, result.stderr
                return "denied"

            iface = names.INTERFACE
            prop = ("string:" + iface, "string:Pending")
            assert call(APACHE_USER, iface, "RequestGracefulRestart", "string:example.org") == "ok"
            assert call(APACHE_USER, PROPERTIES, "Get", *prop) == "ok"
            assert call(APACHE_USER, PROPERTIES, "GetAll", "string:" + iface) == "ok"
            assert call(APACHE_USER, INTROSPECTABLE, "Introspect") == "denied"
            assert call(APACHE_USER, PEER, "Ping") == "denied"
            assert call(APACHE_USER, iface, "GetStatus") == "denied"
            assert call(APACHE_USER, iface, "CheckAll") == "denied"
            assert call(APACHE_USER, iface, "SelfTest", "string:") == "denied"
            assert call(APACHE_USER, iface, "DryRunRequest", "string:example.org") == "ok"
            assert call("nobody", iface, "DryRunRequest", "string:example.org") == "denied"
            assert call(APACHE_USER, PROPERTIES, "Set", *prop, "variant:boolean:true") == "denied"
            assert call("nobody", iface, "RequestGracefulRestart", "string:example.org") == "denied"
            assert call("nobody", PROPERTIES, "GetAll", "string:" + iface) == "denied"
            assert call("nobody", INTROSPECTABLE, "Introspect") == "denied"
            assert call(None, iface, "GetStatus") == "ok"
            assert call(None, iface, "CheckAll") == "ok"
            assert call(None, iface, "RequestGracefulRestart", "string:example.org") == "ok"
            assert call(None, PROPERTIES, "Set", *prop, "variant:boolean:true") == "ok"

            own = run([runuser, "-u", APACHE_USER, "--", dbus_send, f"--bus={bus.address}",
                       "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                       "org.freedesktop.DBus.RequestName", f"string:{names.BUS_NAME}", "uint32:0"])
            assert own.returncode != 0 and "AccessDenied" in own.stderr, own.stdout + own.stderr
        finally:
            broker.kill()
            broker.communicate()
    # The daemon logs each refusal; there must be nothing else (no complaint about the file).
    assert [c for c in bus.complaints() if "Rejected send message" not in c] == []
    # Ten refusals: the calls asserted "denied" above.
    assert sum("Rejected send message" in c for c in bus.complaints()) == 10


# --------------------------------------------------------------------------------------
# D-Bus activation


def ini(text: str) -> dict[tuple[str, str], list[str]]:
    """systemd / D-Bus .service style: (section, key) -> values in order."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def test_activation_file_hands_activation_to_systemd() -> None:
    s = ini(ACTIVATION.read_text())
    assert s == {
        ("D-BUS Service", "Name"): [names.BUS_NAME],
        ("D-BUS Service", "Exec"): ["/bin/false"],
        ("D-BUS Service", "User"): ["root"],
        ("D-BUS Service", "SystemdService"): [BROKER_UNIT],
    }
    unit = ini((SYSTEMD_DIR / BROKER_UNIT).read_text())
    assert unit[("Service", "BusName")] == [names.BUS_NAME]


# --------------------------------------------------------------------------------------
# polkit


def test_polkit_policy_is_valid_against_polkits_dtd(tmp_path: Path) -> None:
    xmllint = need("xmllint")
    if not POLKIT_DTD.is_file():
        tiers.unavailable(f"{POLKIT_DTD} is missing (polkitd not installed)")
    result = run([xmllint, "--noout", "--nonet", "--dtdvalid", str(POLKIT_DTD), str(POLKIT_POLICY)])
    assert result.returncode == 0 and not result.stderr, result.stderr
    # The negative control: an unknown element is refused by the same check.
    bad = tmp_path / "bad.policy"
    bad.write_text(POLKIT_POLICY.read_text().replace(
        "<defaults>", "<defaults><allow_everyone>yes</allow_everyone>"))
    assert run([xmllint, "--noout", "--nonet", "--dtdvalid", str(POLKIT_DTD), str(bad)]).returncode != 0


def test_polkit_action_has_conservative_defaults() -> None:
    actions = ET.parse(POLKIT_POLICY).getroot().findall("action")
    assert [a.get("id") for a in actions] == [names.POLKIT_ACTION, names.POLKIT_ACTION_READ_STATUS]
    for action in actions:
        defaults_element = action.find("defaults")
        assert defaults_element is not None
        defaults = {d.tag: (d.text or "").strip() for d in defaults_element}
        assert defaults == {"allow_any": "no", "allow_inactive": "no", "allow_active": "auth_admin_keep"}


def polkit_rule_findings(js: str, apache_user: str = APACHE_USER) -> list[str]:
    """What would make the rules file grant more than the one action to the one user."""
    code = "\n".join(line for line in js.splitlines() if not line.strip().startswith("//"))
    findings = []
    if code.count("polkit.addRule(") != 1:
        findings.append("not exactly one polkit.addRule")
    if "addAdminRule" in code:
        findings.append("changes who counts as admin")
    results = re.findall(r"polkit\.Result\.(\w+)", code)
    if results != ["YES"]:
        findings.append(f"returns {results}, expected one YES")
    if re.findall(r'action\.id\s*==\s*"([^"]*)"', code) != [names.POLKIT_ACTION]:
        findings.append("does not test for exactly our action")
    if re.findall(r'subject\.user\s*==\s*"([^"]*)"', code) != [apache_user]:
        findings.append(f"does not test for exactly the user {apache_user}")
    if re.search(r"action\.id\s*(!=|\.(indexOf|startsWith|match))|isInGroup|\|\|", code):
        findings.append("a broader condition than action == ours && user == the Apache user")
    condition = re.search(r"if\s*\((.*?)\)\s*\{", code, re.DOTALL)
    if condition is None or "&&" not in condition.group(1):
        findings.append("action and user are not both required")
    return findings


def test_polkit_rules_grant_only_the_action_to_the_apache_user() -> None:
    assert polkit_rule_findings(POLKIT_RULES.read_text()) == []


# Runs the rules file the way polkitd does (a global `polkit` with addRule and Result)
# and prints the answer of every rule for each (action, user) given on the command line.
RULES_HARNESS = """
const fs = require("fs");
const rules = [];
const polkit = {
  Result: {YES: "yes", NO: "no", AUTH_ADMIN: "auth_admin", AUTH_ADMIN_KEEP: "auth_admin_keep",
           AUTH_SELF: "auth_self", AUTH_SELF_KEEP: "auth_self_keep", NOT_HANDLED: null},
  addRule: (f) => rules.push(f),
  addAdminRule: () => { throw new Error("addAdminRule"); },
  log: () => {}, spawn: () => { throw new Error("spawn"); },
};
new Function("polkit", fs.readFileSync(process.argv[2], "utf8"))(polkit);
const out = {};
for (const pair of process.argv.slice(3)) {
  const [id, user] = pair.split(" ");
  const subject = {user: user, local: false, active: false, pid: 1, groups: [user],
                   isInGroup: (g) => g === user, isInNetGroup: () => false};
  const action = {id: id, lookup: () => undefined};
  let answer = null;
  for (const rule of rules) {
    const r = rule(action, subject);
    if (r !== undefined && r !== null) { answer = r; break; }
  }
  out[pair] = answer;
}
console.log(JSON.stringify(out));
"""


def test_polkit_rules_decide_only_for_the_apache_user_and_the_action(tmp_path: Path) -> None:
    node = need("node")
    harness = tmp_path / "rules_harness.js"
    harness.write_text(RULES_HARNESS)
    cases = {
        f"{names.POLKIT_ACTION} {APACHE_USER}": "yes",
        f"{names.POLKIT_ACTION} nobody": None,
        f"{names.POLKIT_ACTION} root": None,
        f"{names.POLKIT_ACTION}x {APACHE_USER}": None,
        f"org.freedesktop.systemd1.manage-units {APACHE_USER}": None,
        f"org.freedesktop.hostname1.set-hostname {APACHE_USER}": None,
    }
    result = run([node, str(harness), str(POLKIT_RULES), *cases])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == cases


@pytest.mark.parametrize("change", [
    ('subject.user == "www-data"', 'subject.isInGroup("www-data")'),
    ("&&", "||"),
    ('action.id == "org.masysma.apacherestart.graceful-restart"',
     'action.id.indexOf("org.masysma.") == 0'),
    ("return polkit.Result.YES;", "return polkit.Result.YES; } else { return polkit.Result.NO;"),
])
def test_polkit_rule_checks_catch_a_broader_rule(change: tuple[str, str]) -> None:
    text = POLKIT_RULES.read_text()
    assert change[0] in text
    assert polkit_rule_findings(text.replace(change[0], change[1])) != []


# --------------------------------------------------------------------------------------
# systemd units


def host_unit_dir() -> Path:
    for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (d / "sysinit.target").exists():
            return d
    tiers.unavailable("no systemd unit directory with sysinit.target here")


def exec_paths(unit_text: str) -> list[str]:
    paths = []
    for (section, key), values in ini(unit_text).items():
        if section == "Service" and key.startswith("Exec"):
            paths += [v.split()[0].lstrip("-@:+!") for v in values]
    return paths


def verify_root(tmp: Path, dropin: bool, unit_text: str | None = None) -> tuple[Path, list[Path]]:
    """A root directory for `systemd-analyze verify --root`: the host's stock units (for the
    targets ours hang off), ours where the installer puts them, unchanged, and stand-ins for
    the programs, which exist only after an install, at the paths the units name."""
    root = tmp / "root"
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / UNIT_DIR.lstrip("/")
    unit_dir.mkdir(parents=True)
    units = []
    for name in (BROKER_UNIT, CHECK_UNIT, CHECK_TIMER):
        text = (SYSTEMD_DIR / name).read_text() if unit_text is None or name != BROKER_UNIT else unit_text
        (unit_dir / name).write_text(text)
        units.append(unit_dir / name)
        for program in exec_paths(text):
            stand_in = root / program.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\nexit 0\n")
            stand_in.chmod(0o755)
    if dropin:
        (unit_dir / f"{BROKER_UNIT}.d").mkdir()
        shutil.copy(SYSTEMD_DIR / DROPIN, unit_dir / f"{BROKER_UNIT}.d" / DROPIN)
    return root, units


def systemd_verify(root: Path, units: list[Path]) -> subprocess.CompletedProcess[str]:
    analyze = need("systemd-analyze")
    return run([analyze, "verify", "--man=no", f"--root={root}", *map(str, units)],
               env={"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_COLOR": "0", "LC_ALL": "C.UTF-8"})


@pytest.mark.parametrize("dropin", [False, True], ids=["systemd-mode", "command-mode"])
def test_systemd_analyze_verify_passes(tmp_path: Path, dropin: bool) -> None:
    root, units = verify_root(tmp_path, dropin)
    result = systemd_verify(root, units)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_systemd_analyze_verify_reports_a_bad_unit(tmp_path: Path) -> None:
    # The negative control: verify exits 0 on an unknown key, so the test above also
    # demands silence. A misspelt setting must make noise.
    text = (SYSTEMD_DIR / BROKER_UNIT).read_text().replace("Restart=on-failure", "Restart=sometimes")
    root, units = verify_root(tmp_path, False, unit_text=text)
    result = systemd_verify(root, units)
    assert "sometimes" in result.stdout + result.stderr


def test_broker_unit_is_a_dbus_service_run_from_the_installed_link() -> None:
    s = ini((SYSTEMD_DIR / BROKER_UNIT).read_text())
    assert s[("Service", "Type")] == ["dbus"]
    assert s[("Service", "BusName")] == [names.BUS_NAME]
    assert s[("Service", "Restart")] == ["on-failure"]
    assert s[("Service", "ExecStart")] == ["/usr/local/sbin/apache-restart-broker"]
    assert "/usr/local/sbin/apache-restart-broker" in LINKS
    # The state directory the unit makes writable is the broker's default state_dir.
    assert s[("Service", "StateDirectory")] == ["apache-restart-broker"]
    assert broker_config.Config().state_dir == "/var/lib/apache-restart-broker"
    assert s[("Service", "ProtectSystem")] == ["strict"]
    assert s[("Service", "IPAddressDeny")] == ["any"]
    assert s[("Service", "IPAddressAllow")] == ["localhost"]


LOOSENING = re.compile(
    r"^(CapabilityBoundingSet=\S|RestrictAddressFamilies=.*AF_(INET|INET6|NETLINK|PACKET)\b|"
    r"IPAddressAllow=|ReadWritePaths=|SystemCallFilter=[^~]*@(chown|privileged|resources)|"
    r"PrivateNetwork=no|PrivateUsers=no|ProtectSystem=(?!strict)|ProtectHome=(?!yes)|User=root)"
)


def loosenings_without_comment(text: str) -> list[str]:
    """Settings that open the sandbox, whose paragraph has no '# Loosening' comment."""
    missing = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines()]
        explained = any(line.startswith("# Loosening") for line in lines)
        missing += [line for line in lines if LOOSENING.match(line) and not explained]
    return missing


@pytest.mark.parametrize("name", [BROKER_UNIT, DROPIN])
def test_every_loosening_says_why(name: str) -> None:
    text = (SYSTEMD_DIR / name).read_text()
    assert any(LOOSENING.match(line.strip()) for line in text.splitlines())  # something to explain
    assert loosenings_without_comment(text) == []
    # What the unit cannot have is explained too.
    if name == BROKER_UNIT:
        for absent in ("PrivateNetwork=", "PrivateUsers=", "runs as root"):
            assert re.search(rf"^# Loosening:.*{re.escape(absent)}", text, re.MULTILINE), absent


def test_loosening_check_catches_an_unexplained_one() -> None:
    text = (SYSTEMD_DIR / BROKER_UNIT).read_text() + "\n\nReadWritePaths=/etc/apache2\n"
    assert loosenings_without_comment(text) == ["ReadWritePaths=/etc/apache2"]


def test_check_timer_and_service() -> None:
    timer = ini((SYSTEMD_DIR / CHECK_TIMER).read_text())
    # Every few minutes (a cluster node catches up with another node's activation), each host
    # at its own stable offset, which stays below the interval so runs stay evenly apart.
    assert timer[("Timer", "OnCalendar")] == ["*:0/5"]
    assert timer[("Timer", "FixedRandomDelay")] == ["yes"]
    assert timer[("Timer", "RandomizedDelaySec")] == ["4min"]
    assert timer[("Timer", "Persistent")] == ["true"]
    assert timer[("Install", "WantedBy")] == ["timers.target"]
    service = ini((SYSTEMD_DIR / CHECK_UNIT).read_text())
    assert service[("Service", "Type")] == ["oneshot"]
    assert service[("Service", "ExecStart")] == ["/usr/local/bin/apache-restart check-all"]
    assert "/usr/local/bin/apache-restart" in LINKS
    # The broker unit itself is started by the bus, not at boot.
    assert not any(section == "Install" for section, _ in ini((SYSTEMD_DIR / BROKER_UNIT).read_text()))


def load_bench() -> object:
    spec = importlib.util.spec_from_file_location("unit_security", REPO / "bench" / "unit_security.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exposure_in_systemd_mode_is_at_most_2(capsys: pytest.CaptureFixture[str]) -> None:
    need("systemd-analyze")
    bench = load_bench()
    rows = bench.measure()  # type: ignore[attr-defined]
    by_mode = {mode: value for _, mode, value in rows}
    with capsys.disabled():
        print("\n" + "\n".join(f"  exposure {label}: {value:.1f}" for label, _, value in rows))
    assert by_mode["systemd"] <= 2.0
    # The drop-in only loosens: command mode cannot be rated safer than systemd mode.
    assert by_mode["command"] >= by_mode["systemd"]
    assert by_mode["-"] <= by_mode["systemd"]  # the check service needs even less


def test_exposure_rating_can_fail() -> None:
    need("systemd-analyze")
    bench = load_bench()
    bare = "[Service]\nType=dbus\nBusName=org.masysma.ApacheRestart\nExecStart=/bin/true\n"
    assert bench.exposure(BROKER_UNIT, bare) > 2.0  # type: ignore[attr-defined]


def test_bench_script_prints_the_table_and_passes() -> None:
    need("systemd-analyze")
    result = run([sys.executable, str(REPO / "bench" / "unit_security.py")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"^{re.escape(BROKER_UNIT)}\s+systemd\s+\d\.\d$", result.stdout, re.MULTILINE), result.stdout


# --------------------------------------------------------------------------------------
# The installer, staged into DESTDIR


def install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    staging = any(a.startswith("--destdir") for a in args) or full_env.get("DESTDIR")
    if not staging and os.geteuid() == 0:
        raise AssertionError("a test must never install onto the machine it runs on")
    return run([sys.executable, str(INSTALL), *args], env=full_env)


def tree(destdir: Path) -> dict[str, tuple[int, str]]:
    """Every entry below destdir: path -> (mode, content or link target)."""
    out = {}
    for p in sorted(destdir.rglob("*")):
        st = p.lstat()
        rel = "/" + str(p.relative_to(destdir))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (stat.S_IFMT(st.st_mode), os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = (st.st_mode, "")
        else:
            out[rel] = (st.st_mode, p.read_text())
    return out


def staged(tmp_path: Path, *args: str) -> Path:
    destdir = tmp_path / "stage"
    result = install("--destdir", str(destdir), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return destdir


def test_install_stages_every_file_with_its_mode(tmp_path: Path) -> None:
    live_before = {p: os.path.lexists(p) for p in [*SHIPPED, *LINKS, CONFIG_FILE, APACHE_SNIPPET]}
    destdir = staged(tmp_path, "--apache-user", "apache2user")
    files = {p for p, (mode, _) in tree(destdir).items() if not stat.S_ISDIR(mode)}
    assert files == {*SHIPPED, *LINKS, CONFIG_FILE, APACHE_SNIPPET}
    for target, source in SHIPPED.items():
        p = destdir / target.lstrip("/")
        assert p.is_file() and not p.is_symlink(), target
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, target
        if target not in WITH_APACHE_USER:
            assert p.read_bytes() == source.read_bytes(), target
    for link, points_to in LINKS.items():
        p = destdir / link.lstrip("/")
        assert p.is_symlink() and os.readlink(p) == points_to, link
    for d in destdir.rglob("*"):
        if d.is_dir() and not d.is_symlink():
            assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    # The Apache user is in the bus policy and the rules, and www-data is gone from both.
    policy = (destdir / f"usr/share/dbus-1/system.d/{names.BUS_NAME}.conf").read_text()
    assert dbus_policy_findings(policy, apache_user="apache2user") == []
    assert allowed_calls(policy, "apache2user") == allowed_calls(BUS_POLICY.read_text(), APACHE_USER)
    assert allowed_calls(policy, APACHE_USER) == set()
    rules = (destdir / "usr/share/polkit-1/rules.d/49-apache-restart-broker.rules").read_text()
    assert polkit_rule_findings(rules, apache_user="apache2user") == []
    # A configuration the broker accepts, in systemd mode, so no drop-in.
    config = destdir / CONFIG_FILE.lstrip("/")
    assert stat.S_IMODE(config.stat().st_mode) == 0o644
    with open(config, "rb") as f:
        data = tomllib.load(f)
    assert broker_config.from_mapping(data).restart_via == "systemd"
    assert not (destdir / INSTALLED_DROPIN.lstrip("/")).exists()
    # The Apache snippet calls the hook where the installer links it.
    snippet = (destdir / APACHE_SNIPPET.lstrip("/")).read_text()
    assert re.search(rf"^\s*MDMessageCmd {re.escape(HOOK_LINK)}\s*$", snippet, re.MULTILINE)
    assert HOOK_LINK in LINKS
    # Nothing live was touched; no venv was staged.
    assert {p: os.path.lexists(p) for p in live_before} == live_before
    assert not (destdir / "opt").exists()


def test_installed_policy_for_another_user_loads_in_dbus_daemon(tmp_path: Path) -> None:
    other = next((u for u in ("daemon", "nobody", "bin") if _user_exists(u)), None)
    if other is None:
        tiers.unavailable("no second system user to substitute")
    destdir = staged(tmp_path, "--apache-user", other)
    policy = (destdir / f"usr/share/dbus-1/system.d/{names.BUS_NAME}.conf").read_text()
    assert load_complaints(tmp_path, policy) == []


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_install_in_command_mode_adds_the_dropin(tmp_path: Path) -> None:
    destdir = staged(tmp_path, "--restart-via", "command")
    dropin = destdir / INSTALLED_DROPIN.lstrip("/")
    assert dropin.read_bytes() == (SYSTEMD_DIR / DROPIN).read_bytes()
    with open(destdir / CONFIG_FILE.lstrip("/"), "rb") as f:
        assert broker_config.from_mapping(tomllib.load(f)).restart_via == "command"
    # Switching the configuration to systemd and installing again removes the drop-in.
    config = destdir / CONFIG_FILE.lstrip("/")
    config.write_text(config.read_text().replace('restart_via = "command"', 'restart_via = "systemd"'))
    staged(tmp_path)
    assert not dropin.exists()


def test_install_again_changes_nothing_and_keeps_the_config(tmp_path: Path) -> None:
    destdir = staged(tmp_path)
    config = destdir / CONFIG_FILE.lstrip("/")
    config.write_text('restart_via = "systemd"\nsettle_seconds = 5\n')
    before = tree(destdir)
    result = install("--destdir", str(destdir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(destdir) == before
    assert "unchanged" in result.stdout
    assert not re.search(r"^\s*(installed|linked|removed)\s+/", result.stdout, re.MULTILINE), result.stdout


def test_destdir_from_the_environment(tmp_path: Path) -> None:
    destdir = tmp_path / "envstage"
    result = install(env={"DESTDIR": str(destdir)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (destdir / f"usr/share/dbus-1/system.d/{names.BUS_NAME}.conf").is_file()


def test_uninstall_removes_what_install_put_there(tmp_path: Path) -> None:
    destdir = staged(tmp_path, "--restart-via", "command")
    (destdir / "etc/apache2/conf-enabled").mkdir(parents=True)
    (destdir / "etc/apache2/conf-enabled/apache-restart-broker.conf").symlink_to(
        "../conf-available/apache-restart-broker.conf")
    (destdir / "var/lib/apache-restart-broker").mkdir(parents=True)
    (destdir / "var/lib/apache-restart-broker/state.json").write_text("{}")
    # Someone else's file next to ours stays.
    (destdir / "usr/local/bin/other-tool").write_text("#!/bin/sh\n")

    if Path("/usr/bin/python3").exists():  # the wrapper runs the installer by its #! line
        result = run([str(UNINSTALL), "--destdir", str(destdir)])
    else:
        result = install("--uninstall", "--destdir", str(destdir))
    assert result.returncode == 0, result.stdout + result.stderr
    files = {p for p, (mode, _) in tree(destdir).items() if not stat.S_ISDIR(mode)}
    assert files == {CONFIG_FILE, "/var/lib/apache-restart-broker/state.json", "/usr/local/bin/other-tool"}
    assert not (destdir / INSTALLED_DROPIN.lstrip("/")).parent.exists()

    again = install("--uninstall", "--destdir", str(destdir))
    assert again.returncode == 0, again.stdout + again.stderr
    purge = install("--uninstall", "--purge", "--destdir", str(destdir))
    assert purge.returncode == 0, purge.stdout + purge.stderr
    files = {p for p, (mode, _) in tree(destdir).items() if not stat.S_ISDIR(mode)}
    assert files == {"/usr/local/bin/other-tool"}


def test_install_refuses_a_bad_user_name_and_touches_nothing(tmp_path: Path) -> None:
    destdir = tmp_path / "stage"
    for bad in ('www"data', "www-data<", "a b", "-rf", "", "x" * 40):
        result = install("--destdir", str(destdir), f"--apache-user={bad}")
        assert result.returncode != 0, bad
    assert not destdir.exists()


def test_install_does_not_replace_someone_elses_program(tmp_path: Path) -> None:
    destdir = tmp_path / "stage"
    foreign = destdir / "usr/local/bin/apache-restart"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("#!/bin/sh\necho mine\n")
    result = install("--destdir", str(destdir))
    assert result.returncode != 0
    assert "not replacing" in result.stderr
    assert foreign.read_text() == "#!/bin/sh\necho mine\n"


def test_install_needs_root_without_destdir() -> None:
    # The suite runs as root, where a live install would touch this machine: the refusal is
    # tried as an unprivileged user, from a copy that user can read.
    argv = [sys.executable, str(INSTALL)]
    if os.geteuid() == 0:
        runuser = need("runuser")
        d = Path(tempfile.mkdtemp(prefix="arb-install-", dir="/tmp"))
        try:
            d.chmod(0o755)
            # The installer reads its file list from deploy/ (and the keys from broker/).
            for package in ("deploy", "broker"):
                shutil.copytree(REPO / package, d / package, ignore=shutil.ignore_patterns("__pycache__"))
            (d / "scripts").mkdir(mode=0o755)
            shutil.copy(INSTALL, d / "scripts" / "install")
            (d / "scripts" / "install").chmod(0o755)
            result = run([runuser, "-u", "nobody", "--", "/usr/bin/python3", str(d / "scripts" / "install")],
                         env={"PATH": "/usr/bin:/bin"}, cwd=str(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        result = run(argv, env={"PATH": "/usr/bin:/bin", "DESTDIR": ""})
    assert result.returncode != 0
    assert "installing on this system needs root" in result.stderr, result.stderr
