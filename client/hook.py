"""apache-restart-hook: the program mod_md runs as its MDMessageCmd.

    MDMessageCmd /usr/local/bin/apache-restart-hook [--bus-address ADDRESS] [--timeout SECONDS]

mod_md appends REASON and the MD name (and future versions may append more, which is
ignored). What the hook does per reason, and why, is in the README; in short:

    renewed    ask the broker for a graceful restart (RequestGracefulRestart), at most
               --timeout seconds (default and maximum 10). Exit 0 when the broker took it, or
               when it refused for a reason no retry can cure; exit 75 (EX_TEMPFAIL) when a
               later try can cure it, so that mod_md calls again.
    installed  runs as root inside Apache's restart: one line, exit 0, no bus at all.
    others     (renewing, challenge-setup:*, expiring, errored, ocsp-*, unknown ones):
               one line, exit 0 at once, no bus, no D-Bus library.

One line on stderr per call (mod_md logs it). This module imports nothing but `sys` until it
knows the reason is `renewed`: it runs on the path of every renewal.
"""

import sys

PROG = "apache-restart-hook"
DEFAULT_TIMEOUT = 10.0      # the contract: no answer within 10 s counts as "try again later"
MAX_TIMEOUT = 10.0

EXIT_DELIVERED = 0          # mod_md: delivered (also: refused for good, or nothing to do)
EXIT_USAGE = 2              # the MDMessageCmd line is wrong (only for `renewed`)
EXIT_RETRY = 75             # EX_TEMPFAIL: not taken, a later try can cure it

USAGE = f"usage: {PROG} [--bus-address ADDRESS] [--timeout SECONDS] REASON NAME [...]"

# What the hook says for the reasons it does not act on (mod_md logs it at INFO).
_NOTHING_TO_DO = {
    "renewing": "renewal starting; nothing to do",
    "expiring": "certificate expires soon (mod_md renews it); nothing to do",
    "errored": "mod_md reports a renewal error (see its log); nothing to do",
    "ocsp-renewed": "OCSP response renewed; nothing to do",
    "ocsp-errored": "OCSP renewal failed (see mod_md's log); nothing to do",
    "installed": "new certificate activated by Apache's restart; nothing to do",
}


class UsageError(Exception):
    pass


def say(text: str) -> None:
    """The one line this call leaves in Apache's error log."""
    line = "".join(c if c.isprintable() else " " for c in text)
    try:
        sys.stderr.write(f"{PROG}: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing else to tell
        pass


def parse(argv: list[str]) -> tuple[dict, str, str | None]:
    """Options first (what the MDMessageCmd line holds), then REASON NAME [ignored...]."""
    opts: dict = {"bus_address": None, "timeout": DEFAULT_TIMEOUT}
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        key, eq, value = arg.partition("=")
        if key not in ("--bus-address", "--timeout"):
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
            try:
                timeout = float(value)
            except ValueError:
                raise UsageError(f"--timeout {value!r} is not a number") from None
            if not 0 < timeout <= MAX_TIMEOUT:
                raise UsageError(f"--timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
            opts["timeout"] = timeout
    rest = argv[i:]
    if not rest:
        raise UsageError("no REASON given")
    return opts, rest[0], (rest[1] if len(rest) > 1 else None)


def renewed(md: str, bus_address: str | None, timeout: float) -> int:
    # Only here the D-Bus library is loaded.
    from client import call

    try:
        planned = call.request_restart(md, bus_address, timeout)
    except call.Failure as f:
        return _failed(md, f)
    except Exception as e:
        say(f"renewed {md}: internal error in the hook ({type(e).__name__}: {e}); mod_md will retry")
        return EXIT_RETRY
    # The settle window ends early once mod_md is done: the time is the latest, not the likely.
    say(f"renewed {md}: restart planned at the latest at {call.format_usec(planned)}")
    return EXIT_DELIVERED


def _failed(md: str, f) -> int:  # f: client.call.Failure (not imported on the fast path)
    from client import call

    if f.retryable:
        what = {
            call.UNREACHABLE: "broker not reachable",
            call.TIMEOUT: "broker did not answer",
            call.BUSY: "broker busy",
            call.DENIED: "access denied (check the polkit rule and bus policy for this user)",
            call.INTERNAL: "broker failed (see its log)",
        }[f.kind]
        say(f"renewed {md}: {what} ({f.describe()}); mod_md will retry")
        return EXIT_RETRY
    say(f"renewed {md}: refused by the broker ({f.describe()}); not retried, see 'apache-restart status'")
    return EXIT_DELIVERED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--version":
        from broker import __version__
        print(f"{PROG} {__version__}")
        return 0
    if not argv:  # run by hand: mod_md always passes a reason
        say(USAGE)
        return EXIT_USAGE
    try:
        opts, reason, md = parse(argv)
    except UsageError as e:
        # Only a `renewed` message is worth failing for: mod_md retries it and logs this line
        # until the command line is fixed. Any other reason must never fail a renewal.
        if "renewed" in argv:
            say(f"{e}; {USAGE}")
            return EXIT_USAGE
        say(f"{e}; ignored ({' '.join(argv)[:200]})")
        return EXIT_DELIVERED
    shown = md if md is not None else "(no name)"
    if reason == "renewed":
        if not md:
            say(f"renewed: no MD name given; {USAGE}")
            return EXIT_USAGE
        return renewed(md, opts["bus_address"], opts["timeout"])
    if reason in _NOTHING_TO_DO:
        say(f"{reason} {shown}: {_NOTHING_TO_DO[reason]}")
    elif reason.startswith("challenge-setup:"):
        say(f"{reason} {shown}: challenge being set up; nothing to do")
    else:
        say(f"{reason} {shown}: reason not known to this hook; ignored")
    return EXIT_DELIVERED


if __name__ == "__main__":
    sys.exit(main())
