"""apache-restart: the admin command. It talks only to the broker (no config file, no store).

    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] status [--json]
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] request [--dry-run] NAME
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] check-all
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] test [--apache-user USER] [NAME]
    apache-restart [--bus-address ADDRESS] watch
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] check [--warning DAYS]
                   [--critical DAYS] [--pending-hours H]   (monitoring plugin: exits 0-3)

Exit status:
    0  done
    1  the broker refused (InvalidName, NothingStaged, StagingInvalid, AlreadyFailed, ...);
       for test: a check failed
    2  usage error
    3  try again later: the broker is not reachable, did not answer, is busy or failed
    4  access denied (check-all and test need root, status root or the monitoring group;
       request needs the polkit action)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from broker import __version__, names
from broker.dbuslib import Message, MessageType
from broker.text import safe

from . import call, monitor
from .call import Connection, Failure, format_planned, format_usec, one_line

PROG = "apache-restart"
DEFAULT_TIMEOUT = 30.0

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPORARY = 3
EXIT_DENIED = 4


# Commands the broker answers only for root (status: also for the monitoring group), the
# method behind each, and who may call it.
ROOT_ONLY = {"status": "GetStatus", "check-all": "CheckAll", "test": "SelfTest"}
MAY_CALL = {"status": ("run as root or as a member of the monitoring group", "root and whom polkit grants "
                       f"{names.POLKIT_ACTION_READ_STATUS}")}
CANNOT_START_HINT = ("check the configuration with 'apache-restart-broker --check-config' and the "
                     f"broker's log with 'journalctl -u {names.BROKER_UNIT}'; once fixed, start it with "
                     f"'systemctl start {names.BROKER_UNIT}' (or your init system's equivalent)")


def _fail(f: Failure, what: str) -> int:
    """Say why `what` failed, on stderr, and return the exit status for it."""
    command = what.split()[0]
    what = _show(what)  # it may quote a name given on the command line
    if f.kind == call.DENIED and command in ROOT_ONLY and os.geteuid() != 0:
        # One sentence instead of the bus daemon's rule dump: the cause is always the same.
        who, answered = MAY_CALL.get(command, ("run as root", "root"))
        print(f"{PROG}: {what}: {who} (the broker answers {ROOT_ONLY[command]} only for {answered})",
              file=sys.stderr)
        return EXIT_DENIED
    if isinstance(f, call.ActivationStalled):
        print(f"{PROG}: {what}: the broker is not running: {_show(f.describe(), 1000)}", file=sys.stderr)
        return EXIT_TEMPORARY
    if isinstance(f, call.CannotStart) or call.activation_failed(f.error_name):
        print(f"{PROG}: {what}: the broker cannot start: {_show(f.describe(), 1000)}; {CANNOT_START_HINT}",
              file=sys.stderr)
        return EXIT_TEMPORARY
    if f.kind == call.DENIED:
        hint = " (status needs root or the monitoring group, check-all needs root; request needs " \
               f"the polkit action {names.POLKIT_ACTION})"
        print(f"{PROG}: {what}: access denied: {_show(f.describe(), 1000)}{hint}", file=sys.stderr)
        return EXIT_DENIED
    if f.kind == call.UNREACHABLE:
        print(f"{PROG}: {what}: the broker is not reachable: {_show(f.describe(), 1000)}", file=sys.stderr)
        return EXIT_TEMPORARY
    if f.retryable:
        print(f"{PROG}: {what}: {_show(f.describe(), 1000)}; try again later", file=sys.stderr)
        return EXIT_TEMPORARY
    name = f.error_name or "error"
    print(f"{PROG}: {what}: {_show(name)}: {_show(one_line(f.message), 1000)}", file=sys.stderr)
    return EXIT_REFUSED


# -- status ----------------------------------------------------------------------------------

DAY = 86400.0
LABEL = 14  # width of the labels ("last restart:") so that values line up


def _line(label: str, value: str) -> str:
    return f"{label:<{LABEL}}{value}".rstrip()


def _days_left(not_after_usec: int, now: float) -> str:
    days = (not_after_usec / 1e6 - now) / DAY
    if days < 0:
        return "EXPIRED"
    return f"{int(days)} days left" if days >= 1 else "less than a day left"


def _show(value: Any, limit: int = 300) -> str:
    """A value from the broker, fit for root's terminal: it may quote what www-data wrote."""
    return safe(value if isinstance(value, str) else str(value), limit)


def _escaped(value: Any, limit: int = 1000) -> Any:
    """`value` (decoded JSON or property values) with every string in it escaped (keys too).

    Done once where the broker's answer comes in, so that no line printed from it can carry a
    control character, whichever field a later change of the layout prints.
    """
    if isinstance(value, str):
        return safe(value, limit)
    if isinstance(value, dict):
        return {_escaped(k, limit): _escaped(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v, limit) for v in value]
    return value


def _cert_line(c: dict, now: float) -> str:
    not_after = int(c.get("not_after_usec") or 0)
    return (f"{c.get('key_type', '?'):<10} serial {c.get('serial', '?')}, issuer {one_line(c.get('issuer', '?'), 80)}, "
            f"expires {format_usec(not_after)} ({_days_left(not_after, now)})")


def _served_line(entry: dict, active: dict | None, now: float) -> str:
    probe = one_line(str(entry.get("probe", "?")), 80)
    if entry.get("error"):
        return f"{probe}: ERROR: {one_line(str(entry['error']))}"
    active_sha = {c.get("sha256") for c in (active or {}).get("certs") or []}
    which = "the active certificate" if entry.get("sha256") in active_sha else "NOT the active certificate"
    not_after = int(entry.get("not_after_usec") or 0)
    expiry = f"expires {format_usec(not_after)} ({_days_left(not_after, now)})" if not_after else "expiry unknown"
    key_type = f"{entry['key_type']} " if entry.get("key_type") else ""
    return f"{probe}: {key_type}serial {entry.get('serial', '?')}, {expiry}, {which}"


def _restart_state(status: dict, props: dict, now: float) -> str:
    """What the broker is about to do, and why it waits."""
    if status.get("restarting"):
        return "restarting Apache now"
    if not props.get("Pending", status.get("pending")):
        return "none pending"
    planned = int(props.get("PlannedAt", status.get("planned_at_usec", 0)) or 0)
    mds = [m.get("name", "?") for m in status.get("mds") or [] if m.get("pending")]
    text = f"pending for {', '.join(mds) or '?'}, {format_planned(planned, now)}"
    waiting = status.get("waiting_for", "")
    retry = status.get("retry")
    if waiting == "retry" and retry:
        first = mds[0] if mds else "NAME"
        return (f"{text}: HELD BACK after attempt {retry.get('attempts', '?')} "
                f"({one_line(str(retry.get('reason', '')))}); the broker retries on its own, backing off; "
                f"after fixing the cause, retry now with: apache-restart request {first}")
    if waiting == "min_interval":
        last = int(props.get("LastRestart", status.get("last_restart_usec", 0)) or 0)
        return (f"{text}: waiting for min_interval_seconds since the last restart "
                f"({format_usec(last)})")
    if waiting == "settle":
        return f"{text}: settle window (settle_seconds; ends early once mod_md is done)"
    return text


def _next_step(md: dict, status: dict, now: float) -> str:
    """What happens to an MD's staged set next, and what an admin can do about it."""
    name = md.get("name", "?")
    staged = md.get("staged")
    if staged is None and md.get("served_behind_failed"):
        return ("served behind the store, and a restart did not change that: not retried on its own "
                f"(is the probe address this Apache?); after fixing the cause: apache-restart request {name}")
    if staged is None and md.get("pending"):
        planned = int(status.get("planned_at_usec") or 0)
        return f"restart {format_planned(planned, now)}, so that this node serves the store's active certificate"
    if staged is None and md.get("served_behind"):
        return ("served behind the store (another node activated a renewal): the next check-all (the check "
                "timer) restarts this node; now: apache-restart check-all")
    if staged is None:
        return "nothing staged: nothing to do (mod_md stages a renewal before the certificate expires)"
    if not staged.get("valid"):
        return ("staged set refused, it will not be activated: " + one_line(str(staged.get("problem", "")))
                + f"; mod_md stages a new one at its next renewal, or fix it and run: apache-restart request {name}")
    if md.get("failed_before"):
        return ("a restart already failed to activate this set: not retried on its own; "
                f"after fixing the cause: apache-restart request {name}")
    if md.get("pending"):
        planned = int(status.get("planned_at_usec") or 0)
        retry = status.get("retry")
        if status.get("waiting_for") == "retry" and retry:
            return (f"held back (see restart: above); retried {format_planned(planned, now)}; "
                    f"retry now with: apache-restart request {name}")
        return f"restart {format_planned(planned, now)}, then the broker checks it is active and served"
    return (f"valid, but no restart pending (the hook's request did not arrive?): apache-restart request {name}"
            " (the daily check-all also schedules it)")


def render_status(status: dict, props: dict, now: float | None = None) -> str:
    """The terminal view of GetStatus (plus the properties, which say the same, live).

    Every text from the broker is escaped (broker.text.safe) before it is laid out: names,
    serials and problems can come from files www-data wrote, and a terminal obeys escape
    sequences.
    """
    now = time.time() if now is None else now
    status, props = _escaped(status), _escaped(props)
    version = props.get("Version", status.get("version", "?"))
    last = int(props.get("LastRestart", status.get("last_restart_usec", 0)) or 0)
    result = props.get("LastResult", status.get("last_result", ""))
    # The result's own time: a failed config test issues no restart, so LastRestart is older.
    result_at = int(status.get("last_result_usec", last) or 0)
    out = [f"apache-restart-broker {version}, store {status.get('md_store', '?')}",
           _line("restart:", _restart_state(status, props, now)),
           _line("last result:", f"{result} ({format_usec(result_at)})" if result else "none yet"),
           _line("last restart:", f"{format_usec(last)} (issued)" if last else "never")]
    left_out = status.get("unmanaged_not_listed") or 0
    if left_out:
        out.append(_line("not shown:", f"{left_out} more directories under staging/ that no managed MD "
                                       "owns (mod_md activates none of them; remove them)"))
    mds = status.get("mds") or []
    if not mds:
        out += ["", "no managed domains in the store"]
        return "\n".join(out)
    for md in mds:
        active, staged = md.get("active"), md.get("staged")
        names = (active or {}).get("names") or (staged or {}).get("names") or []
        out += ["", md.get("name", "?"), _line("  names:", ", ".join(names) or "-")]
        if md.get("active_problem"):
            out.append(_line("  active:", "UNREADABLE: " + one_line(str(md["active_problem"]))))
        elif not active:
            out.append(_line("  active:", "none yet (the first certificate is staged or on its way)"))
        else:
            for i, c in enumerate(active.get("certs") or []):
                out.append(_line("  active:" if i == 0 else "", _cert_line(c, now)))
        for i, entry in enumerate(md.get("served") or []):
            out.append(_line("  served:" if i == 0 else "", _served_line(entry, active, now)))
        if staged and staged.get("valid"):
            # Per key type, like the active set: serial and expiry of what the restart brings.
            out.append(_line("  staged:", f"valid, since {format_usec(int(staged.get('since_usec') or 0))}"))
            out += [_line("", _cert_line(c, now)) for c in staged.get("certs") or []]
        elif staged:
            out.append(_line("  staged:", "INVALID"))
        else:
            out.append(_line("  staged:", "none"))
        out.append(_line("  next:", _next_step(md, status, now)))
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    async def work(conn: Connection) -> tuple[dict, dict]:
        (text,) = await conn.call("GetStatus")
        props = await conn.properties()
        return json.loads(text), props

    try:
        status, props = call.run(work, args.bus_address, args.timeout, watch_unit=True)
    except Failure as f:
        return _fail(f, "status")
    except ValueError as e:
        print(f"{PROG}: status: the broker sent no valid JSON: {e}", file=sys.stderr)
        return EXIT_TEMPORARY
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render_status(status, props))
    return EXIT_OK


# -- request, check-all ----------------------------------------------------------------------


def cmd_request(args: argparse.Namespace) -> int:
    if args.dry_run:
        async def work(conn: Connection) -> int:
            (planned,) = await conn.call("DryRunRequest", "s", [args.name])
            return int(planned)

        try:
            planned = call.run(work, args.bus_address, args.timeout, watch_unit=True)
        except Failure as f:
            return _fail(f, f"request --dry-run {args.name}")
        print(f"{_show(args.name)}: dry run: the request would be taken, restart {format_planned(planned)}; "
              "nothing scheduled")
        return EXIT_OK
    try:
        planned = call.request_restart(args.name, args.bus_address, args.timeout, watch_unit=True)
    except Failure as f:
        return _fail(f, f"request {args.name}")
    print(f"{_show(args.name)}: restart planned {format_planned(planned)}")
    return EXIT_OK


def cmd_check_all(args: argparse.Namespace) -> int:
    async def work(conn: Connection) -> tuple[list[str], int]:
        scheduled, planned = await conn.call("CheckAll")
        return list(scheduled), int(planned)

    try:
        scheduled, planned = call.run(work, args.bus_address, args.timeout, watch_unit=True)
    except Failure as f:
        return _fail(f, "check-all")
    if scheduled:
        print(f"scheduled: {', '.join(_show(md) for md in scheduled)}")
    else:
        print("nothing new to schedule")
    if planned:
        print(f"restart planned {format_planned(planned)}")
    return EXIT_OK


# -- test ------------------------------------------------------------------------------------

# Exit status of `test` when a check failed (the others as for every command).
EXIT_CHECK_FAILED = 1
POLICY_FIX = ("the bus policy (/usr/share/dbus-1/system.d/org.masysma.ApacheRestart.conf) and the polkit "
              "rule (/usr/share/polkit-1/rules.d/49-apache-restart-broker.rules) must name {user}: "
              "./scripts/install --apache-user {user} writes both")
VENV_FIX = "the hook's interpreter and package must be readable by {user}: ./scripts/install makes them so"


def _program(name: str) -> str:
    """Where a program of ours is: in PATH (what MDMessageCmd names), else beside this one."""
    found = shutil.which(name)
    return found or str(Path(sys.executable).parent / name)


def _as_user(user: str, argv: list[str], timeout: float) -> tuple[int, str]:
    """Run argv as `user` via runuser, as mod_md runs the hook: (exit status, output)."""
    # A plain environment, like Apache's, not the admin's shell's.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    if os.environ.get("APACHE_RESTART_DBUS_LIB"):  # the library switch, so tests try both
        env["APACHE_RESTART_DBUS_LIB"] = os.environ["APACHE_RESTART_DBUS_LIB"]
    try:
        done = subprocess.run(["runuser", "-u", user, "--", *argv], cwd="/", stdin=subprocess.DEVNULL, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return 127, "runuser not found (Debian: util-linux)"
    except subprocess.TimeoutExpired:
        return 124, f"no answer within {timeout:g} s"
    return done.returncode, one_line((done.stdout + " " + done.stderr).strip())


def _hook_steps(user: str, hook: str, md: str, bus_address: str | None, timeout: float) -> list[dict]:
    """The steps only the admin command can take: the hook's path as the Apache user."""
    rc, out = _as_user(user, [hook, "--version"], timeout)
    steps = [{"step": f"hook as {user}", "ok": rc == 0 and out.startswith("apache-restart-hook "),
              "detail": f"{hook} runs ({out})" if rc == 0 else f"{hook} does not run as {user} (exit {rc}: {out})",
              "fix": "" if rc == 0 else VENV_FIX.format(user=user)}]
    # The admin program beside the hook (same interpreter) sends the hook's request as a dry run.
    admin_program = str(Path(hook).resolve().parent / PROG)
    argv = [admin_program, *(["--bus-address", bus_address] if bus_address else []),
            "--timeout", f"{min(timeout, 10.0):g}", "request", "--dry-run", md]
    rc, out = _as_user(user, argv, timeout + 5)
    step = f"bus policy and polkit for {user}"
    if rc == EXIT_OK:
        steps.append({"step": step, "ok": True, "detail": f"the hook's request for {md} would be taken", "fix": ""})
    elif rc == EXIT_REFUSED:
        # Authorization comes first in the broker: a refusal of the set means it let the caller through.
        refusal = out.split(": ", 2)[-1].replace(names.ERROR_PREFIX, "")
        steps.append({"step": step, "ok": True,
                      "detail": f"let through (the broker would refuse {md} now: {refusal})", "fix": ""})
    elif rc == EXIT_DENIED:
        # The bus daemon's refusal names its rules; the broker's names polkit. One line each.
        who = "the bus policy" if "Rejected send message" in out else "polkit (or the broker could not ask it)"
        steps.append({"step": step, "ok": False, "detail": f"refused by {who}",
                      "fix": POLICY_FIX.format(user=user)})
    elif rc == EXIT_TEMPORARY:
        steps.append({"step": step, "ok": False, "detail": f"no answer: {out}",
                      "fix": "see the broker's log; as root, 'apache-restart status' tells whether it runs"})
    else:
        steps.append({"step": step, "ok": False, "detail": f"{admin_program} failed as {user} (exit {rc}: {out})",
                      "fix": VENV_FIX.format(user=user)})
    return steps


def render_steps(steps: list[dict]) -> str:
    """One line per step (and its fix). The broker's steps quote the config test's output and
    what www-data staged: escaped like status."""
    lines = []
    for s in _escaped(steps):
        lines.append(f"{'ok  ' if s.get('ok') else 'FAIL'}  {s.get('step', '?')}: {one_line(str(s.get('detail', '')))}")
        if not s.get("ok") and s.get("fix"):
            lines.append(f"      fix: {one_line(str(s['fix']))}")
    failed = sum(1 for s in steps if not s.get("ok"))
    lines.append(f"{len(steps) - failed} of {len(steps)} checks passed" + ("" if not failed else
                 f"; {failed} failed: fix them and run 'apache-restart test' again"))
    return "\n".join(lines)


def cmd_test(args: argparse.Namespace) -> int:
    name = args.name or ""
    print(f"apache-restart test{' ' + _show(name) if name else ''}: the path a renewal takes, restarting nothing",
          flush=True)
    if os.geteuid() != 0:
        print(render_steps([{"step": "root", "ok": False, "detail": "not run as root",
                             "fix": "run it as root: it runs the hook as the Apache user"}]))
        return EXIT_DENIED

    async def work(conn: Connection) -> tuple[dict, dict, list[str]]:
        props = await conn.properties()
        (report,) = await conn.call("SelfTest", "s", [name])
        mds: list[str] = []
        if not name:
            (status,) = await conn.call("GetStatus")
            mds = [m.get("name", "") for m in json.loads(status).get("mds") or []]
        return props, json.loads(report), mds

    try:
        props, report, mds = call.run(work, args.bus_address, args.timeout, watch_unit=True)
    except Failure as f:
        return _fail(f, "test")
    except ValueError as e:
        print(f"{PROG}: test: the broker sent no valid JSON: {e}", file=sys.stderr)
        return EXIT_TEMPORARY
    steps = [{"step": "root", "ok": True, "detail": "running as root", "fix": ""},
             {"step": "broker", "ok": True, "fix": "",
              "detail": f"apache-restart-broker {props.get('Version', '?')} answers on "
                        f"{call.bus_description(args.bus_address)}"}]
    # Any valid name proves the bus policy and polkit: the broker authorizes before it looks.
    probe_md = name or (mds[0] if mds else "self-test.invalid")
    steps += _hook_steps(args.apache_user, args.hook or _program("apache-restart-hook"), probe_md,
                         args.bus_address, args.timeout)
    steps += [s for s in report.get("steps") or [] if isinstance(s, dict)]
    print(render_steps(steps))
    return EXIT_OK if all(s.get("ok") for s in steps) else EXIT_CHECK_FAILED


# -- check (monitoring plugin) ---------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    for opt in ("warning", "critical", "pending_hours"):
        value = getattr(args, opt)
        if not 0 <= value <= 3650 * 24:
            print(monitor.unknown(f"--{opt.replace('_', '-')} must be between 0 and 87600").line())
            return monitor.UNKNOWN

    async def work(conn: Connection) -> dict:
        (text,) = await conn.call("GetStatus")
        return json.loads(text)

    try:
        status = call.run(work, args.bus_address, args.timeout)
        verdict = monitor.evaluate(status, time.time(), args.warning, args.critical, args.pending_hours) \
            if isinstance(status, dict) else monitor.unknown("the broker's status is not a JSON object")
    except Failure as f:
        verdict = monitor.unknown(f"cannot ask the broker: {one_line(f.describe())}")
    except ValueError as e:
        verdict = monitor.unknown(f"the broker sent no valid JSON: {e}")
    print(verdict.line())
    return verdict.state


# -- watch -----------------------------------------------------------------------------------


def describe_signal(msg: Any) -> str | None:
    """One line for a broker signal worth showing, or None (also for a malformed one)."""
    if msg.member == "RestartFinished" and msg.interface == names.INTERFACE and msg.signature == "bsas":
        ok, detail, mds = msg.body
        return (f"restart {'ok' if ok else 'FAILED'} for {', '.join(_show(md) for md in mds) or '(no MD)'}: "
                f"{_show(one_line(detail), 1000)}")
    if (msg.member == "PropertiesChanged" and msg.interface == "org.freedesktop.DBus.Properties"
            and msg.signature == "sa{sv}as" and msg.body[0] == names.INTERFACE):
        _iface, changed, _invalidated = msg.body
        values = {k: v.value for k, v in changed.items()}
        planned = values.get("PlannedAt")
        if values.get("Pending") is True or planned:
            when = (f", planned at the latest at {format_usec(planned)}"
                    if isinstance(planned, int) and planned else "")
            return "restart pending" + when
    return None


class BrokerOwner:
    """Which connection owns the broker's name now: only its signals are the broker's.

    Anybody on the bus can send a signal with the broker's path and interface, even straight to
    this connection; the bus daemon stamps the true sender's unique name on every message, so a
    signal counts only when that is the current owner of the broker's name (followed through
    NameOwnerChanged, which only the bus daemon itself sends).
    """

    def __init__(self, unique_name: str | None = None):
        self.unique_name = unique_name

    def follow(self, msg: Message) -> bool:
        """Take note of a NameOwnerChanged for the broker's name; True when `msg` was one."""
        if (msg.message_type == MessageType.SIGNAL and msg.sender == names.DBUS_BUS_NAME
                and msg.member == "NameOwnerChanged" and msg.signature == "sss"
                and msg.body[0] == names.BUS_NAME):
            self.unique_name = msg.body[2] or None
            return True
        return False

    def sent(self, msg: Message) -> bool:
        return self.unique_name is not None and msg.sender == self.unique_name


async def _name_owner(conn: Connection) -> str | None:
    msg = Message(destination=names.DBUS_BUS_NAME, path=names.DBUS_PATH, interface=names.DBUS_INTERFACE,
                  member="GetNameOwner", signature="s", body=[names.BUS_NAME])
    reply = await asyncio.wait_for(conn.bus.call(msg), 10)
    if reply.message_type == MessageType.ERROR:
        return None  # not running now; NameOwnerChanged says when it is
    return str(reply.body[0])


async def _watch(bus_address: str | None) -> int:
    conn = await Connection.open(bus_address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    owner = BrokerOwner()

    def on_message(msg: Message) -> bool:
        if owner.follow(msg):
            return False
        if msg.message_type == MessageType.SIGNAL and msg.path == names.OBJECT_PATH and owner.sent(msg):
            line = describe_signal(msg)
            if line:
                print(f"{format_usec(int(time.time() * 1e6))}  {line}", flush=True)
        return False

    conn.bus.add_message_handler(on_message)
    try:
        # Subscribed before the owner is asked, so that no change of owner falls in between.
        await conn.add_match(f"type='signal',sender='{names.DBUS_BUS_NAME}',interface='{names.DBUS_INTERFACE}',"
                             f"member='NameOwnerChanged',arg0='{names.BUS_NAME}'", timeout=10)
        await conn.add_match(f"type='signal',sender='{names.BUS_NAME}',path='{names.OBJECT_PATH}'",
                             timeout=10)
        current = await _name_owner(conn)
        if owner.unique_name is None:
            owner.unique_name = current
        print(f"watching {names.BUS_NAME} on {call.bus_description(bus_address)} (Ctrl-C ends)",
              flush=True)
        lost = asyncio.ensure_future(conn.bus.wait_for_disconnect())
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({lost, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for t in (lost, stopping):
            t.cancel()
        if lost in done:
            print(f"{PROG}: watch: lost the bus connection", file=sys.stderr)
            return EXIT_TEMPORARY
        return EXIT_OK
    finally:
        conn.close()


def cmd_watch(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_watch(args.bus_address))
    except Failure as f:
        return _fail(f, "watch")


# -- main ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Ask apache-restart-broker about mod_md's certificates and restarts.",
        epilog="exit status: 0 done, 1 refused by the broker, 2 usage, "
               "3 try again later (unreachable, no answer, busy), 4 access denied")
    p.add_argument("--bus-address", help="bus to use (default: the system bus)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the broker (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("status", help="every MD: active and staged certificate, pending restart (root)")
    s.add_argument("--json", action="store_true", help="the broker's GetStatus JSON, for scripts")
    s.set_defaults(func=cmd_status)
    r = sub.add_parser("request", help="ask for a graceful restart for NAME, as the hook does")
    r.add_argument("--dry-run", action="store_true",
                   help="only check that the request would be taken (authorization, staged set); "
                        "schedule nothing")
    r.add_argument("name", metavar="NAME", help="the MD name (first name of its MDomain line)")
    r.set_defaults(func=cmd_request)
    t = sub.add_parser("test", help="check the whole path a renewal takes, restarting nothing (root)")
    t.add_argument("--apache-user", default="www-data",
                   help="the user mod_md runs the hook as (default www-data)")
    t.add_argument("--hook", metavar="PATH",
                   help="the program MDMessageCmd names (default: apache-restart-hook in PATH)")
    t.add_argument("name", metavar="NAME", nargs="?", help="the MD to check (default: every MD)")
    t.set_defaults(func=cmd_test)
    c = sub.add_parser("check-all", help="schedule a restart for every valid staged set (root)")
    c.set_defaults(func=cmd_check_all)
    w = sub.add_parser("watch", help="print restarts as the broker announces them")
    w.set_defaults(func=cmd_watch)
    k = sub.add_parser("check", help="monitoring plugin: one line with perfdata, exit 0 OK, 1 WARNING, "
                                     "2 CRITICAL, 3 UNKNOWN (root or the monitoring group)")
    k.add_argument("--warning", type=float, metavar="DAYS", default=monitor.DEFAULT_WARNING_DAYS,
                   help=f"WARNING when a certificate expires within DAYS (default {monitor.DEFAULT_WARNING_DAYS:g})")
    k.add_argument("--critical", type=float, metavar="DAYS", default=monitor.DEFAULT_CRITICAL_DAYS,
                   help=f"CRITICAL when it expires within DAYS (default {monitor.DEFAULT_CRITICAL_DAYS:g})")
    k.add_argument("--pending-hours", type=float, metavar="H", default=monitor.DEFAULT_PENDING_HOURS,
                   help="WARNING when a valid set waits in staging longer than H hours "
                        f"(default {monitor.DEFAULT_PENDING_HOURS:g})")
    # A monitoring system reads exit 2 as CRITICAL: a bad option is UNKNOWN (3) here.

    def check_usage_error(message: str) -> NoReturn:
        _check_usage(k, message)

    k.error = check_usage_error  # type: ignore[method-assign]
    k.set_defaults(func=cmd_check)
    return p


def _check_usage(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    print(monitor.unknown(f"usage: {message}").line())
    sys.exit(monitor.UNKNOWN)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.timeout > 0:
        print(f"{PROG}: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `apache-restart status | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
