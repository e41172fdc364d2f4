"""apache-restart: the admin command. It talks only to the broker (no config file, no store).

    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] status [--json]
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] request NAME
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] check-all
    apache-restart [--bus-address ADDRESS] watch

Exit status:
    0  done
    1  the broker refused (InvalidName, NothingStaged, StagingInvalid, AlreadyFailed, ...)
    2  usage error
    3  try again later: the broker is not reachable, did not answer, is busy or failed
    4  access denied (status and check-all need root; request needs the polkit action)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from broker import __version__, names
from broker.dbuslib import Message, MessageType
from broker.text import safe

from . import call
from .call import Connection, Failure, format_planned, format_usec, one_line

PROG = "apache-restart"
DEFAULT_TIMEOUT = 30.0

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPORARY = 3
EXIT_DENIED = 4


def _fail(f: Failure, what: str) -> int:
    """Say why `what` failed, on stderr, and return the exit status for it."""
    if f.kind == call.DENIED:
        hint = " (status and check-all need root; request needs the polkit action " \
               f"{names.POLKIT_ACTION})"
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


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _short(usec: int) -> str:
    """A time in a table cell: minutes are enough there, UTC is said once above the table."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(usec / 1e6)) if usec else "-"
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _certs_by_key(s: dict | None) -> dict[str, dict]:
    if not s:
        return {}
    return {c.get("key_type", "?"): c for c in s.get("certs") or []}


def _show(value: Any, limit: int = 300) -> str:
    """A value from the broker, fit for root's terminal: it may quote what www-data wrote."""
    return safe(value if isinstance(value, str) else str(value), limit)


def render_status(status: dict, props: dict) -> str:
    """The terminal view of GetStatus (plus the properties, which say the same, live).

    Every text from the broker is escaped (broker.text.safe): names, serials and problems can
    come from files www-data wrote, and a terminal obeys escape sequences.
    """
    out: list[str] = []
    version = props.get("Version", status.get("version", "?"))
    pending = props.get("Pending", status.get("pending"))
    planned = props.get("PlannedAt", status.get("planned_at_usec", 0))
    last = props.get("LastRestart", status.get("last_restart_usec", 0))
    result = props.get("LastResult", status.get("last_result", ""))
    state = f"restart pending, planned at {format_planned(planned)}" if pending else "no restart pending"
    if status.get("restarting"):
        state = "restarting Apache now"
    out.append(f"broker {_show(version)}, store {_show(status.get('md_store', '?'))}: {state}")
    out.append(f"last restart: {format_usec(last)}" + (f", result: {_show(result)}" if result else ""))
    out.append("")
    mds = status.get("mds") or []
    if not mds:
        out.append("no managed domains in the store")
        return "\n".join(out)
    rows = [["MD", "KEY", "ACTIVE SERIAL", "NOT AFTER", "STAGED", "STAGED SERIAL", "PENDING",
             "FAILED BEFORE"]]
    problems: list[str] = []
    for md in mds:
        name = _show(md.get("name", "?"))
        active, staged = md.get("active"), md.get("staged")
        active_certs = _certs_by_key(active)
        staged_certs = _certs_by_key(staged if staged and staged.get("valid") else None)
        if staged is None:
            staged_text = "no"
        elif staged.get("valid"):
            staged_text = f"valid since {_short(staged.get('since_usec', 0))}"
        else:
            staged_text = "INVALID"
            problems.append(f"{name}: staged set: {_show(one_line(str(staged.get('problem', ''))))}")
        if md.get("active_problem"):
            problems.append(f"{name}: active set: {_show(one_line(str(md['active_problem'])))}")
        pending_text = (f"yes, {_short(planned)}" if planned else "yes") if md.get("pending") else "no"
        keys = list(active_certs) + [k for k in staged_certs if k not in active_certs] or ["-"]
        for i, key in enumerate(keys):
            a, s = active_certs.get(key), staged_certs.get(key)
            first = i == 0
            rows.append([
                name if first else "",
                _show(key),
                _show(a.get("serial", "?")) if a else "-",
                _short(a.get("not_after_usec", 0)) if a else "-",
                staged_text if first else "",
                _show(s.get("serial", "?")) if s else "-",
                pending_text if first else "",
                ("yes" if md.get("failed_before") else "no") if first else "",
            ])
    out.extend(_table(rows))
    out.append("(times in UTC)")
    if problems:
        out.append("")
        out.append("problems:")
        out.extend(f"  {p}" for p in problems)
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    async def work(conn: Connection) -> tuple[dict, dict]:
        (text,) = await conn.call("GetStatus")
        props = await conn.properties()
        return json.loads(text), props

    try:
        status, props = call.run(work, args.bus_address, args.timeout)
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
    try:
        planned = call.request_restart(args.name, args.bus_address, args.timeout)
    except Failure as f:
        return _fail(f, f"request {args.name}")
    print(f"{_show(args.name)}: restart planned at {format_planned(planned)}")
    return EXIT_OK


def cmd_check_all(args: argparse.Namespace) -> int:
    async def work(conn: Connection) -> tuple[list[str], int]:
        scheduled, planned = await conn.call("CheckAll")
        return list(scheduled), int(planned)

    try:
        scheduled, planned = call.run(work, args.bus_address, args.timeout)
    except Failure as f:
        return _fail(f, "check-all")
    if scheduled:
        print(f"scheduled: {', '.join(_show(md) for md in scheduled)}")
    else:
        print("nothing new to schedule")
    if planned:
        print(f"restart planned at {format_planned(planned)}")
    return EXIT_OK


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
            when = f", planned at {format_usec(planned)}" if isinstance(planned, int) and planned else ""
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
    r.add_argument("name", metavar="NAME", help="the MD name (first name of its MDomain line)")
    r.set_defaults(func=cmd_request)
    c = sub.add_parser("check-all", help="schedule a restart for every valid staged set (root)")
    c.set_defaults(func=cmd_check_all)
    w = sub.add_parser("watch", help="print restarts as the broker announces them")
    w.set_defaults(func=cmd_watch)
    return p


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
