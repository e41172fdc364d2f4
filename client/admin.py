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
import os
import signal
import sys
import time
from typing import Any

from broker import __version__, names
from broker.dbuslib import Message, MessageType

from . import call
from .call import Connection, Failure, format_planned, format_usec, one_line

PROG = "apache-restart"
DEFAULT_TIMEOUT = 30.0

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPORARY = 3
EXIT_DENIED = 4


# Commands the broker answers only for root, and the method behind each.
ROOT_ONLY = {"status": "GetStatus", "check-all": "CheckAll", "test": "SelfTest"}
CANNOT_START_HINT = ("check the configuration with 'apache-restart-broker --check-config' and the "
                     f"broker's log with 'journalctl -u {names.BROKER_UNIT}'")


def _fail(f: Failure, what: str) -> int:
    """Say why `what` failed, on stderr, and return the exit status for it."""
    command = what.split()[0]
    if f.kind == call.DENIED and command in ROOT_ONLY and os.geteuid() != 0:
        # One sentence instead of the bus daemon's rule dump: the cause is always the same.
        print(f"{PROG}: {what}: run as root (the broker answers {ROOT_ONLY[command]} only for root)",
              file=sys.stderr)
        return EXIT_DENIED
    if isinstance(f, call.CannotStart) or call.activation_failed(f.error_name):
        print(f"{PROG}: {what}: the broker cannot start: {f.describe()}; {CANNOT_START_HINT}",
              file=sys.stderr)
        return EXIT_TEMPORARY
    if f.kind == call.DENIED:
        hint = " (status and check-all need root; request needs the polkit action " \
               f"{names.POLKIT_ACTION})"
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

DAY = 86400.0
LABEL = 14  # width of the labels ("last restart:") so that values line up


def _line(label: str, value: str) -> str:
    return f"{label:<{LABEL}}{value}".rstrip()


def _days_left(not_after_usec: int, now: float) -> str:
    days = (not_after_usec / 1e6 - now) / DAY
    if days < 0:
        return "EXPIRED"
    return f"{int(days)} days left" if days >= 1 else "less than a day left"


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
    return (f"{probe}: serial {entry.get('serial', '?')}, {which}, "
            f"{_days_left(not_after, now) if not_after else 'expiry unknown'}")


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
            return (f"held back ({one_line(str(retry.get('reason', '')))}); retried {format_planned(planned, now)}; "
                    f"retry now with: apache-restart request {name}")
        return f"restart {format_planned(planned, now)}, then the broker checks it is active and served"
    return (f"valid, but no restart pending (the hook's request did not arrive?): apache-restart request {name}"
            " (the daily check-all also schedules it)")


def render_status(status: dict, props: dict, now: float | None = None) -> str:
    """The terminal view of GetStatus (plus the properties, which say the same, live)."""
    now = time.time() if now is None else now
    version = props.get("Version", status.get("version", "?"))
    last = int(props.get("LastRestart", status.get("last_restart_usec", 0)) or 0)
    result = props.get("LastResult", status.get("last_result", ""))
    # The result's own time: a failed config test issues no restart, so LastRestart is older.
    result_at = int(status.get("last_result_usec", last) or 0)
    out = [f"apache-restart-broker {version}, store {status.get('md_store', '?')}",
           _line("restart:", _restart_state(status, props, now)),
           _line("last result:", f"{result} ({format_usec(result_at)})" if result else "none yet"),
           _line("last restart:", f"{format_usec(last)} (issued)" if last else "never")]
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
            certs = ", ".join(f"{c.get('key_type', '?')} serial {c.get('serial', '?')}"
                              for c in staged.get("certs") or [])
            out.append(_line("  staged:", f"valid, since {format_usec(int(staged.get('since_usec') or 0))}: {certs}"))
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
    try:
        planned = call.request_restart(args.name, args.bus_address, args.timeout, watch_unit=True)
    except Failure as f:
        return _fail(f, f"request {args.name}")
    print(f"{args.name}: restart planned {format_planned(planned)}")
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
        print(f"scheduled: {', '.join(scheduled)}")
    else:
        print("nothing new to schedule")
    if planned:
        print(f"restart planned {format_planned(planned)}")
    return EXIT_OK


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
            return "restart pending" + (f", planned at the latest at {format_usec(planned)}" if planned else "")
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
