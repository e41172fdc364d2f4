"""apache-restart-hook: the program mod_md runs as its MDMessageCmd.

    MDMessageCmd /usr/local/bin/apache-restart-hook [--bus-address ADDRESS] [--timeout SECONDS]
                 [--then-timeout SECONDS] [--then PROGRAM [ARGS...] --]

mod_md appends REASON and the MD name (and future versions may append more). What the hook
does per reason, and why, is in REASONS and EXITS below and in the README; in short: `renewed` asks the
broker for a graceful restart, every other reason is logged; then the admin's own command
runs, if one is chained with --then.

Every line goes to stderr (mod_md logs it) and, with a priority, to syslog (client.hooklog).
This module imports nothing of D-Bus or the broker until it knows the reason is `renewed`,
and nothing for --then until there is one: it runs on the path of every renewal.
"""

import sys

from client.hooklog import ERR, INFO, NOTICE, PROG, SOCKET_ENV, WARNING, printable, say, shown_name

DEFAULT_TIMEOUT = 10.0      # the contract: no answer within 10 s counts as "try again later"
MAX_TIMEOUT = 10.0
THEN_TIMEOUT = 60.0         # the chained command's default limit
MAX_THEN_TIMEOUT = 3600.0
# `installed` runs as root inside Apache's restart, which waits for it: a chained command gets
# at most this long there, whatever --then-timeout says.
THEN_TIMEOUT_INSTALLED = 5.0

EXIT_DELIVERED = 0          # mod_md: delivered (also: refused for good, or nothing to do)
EXIT_USAGE = 2              # the MDMessageCmd line is wrong (only for `renewed`)
EXIT_RETRY = 75             # EX_TEMPFAIL: not taken, a later try can cure it

USAGE = (f"usage: {PROG} [--bus-address ADDRESS] [--timeout SECONDS] [--then-timeout SECONDS] "
         "[--then PROGRAM [ARGS...] --] REASON NAME [...]")

# --help and the manual page are both made from the tables below (deploy/manpages.py).
INTRO = """The command mod_md runs for every event of a Managed Domain (MD), as its one MDMessageCmd:

    MDMessageCmd /usr/local/bin/apache-restart-hook

mod_md appends REASON and the MD's NAME (and future versions may append more arguments).
It runs as Apache's user (www-data), except for `installed` (root, inside Apache's restart).
"""

SYSLOG = (f"Each line also goes to syslog, identifier {PROG}, facility daemon, with the priority "
          "in brackets. Only `renewed` loads a D-Bus library or connects to a bus.")

REASONS = (
    ("renewed", "a new certificate set is staged: asks apache-restart-broker on the system bus "
                "(RequestGracefulRestart NAME) to restart Apache gracefully, so that the set is "
                "activated and verified; at most --timeout seconds (default and maximum 10). "
                "[info when planned, warning when retried, err when refused]"),
    ("renewing", "a renewal starts: logged. [info]"),
    ("challenge-setup:TYPE:DNS", "a challenge is being set up: logged. [info]"),
    ("installed", "Apache's restart activated the set (run as root): logged. [info]"),
    ("expiring", "the certificate expires soon and was not renewed yet: logged. [warning]"),
    ("errored", "a renewal failed (mod_md retries it): logged. [err]"),
    ("ocsp-renewed", "an OCSP response was renewed: logged. [info]"),
    ("ocsp-errored", "an OCSP response could not be renewed: logged. [warning]"),
    ("anything else", "(a newer mod_md): logged, ignored. [notice]"),
)

EXITS = (
    ("renewed", "0 when the broker took the request, or refused it for a reason no retry can cure "
                "(NothingStaged, StagingInvalid, InvalidName, AlreadyFailed); 75 (EX_TEMPFAIL) when "
                "a later try can succeed (broker not reachable, no answer in time, RateLimited, "
                "AccessDenied, Internal): mod_md calls again later; 2 for a broken command line "
                "(mod_md keeps logging it)."),
    ("every other", "0. A non-zero exit on `renewing` or `challenge-setup:*` would make mod_md abort "
                    "the renewal, so the hook never does that on its own."),
    ("with --then", "for `renewing` and `challenge-setup:*` a failing PROGRAM vetoes (its exit status, "
                    "1 when it has none); for `renewed` the hook exits 75 (retry) when PROGRAM or the "
                    "hook's own work failed, so a retry runs both again; every other reason exits 0."),
)

OPTIONS = (
    ("--bus-address ADDRESS", "the bus to call instead of the system bus (DBUS_SYSTEM_BUS_ADDRESS "
                              "is honoured too)"),
    ("--timeout SECONDS", "limit for `renewed` (more than 0, at most 10; default 10)"),
    ("--then PROGRAM [ARGS...] --", "afterwards run PROGRAM (an absolute path; no shell) with ARGS, "
                                    "then REASON NAME and whatever else mod_md passed; the `--` ends "
                                    "ARGS and must be there (so no ARG can be `--`); --then comes "
                                    "last. Its stdin is /dev/null, its output is copied to mod_md's "
                                    "log. Its exit status joins the hook's (see the exit status)."),
    ("--then-timeout SECONDS", "PROGRAM's limit (default 60, at most 3600; for `installed`, which "
                               "Apache waits for, at most 5): then its whole process group is "
                               "killed and it counts as failed."),
    ("-h, --help", "this text"),
    ("--version", "the program's name and version"),
)

TESTING = f"For testing only: {SOCKET_ENV} names the syslog socket (default /dev/log)."


def help_text() -> str:
    import textwrap  # only for --help: the hook's start is on the path of every renewal

    def table(rows: tuple[tuple[str, str], ...], column: int) -> str:
        out = []
        for tag, text in rows:
            lines = textwrap.wrap(text, 96 - column)
            if len(tag) + 4 > column:  # a long tag takes a line of its own
                out.append(f"  {tag}")
            else:
                out.append(f"  {tag:<{column - 2}}{lines.pop(0)}")
            out += [" " * column + line for line in lines]
        return "\n".join(out)

    return "\n\n".join([
        USAGE, INTRO.rstrip("\n"),
        "What the hook does, per REASON:\n\n" + table(REASONS, 19),
        textwrap.fill(SYSLOG, 96),
        "Exit status (mod_md acts on it):\n\n" + table(EXITS, 19),
        "Options (before REASON):\n\n" + table(OPTIONS, 26),
        TESTING,
    ]) + "\n"


# What the hook says, and at which syslog priority, for the reasons it only logs.
_LOGGED = {
    "renewing": (INFO, "renewal starting; nothing to do"),
    "expiring": (WARNING, "certificate expires soon (mod_md renews it); nothing to do"),
    "errored": (ERR, "mod_md reports a renewal error (see its log); nothing to do"),
    "ocsp-renewed": (INFO, "OCSP response renewed; nothing to do"),
    "ocsp-errored": (WARNING, "OCSP renewal failed (see mod_md's log); nothing to do"),
    "installed": (INFO, "new certificate activated by Apache's restart; nothing to do"),
}


class UsageError(Exception):
    pass


def vetoes(reason: str) -> bool:
    """A non-zero exit for this reason makes mod_md abort the renewal."""
    return reason == "renewing" or reason.startswith("challenge-setup:")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    """Options first (what the MDMessageCmd line holds), then REASON NAME [more...]."""
    opts: dict = {"bus_address": None, "timeout": DEFAULT_TIMEOUT, "then": None,
                  "then_timeout": THEN_TIMEOUT, "help": False}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if arg in ("-h", "--help"):
            opts["help"] = True
            continue
        if arg == "--then":
            try:
                end = argv.index("--", i)
            except ValueError:
                raise UsageError("--then PROGRAM [ARGS...] must end with --") from None
            then = argv[i:end]
            if not then or not then[0].startswith("/"):
                raise UsageError("--then needs a PROGRAM with an absolute path")
            opts["then"] = then
            i = end + 1
            break  # `--` ended the options too
        key, eq, value = arg.partition("=")
        if key not in ("--bus-address", "--timeout", "--then-timeout"):
            raise UsageError(f"unknown option {key}")
        if not eq:
            if i >= len(argv):
                raise UsageError(f"{key} needs a value")
            value = argv[i]
            i += 1
        if key == "--bus-address":
            if not value:
                raise UsageError("--bus-address needs a value")
            opts["bus_address"] = value
        else:
            limit = MAX_TIMEOUT if key == "--timeout" else MAX_THEN_TIMEOUT
            try:
                seconds = float(value)
            except ValueError:
                raise UsageError(f"{key} {value!r} is not a number") from None
            if not 0 < seconds <= limit:
                raise UsageError(f"{key} must be more than 0 and at most {limit:g} seconds")
            opts["timeout" if key == "--timeout" else "then_timeout"] = seconds
    rest = argv[i:]
    if not rest and not opts["help"]:
        raise UsageError("no REASON given")
    return opts, rest


def renewed(md: str, bus_address: str | None, timeout: float) -> int:
    # Only here the D-Bus library is loaded.
    from client import call

    name = shown_name(md)
    try:
        planned = call.request_restart(md, bus_address, timeout)
    except call.Failure as f:
        return _failed(name, f)
    except Exception as e:  # a bug must not read as "delivered" nor print a traceback
        say(f"renewed {name}: internal error in the hook ({type(e).__name__}: {e}); mod_md will retry", ERR)
        return EXIT_RETRY
    # The settle window ends early once mod_md is done: the time is the latest, not the likely.
    say(f"renewed {name}: restart planned at the latest at {call.format_usec(planned)}", INFO)
    return EXIT_DELIVERED


def _failed(name: str, f) -> int:  # f: client.call.Failure (not imported on the fast path)
    from client import call

    if f.retryable:
        what = {
            call.UNREACHABLE: "broker not reachable",
            call.TIMEOUT: "broker did not answer",
            call.BUSY: "broker busy",
            call.DENIED: "access denied (check the polkit rule and bus policy for this user)",
            call.INTERNAL: "broker failed (see its log)",
        }[f.kind]
        say(f"renewed {name}: {what} ({f.describe()}); mod_md will retry", WARNING)
        return EXIT_RETRY
    say(f"renewed {name}: refused by the broker ({f.describe()}); not retried, see 'apache-restart status'",
        ERR)
    return EXIT_DELIVERED


def own_work(reason: str, md: str | None, opts: dict) -> int:
    """What the hook itself does for `reason`; its exit status."""
    if reason == "renewed":
        if not md:
            say(f"renewed: no MD name given; {USAGE}", ERR)
            return EXIT_USAGE
        return renewed(md, opts["bus_address"], opts["timeout"])
    name = shown_name(md)
    if reason in _LOGGED:
        priority, text = _LOGGED[reason]
        say(f"{reason} {name}: {text}", priority)
    elif reason.startswith("challenge-setup:"):
        say(f"{shown_reason(reason)} {name}: challenge being set up; nothing to do", INFO)
    else:
        say(f"{shown_reason(reason)} {name}: reason not known to this hook; ignored", NOTICE)
    return EXIT_DELIVERED


def shown_reason(reason: str) -> str:
    # challenge-setup:<type>:<dns name> carries a name too, and unknown reasons are anything.
    return printable(reason, 300)


def then(reason: str, rest: list[str], opts: dict, own: int) -> int:
    """Run the chained command with mod_md's arguments; the exit status of both together."""
    from client import chain

    timeout = opts["then_timeout"]
    if reason == "installed":
        timeout = min(timeout, THEN_TIMEOUT_INSTALLED)
    program = opts["then"][0]
    outcome = chain.run(opts["then"] + rest, timeout, lambda line: say(f"{program}: {line}"))
    md = rest[1] if len(rest) > 1 else None
    head = f"{shown_reason(reason)} {shown_name(md)}: then {program}"
    if reason == "renewed":
        if outcome.ok:
            say(f"{head}: {outcome.detail}", INFO)
            return own
        say(f"{head}: {outcome.detail}; mod_md will retry (and run both again)", WARNING)
        return EXIT_RETRY
    if vetoes(reason) and not outcome.ok:
        say(f"{head}: {outcome.detail}; mod_md aborts this renewal", WARNING)
        return outcome.exit_code if 1 <= outcome.exit_code <= 125 else 1
    say(f"{head}: {outcome.detail}", INFO if outcome.ok else WARNING)
    return own


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from broker import __version__
        print(f"{PROG} {__version__}")
        return 0
    if not argv:  # run by hand: mod_md always passes a reason
        say(USAGE)
        return EXIT_USAGE
    try:
        opts, rest = parse(argv)
    except UsageError as e:
        # Only a `renewed` message is worth failing for: mod_md retries it and logs this line
        # until the command line is fixed. Any other reason must never fail a renewal.
        if "renewed" in argv:
            say(f"{e}; {USAGE}", ERR)
            return EXIT_USAGE
        say(f"{e}; ignored ({' '.join(argv)[:200]})", ERR)
        return EXIT_DELIVERED
    if opts["help"]:
        print(help_text(), end="")
        return 0
    reason, md = rest[0], (rest[1] if len(rest) > 1 else None)
    own = own_work(reason, md, opts)
    if opts["then"] is None or own == EXIT_USAGE:
        return own
    return then(reason, rest, opts, own)


if __name__ == "__main__":
    sys.exit(main())
