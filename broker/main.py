"""apache-restart-broker: the daemon's entry point."""

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

from . import __version__, config, log
from .chain import TrustAnchors

# The unit's RestartPreventExitStatus= names this: restarting cannot cure a broken config.
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line; --help and the manual page are both made from it."""
    p = argparse.ArgumentParser(prog="apache-restart-broker",
                                description="Graceful Apache restarts for mod_md, on the system bus.")
    p.add_argument("--config", help=f"TOML configuration (default {config.DEFAULT_PATH})")
    p.add_argument("--bus-address", help="bus to serve on (default: the system bus)")
    p.add_argument("--check-config", action="store_true",
                   help="only check the configuration file and exit: 0 when usable, 2 with the problem")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def settings_line(cfg: config.Config) -> str:
    """The settings an admin asks about first, for the start line and --check-config."""
    via = f"systemd ({cfg.systemd_unit})" if cfg.restart_via == "systemd" else "command"
    probes = ", ".join(cfg.probe) if cfg.probe else "off"
    anchors = ", ".join(cfg.trust_anchors) if cfg.trust_anchors else "none"
    return (f"store {cfg.md_store}, restart via {via}, settle {cfg.settle_seconds:g} s, "
            f"min interval {cfg.min_interval_seconds:g} s, probes {probes}, trust anchors {anchors}")


def check_warnings(cfg: config.Config) -> list[str]:
    """What a valid configuration will still meet on this host: the broker starts anyway
    (the store may appear later, a command may be installed later), but an admin checking
    the file wants to hear it now."""
    warnings = []
    if not os.path.isdir(cfg.md_store):
        warnings.append(f"md_store {cfg.md_store} is not a directory (yet): nothing will be found to activate")
    commands = [("configtest_command", cfg.configtest_command)]
    if cfg.restart_via == "command":
        commands.append(("graceful_command", cfg.graceful_command))
    for key, argv in commands:
        if argv and not (os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)):
            warnings.append(f"{key}: {argv[0]} is not an executable program here (PATH {config.COMMAND_PATH})")
    # trust_anchors is not here: the broker reads those files at start and refuses to start
    # without them (a staged chain could never verify), so --check-config fails for them too.
    return warnings


def _build(cfg: config.Config, bus: Any, anchors: TrustAnchors) -> tuple[Any, Any]:
    """The broker's parts wired together: (engine, service). Nothing runs yet."""
    from .authz import Authorizer
    from .engine import Engine
    from .restart import CommandRestarter, Restarter
    from .service import ApacheRestartService
    from .staging import Store
    from .state import StateFile

    restarter: Restarter
    if cfg.restart_via == "systemd":
        from .restart_systemd import SystemdRestarter
        restarter = SystemdRestarter(bus, cfg.systemd_unit, cfg.configtest_command,
                                     cfg.command_timeout_seconds)
    else:
        restarter = CommandRestarter(cfg.configtest_command, cfg.graceful_command, cfg.pid_file,
                                     cfg.command_timeout_seconds)
    # One clock for the whole core: the store's validity checks and the plan agree on "now".
    clock = time.time
    store = Store(cfg.md_store, clock=clock, anchors=anchors)
    engine = Engine(cfg, store, restarter, StateFile(cfg.state_dir), clock=clock)
    authorizer = Authorizer(bus, cfg.polkit_timeout_seconds, cfg.allow_interactive_authorization)
    return engine, ApacheRestartService(bus, engine, authorizer, cfg.max_in_flight)


async def _run_until_done(cfg: config.Config, bus: Any, engine: Any, service: Any) -> int:
    """Serve until a signal, the idle time, a lost bus or a failed restart loop; the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = loop.create_task(engine.run())
    disconnected = loop.create_task(bus.wait_for_disconnect())
    stopping = loop.create_task(stop.wait())
    waiters = {runner, disconnected, stopping}
    idle = None
    if cfg.idle_exit_seconds > 0:
        idle = loop.create_task(_idle_watch(engine, service, cfg.idle_exit_seconds))
        waiters.add(idle)
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if disconnected in done:
        exc = disconnected.exception()
        log.err(f"lost the bus connection{': ' + str(exc) if exc else ''}; exiting")
        status = 1
    elif runner in done:
        exc = runner.exception()
        log.err(f"restart loop ended: {exc!r}")
        status = 1
    elif idle is not None and idle in done:
        log.notice(f"idle for {cfg.idle_exit_seconds:g} s with nothing pending; exiting")
    else:
        log.notice("stopping on signal")
    if status == 0 and engine.restarting:
        # Let a running restart finish its verification, so its outcome is recorded.
        await asyncio.wait([runner], timeout=cfg.verify_timeout_seconds + cfg.command_timeout_seconds)
    for task in waiters:
        task.cancel()
    return status


async def _serve(cfg: config.Config, bus_address: str | None, anchors: TrustAnchors) -> int:
    # Imported here so that --help and config errors need no D-Bus library.
    from . import dbuslib, names

    bus = await dbuslib.connect(bus_address)
    if not dbuslib.harden_writer(bus):
        log.warning(f"{dbuslib.LIB_NAME}: unknown writer layout, a reply burst may drop the connection")
    engine, service = _build(cfg, bus, anchors)
    service.export()
    reply = await bus.request_name(names.BUS_NAME)
    code = int(getattr(reply, "value", reply))  # RequestNameReply is a plain Enum in both libraries
    if code != 1:  # PRIMARY_OWNER
        log.err(f"could not own {names.BUS_NAME} (reply {code}): another broker runs?")
        return 1
    log.notice(f"apache-restart-broker {__version__} serving {names.BUS_NAME} ({dbuslib.LIB_NAME}): "
               + settings_line(cfg))
    status = await _run_until_done(cfg, bus, engine, service)
    if status == 0:
        bus.disconnect()
    return status


async def _idle_watch(engine, service, idle_seconds: float) -> None:
    clock = asyncio.get_running_loop().time
    since = clock()
    while True:
        await asyncio.sleep(min(1.0, idle_seconds))
        if not engine.idle() or service.in_flight:
            since = clock()
        elif clock() - since >= idle_seconds:
            return


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        cfg = config.load(args.config)
        # Read once: a file that cannot be read stops the start, not every later check.
        anchors = TrustAnchors.load(cfg.trust_anchors)
    except config.ConfigError as e:
        if args.check_config:  # an admin at a terminal: plain text, no log priority prefix
            print(f"apache-restart-broker: configuration: {e}", file=sys.stderr)
        else:
            log.err(f"configuration: {e}")
        return EXIT_CONFIG
    if args.check_config:
        path = args.config or config.DEFAULT_PATH
        source = path if os.path.exists(path) else f"{path} (absent: all defaults)"
        print(f"{source}: ok: {settings_line(cfg)}")
        for warning in check_warnings(cfg):
            print(f"apache-restart-broker: warning: {warning}", file=sys.stderr)
        return 0
    if os.geteuid() != 0:
        log.warning("not running as root: restarting Apache and reading its store will likely fail")
    try:
        return asyncio.run(_serve(cfg, args.bus_address, anchors))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.err(f"fatal: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
