"""The manual pages, made at build time from what the programs themselves use.

The options and commands come from the argparse parsers that also print --help (the broker's
and the admin command's), the hook's from its usage line and its tables of options, reasons and exit codes, and the
configuration page from broker.config.KEYS: a changed option or key changes its page, and a
page cannot describe an option that --help does not know. Only the prose around them lives
here.

    python3 -m deploy.manpages OUTDIR      writes OUTDIR/<name>.<section>
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from broker import __version__, names
from broker import config as broker_config
from broker import main as broker_main

from . import manifest

SOURCE_LINE = f"apache-restart-broker {__version__}"


def esc(text: str) -> str:
    """Plain text as roff: backslashes escaped, no line read as a request."""
    text = text.replace("\\", "\\e")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def opt(text: str) -> str:
    """An option or command name: its hyphens are minus signs (what a user types)."""
    return esc(text).replace("-", "\\-")


def _date() -> str:
    # Reproducible builds: the changelog's date, which dpkg exports.
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    when = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch else \
        datetime.datetime.now(datetime.timezone.utc)
    return when.strftime("%Y-%m-%d")


def header(name: str, section: int, title: str, summary: str) -> list[str]:
    # No hyphenation, no justification: paths, keys and TOML values must stay copyable.
    return [f'.TH {opt(name.upper())} {section} "{_date()}" "{SOURCE_LINE}" "{title}"', ".nh", ".ad l",
            ".SH NAME", f"{opt(name)} \\- {esc(summary)}"]


def para(text: str) -> list[str]:
    return [".PP", esc(text)]


def section(title: str, *paragraphs: str) -> list[str]:
    out = [f".SH {title}"]
    for i, p in enumerate(paragraphs):
        out += [esc(p)] if i == 0 else para(p)
    return out


def tagged(items: Iterable[tuple[str, str]]) -> list[str]:
    out = []
    for tag, text in items:
        out += [".TP", f".B {tag}", esc(text)]
    return out


def _action_tag(action: argparse.Action) -> str:
    names = ", ".join(opt(s) for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{names} \\fI{esc(metavar)}\\fR"


def options(parser: argparse.ArgumentParser, with_help: bool = True) -> list[tuple[str, str]]:
    items = []
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        help_text = action.help or ""
        if isinstance(action, argparse._HelpAction):
            if not with_help:  # a command's own -h: said once for the program
                continue
            help_text = "show the usage and the options, then exit"
        elif isinstance(action, argparse._VersionAction):
            help_text = "print the version, then exit"
        items.append((_action_tag(action), help_text % {"prog": parser.prog, "default": action.default}
                      if "%(" in help_text else help_text))
    return items


def synopsis(parser: argparse.ArgumentParser) -> list[str]:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    usage = re.sub(r"\s+", " ", usage)
    prog, _, rest = usage.partition(" ")
    return [".SH SYNOPSIS", f".B {opt(prog)}", opt(rest)]


SEE_ALSO_ALL = ["apache-restart-broker(8)", "apache-restart(8)", "apache-restart-hook(8)",
                "apache-restart-broker.toml(5)", "a2enconf(8)", "busctl(1)"]


def see_also(own: str) -> list[str]:
    refs = [r for r in SEE_ALSO_ALL if not r.startswith(own + "(")]
    return [".SH SEE ALSO", ", ".join(f"\\fB{opt(r.split('(')[0])}\\fR({r.split('(')[1]}" for r in refs)]


def files_section(items: Iterable[tuple[str, str]]) -> list[str]:
    return [".SH FILES", *tagged((esc(path), text) for path, text in items)]


# -- the pages ---------------------------------------------------------------------------------


def broker_page() -> str:
    parser = broker_main.build_parser()
    layout = manifest.DEBIAN
    lines = header("apache-restart-broker", 8, "System Administration", parser.description or "")
    lines += synopsis(parser)
    lines += section(
        "DESCRIPTION",
        "apache-restart-broker is a root service on the system bus (name org.masysma.ApacheRestart) "
        "that the Apache user may ask for one thing: a certificate that mod_md renewed is staged, "
        "please activate it. mod_md's hook, apache-restart-hook(8), asks with "
        "RequestGracefulRestart. The broker authorizes the caller with polkit, checks the staged "
        "set (files, completeness, validity, names, chain), waits for mod_md to settle, runs "
        "Apache's configuration test, restarts Apache gracefully (through systemd, or with "
        "apachectl) and verifies that the new certificate is active and served.",
        "It is started by D-Bus activation (systemd unit " + manifest.BROKER_UNIT + ") and, with "
        "idle_exit_seconds set, exits when nothing is pending or running. A timer, "
        + manifest.TIMER + ", asks it every 5 minutes (at a stable per-host offset) to activate "
        "any valid staged set whose hook message was lost and, where several Apache servers share "
        "one MD store, to restart this one when a probe address serves an older certificate than "
        "the one active in the store (another node activated the renewal). Before each restart "
        "it waits while another node holds mod_md's store lock.",
        "With metrics_file set it writes Prometheus metrics (certificate expiry per MD, key type "
        "and where: staged, active, served; pending and last restarts) for node-exporter's "
        "textfile collector.",
        "It logs to standard error, one line an event, with sd-daemon priority prefixes.")
    lines += [".SH OPTIONS", *tagged(options(parser))]
    lines += section("EXIT STATUS", "0 when stopped by a signal or idle; 1 on a fatal error (the bus "
                     "lost, the name owned by another process); 2 when the configuration is refused.")
    lines += files_section([
        (manifest.CONFIG_FILE, "the configuration, see apache-restart-broker.toml(5)"),
        (manifest.STATE_DIR, "pending work, the last restart and failed sets, across restarts"),
        ("/usr/share/dbus-1/system.d/org.masysma.ApacheRestart.conf", "the bus policy"),
        ("/usr/share/polkit-1/rules.d/49-apache-restart-broker.rules",
         "grants the restart action to the Apache user"),
        ("/usr/share/polkit-1/rules.d/49-apache-restart-broker-monitor.rules",
         "grants reading the status (" + names.POLKIT_ACTION_READ_STATUS + ") to group "
         + manifest.DEFAULT_MONITOR_GROUP),
        (manifest.MONITOR_POLICY, "the bus policy that lets group " + manifest.DEFAULT_MONITOR_GROUP
         + " call GetStatus; made on installation where the group exists (template: "
         + manifest.MONITOR_POLICY_TEMPLATE + ")"),
        (f"{layout.unit_dir}/{manifest.BROKER_UNIT}", "the sandboxed unit"),
    ])
    lines += see_also("apache-restart-broker")
    return "\n".join(lines) + "\n"


def admin_page() -> str:
    from client import admin, monitor

    parser = admin._parser()
    lines = header("apache-restart", 8, "System Administration", parser.description or "")
    lines += synopsis(parser)
    lines += section(
        "DESCRIPTION",
        "apache-restart talks to apache-restart-broker(8) on the system bus: it reads no "
        "configuration file and not mod_md's store itself. check-all and test need root; status "
        "and check are allowed to root and the monitoring group (" + manifest.DEFAULT_MONITOR_GROUP
        + "); request to root and the Apache user.")
    lines += [".SH OPTIONS", *tagged(options(parser))]
    lines += [".SH COMMANDS"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    for name, child in sub.choices.items():
        args = " ".join(f"\\fI{esc(a.metavar or a.dest)}\\fR" for a in child._actions
                        if not a.option_strings)
        lines += [".TP", f".B {opt(name)}" + (f" {args}" if args else ""), esc(helps.get(name, ""))]
        for tag, text in options(child, with_help=False):
            lines += [".RS", ".TP", f".B {tag}", esc(text), ".RE"]
    lines += [".SH EXIT STATUS", *tagged([
        (str(admin.EXIT_OK), "done"),
        (str(admin.EXIT_REFUSED), "the broker refused (InvalidName, NothingStaged, StagingInvalid, "
                                  "AlreadyFailed, ...); the error name and message are printed"),
        (str(admin.EXIT_USAGE), "usage error"),
        (str(admin.EXIT_TEMPORARY), "try again later: the broker is not reachable, did not answer "
                                    "in time, is busy or failed"),
        (str(admin.EXIT_DENIED), "access denied"),
    ])]
    lines += section(
        "MONITORING PLUGIN",
        "check follows the monitoring-plugins convention (Nagios, Icinga): one line, then | and "
        "performance data (days left per MD, hours a valid set has waited staged, pending, MDs), "
        "and exit statuses of its own, a bad option included:")
    lines += tagged([
        (str(monitor.OK), "OK"),
        (str(monitor.WARNING), "WARNING: a certificate clients get expires within --warning days; a "
                               "valid set has waited staged longer than --pending-hours; a staged "
                               "set fails verification; a probe address cannot be asked"),
        (str(monitor.CRITICAL), "CRITICAL: a certificate clients get (what a probe address serves, "
                                "else the active one) expires within --critical days or has expired; "
                                "a restart failed to activate the set that is still staged, or was held back (config "
                                "test) while a valid set waits for it"),
        (str(monitor.UNKNOWN), "UNKNOWN: the broker cannot be asked"),
    ])
    lines += para("The monitoring group may run it where its bus policy is installed ("
                  + manifest.MONITOR_POLICY + "); the package makes that file on installation "
                  "when group " + manifest.DEFAULT_MONITOR_GROUP + " exists. For another group, "
                  "copy " + manifest.MONITOR_POLICY_TEMPLATE + " there and add a polkit rule for "
                  "the action " + names.POLKIT_ACTION_READ_STATUS + " in /etc/polkit-1/rules.d.")
    lines += see_also("apache-restart")
    return "\n".join(lines) + "\n"


def hook_page() -> str:
    from client import hook

    usage = hook.USAGE.removeprefix("usage: ")
    prog, _, rest = usage.partition(" ")
    hook_path = manifest.hook_path(manifest.DEBIAN)
    lines = header("apache-restart-hook", 8, "System Administration",
                   "mod_md's MDMessageCmd for apache-restart-broker")
    lines += [".SH SYNOPSIS", f".B {opt(prog)}", opt(rest)]
    lines += section(
        "DESCRIPTION",
        "mod_md runs this program as its MDMessageCmd, as the Apache user, with REASON and the "
        "Managed Domain's NAME appended. For renewed it asks apache-restart-broker(8) for a "
        "graceful restart (RequestGracefulRestart) and returns as soon as the broker has "
        "planned it. Every other reason is logged and answered with exit 0 and no bus "
        "connection: a non-zero exit on renewing or challenge-setup would make mod_md abort "
        "the renewal. Each call writes one line to standard error, which mod_md copies to "
        "Apache's error log at level info. With --then, an admin's own program runs afterwards "
        "with the same arguments (mod_md takes only one MDMessageCmd).",
        "The package ships the Apache configuration snippet " + manifest.APACHE_CONF + " with "
        "the one line that matters, enabled on installation:",
    )
    lines += [".PP", ".RS", ".nf", esc(f"MDMessageCmd {hook_path}"), ".fi", ".RE"]
    lines += para("mod_md runs the command without a shell and without a PATH search, so the "
                  "path must be absolute. mod_md takes one MDMessageCmd for the whole server.")
    # The hook's own tables, as --help prints them.
    lines += [".SH OPTIONS", *tagged((opt(tag), text) for tag, text in hook.OPTIONS)]
    lines += [".SH REASONS", *tagged((opt(tag), text) for tag, text in hook.REASONS)]
    lines += para(hook.SYSLOG)
    lines += [".SH EXIT STATUS", *tagged((opt(tag), text) for tag, text in hook.EXITS)]
    lines += section("ENVIRONMENT", hook.TESTING)
    lines += see_also("apache-restart-hook")
    return "\n".join(lines) + "\n"


def config_page() -> str:
    name = f"{manifest.PACKAGE}.toml"
    lines = header(name, 5, "File Formats", "configuration of apache-restart-broker")
    lines += section(
        "DESCRIPTION",
        f"{manifest.CONFIG_FILE} is a TOML file read by apache-restart-broker(8) when it starts. "
        "A missing file means all defaults. Unknown keys, wrong types and values outside a key's "
        "range stop the broker at start with a message that names the file and the key (and the "
        "nearest known key for a typo).",
        "The packaged file lists every key with its default; it sets restart_via = \"systemd\" and "
        "idle_exit_seconds = 60, so that the D-Bus activated broker exits when idle.")
    lines += [".SH KEYS"]
    for key in broker_config.KEYS.values():
        lines += [".TP", f".B {esc(key.name)}",
                  esc(f"{key.doc}."),
                  ".br", esc(f"Range: {key.range_text()}. Default: {key.default_toml()}.")]
    lines += see_also("apache-restart-broker.toml")
    return "\n".join(lines) + "\n"


PAGES = {
    "apache-restart-broker": broker_page,
    "apache-restart": admin_page,
    "apache-restart-hook": hook_page,
    f"{manifest.PACKAGE}.toml": config_page,
}


def write_all(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, section_number in manifest.manual_pages().items():
        path = outdir / f"{name}.{section_number}"
        path.write_text(PAGES[name](), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 -m deploy.manpages OUTDIR", file=sys.stderr)
        return 2
    for path in write_all(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
