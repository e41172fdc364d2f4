"""apache-restart: the admin command. It talks only to the broker (no config file, no store).

    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] status [--json]
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] request NAME
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] check-all
    apache-restart [--bus-address ADDRESS] watch
    apache-restart [--bus-address ADDRESS] [--timeout SECONDS] check [--warning DAYS]
                   [--critical DAYS] [--pending-hours H]   (monitoring plugin: exits 0-3)

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

from . import call, monitor
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
        hint = " (status needs root or the monitoring group, check-all needs root; request needs " \
               f"the polkit action {names.POLKIT_ACTION})"
        print(f"{PROG}: {what}: access denied: {f.describe()}{hint}", file=sys.stderr)
        return EXIT_DENIED
    if f.kind == call.UNREACHABLE:
        print(f"{PROG}: {what}: the broker is not reachable: {f.describe()}", file=sys.stderr)
        return EXIT_TEMPORARY
    if f.retryable:
        print(f"{PROG}: {what}: {f.describe()}; try again later", file=sys.stderr)
        return EXIT_TEMPORARY
    name = f.error_name or "error"
    print(f"{PROG}: {what}: {name}: {one_line(f.message)}", file=sys.stderr)
    return EXIT_REFUSED


# -- status ----------------------------------------------------------------------------------


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _short(usec: int) -> str:
    """A time in a table cell: minutes are enough there, UTC is said once above the table."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(usec / 1e6)) if usec else "-"


def _certs_by_key(s: dict | None) -> dict[str, dict]:
    if not s:
        return {}
    return {c.get("key_type", "?"): c for c in s.get("certs") or []}


def render_status(status: dict, props: dict) -> str:
    """The terminal view of GetStatus (plus the properties, which say the same, live)."""
    out: list[str] = []
    version = props.get("Version", status.get("version", "?"))
    pending = props.get("Pending", status.get("pending"))
    planned = props.get("PlannedAt", status.get("planned_at_usec", 0))
    last = props.get("LastRestart", status.get("last_restart_usec", 0))
    result = props.get("LastResult", status.get("last_result", ""))
    state = f"restart pending, planned at {format_planned(planned)}" if pending else "no restart pending"
    if status.get("restarting"):
        state = "restarting Apache now"
    out.append(f"broker {version}, store {status.get('md_store', '?')}: {state}")
    out.append(f"last restart: {format_usec(last)}" + (f", result: {result}" if result else ""))
    out.append("")
    mds = status.get("mds") or []
    if not mds:
        out.append("no managed domains in the store")
        return "\n".join(out)
    rows = [["MD", "KEY", "ACTIVE SERIAL", "NOT AFTER", "STAGED", "STAGED SERIAL", "PENDING",
             "FAILED BEFORE"]]
    problems: list[str] = []
    for md in mds:
        name = md.get("name", "?")
        active, staged = md.get("active"), md.get("staged")
        active_certs = _certs_by_key(active)
        staged_certs = _certs_by_key(staged if staged and staged.get("valid") else None)
        if staged is None:
            staged_text = "no"
        elif staged.get("valid"):
            staged_text = f"valid since {_short(staged.get('since_usec', 0))}"
        else:
            staged_text = "INVALID"
            problems.append(f"{name}: staged set: {one_line(staged.get('problem', ''))}")
        if md.get("active_problem"):
            problems.append(f"{name}: active set: {one_line(md['active_problem'])}")
        pending_text = (f"yes, {_short(planned)}" if planned else "yes") if md.get("pending") else "no"
        keys = list(active_certs) + [k for k in staged_certs if k not in active_certs] or ["-"]
        for i, key in enumerate(keys):
            a, s = active_certs.get(key), staged_certs.get(key)
            first = i == 0
            rows.append([
                name if first else "",
                key,
                a.get("serial", "?") if a else "-",
                _short(a.get("not_after_usec", 0)) if a else "-",
                staged_text if first else "",
                s.get("serial", "?") if s else "-",
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
    print(f"{args.name}: restart planned at {format_planned(planned)}")
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
        print(f"scheduled: {', '.join(scheduled)}")
    else:
        print("nothing new to schedule")
    if planned:
        print(f"restart planned at {format_planned(planned)}")
    return EXIT_OK


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
    """One line for a broker signal worth showing, or None."""
    if msg.member == "RestartFinished":
        ok, detail, mds = msg.body
        return f"restart {'ok' if ok else 'FAILED'} for {', '.join(mds) or '(no MD)'}: {one_line(detail)}"
    if msg.member == "PropertiesChanged":
        _iface, changed, _invalidated = msg.body
        values = {k: v.value for k, v in changed.items()}
        if values.get("Pending") is True or values.get("PlannedAt"):
            planned = values.get("PlannedAt")
            return "restart pending" + (f", planned at {format_usec(planned)}" if planned else "")
    return None


async def _watch(bus_address: str | None) -> int:
    conn = await Connection.open(bus_address)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_message(msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.path == names.OBJECT_PATH:
            line = describe_signal(msg)
            if line:
                print(f"{format_usec(int(time.time() * 1e6))}  {line}", flush=True)
        return False

    conn.bus.add_message_handler(on_message)
    try:
        await conn.add_match(f"type='signal',sender='{names.BUS_NAME}',path='{names.OBJECT_PATH}'",
                             timeout=10)
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
    k.error = lambda message: _check_usage(k, message)  # type: ignore[method-assign]
    k.set_defaults(func=cmd_check)
    return p


def _check_usage(parser: argparse.ArgumentParser, message: str) -> None:
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
