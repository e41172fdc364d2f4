"""apache-restart-broker: the daemon's entry point."""

import argparse
import asyncio
import os
import signal
import sys
import time

from . import __version__, config, log


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="apache-restart-broker",
                                description="Graceful Apache restarts for mod_md, on the system bus.")
    p.add_argument("--config", help=f"TOML configuration (default {config.DEFAULT_PATH})")
    p.add_argument("--bus-address", help="bus to serve on (default: the system bus)")
    p.add_argument("--version", action="version", version=__version__)
    return p.parse_args(argv)


async def _serve(cfg: config.Config, bus_address: str | None) -> int:
    # Imported here so that --help and config errors need no D-Bus library.
    from . import dbuslib, names
    from .authz import Authorizer
    from .engine import Engine
    from .restart import CommandRestarter, Restarter
    from .service import ApacheRestartService
    from .staging import Store
    from .state import StateFile

    bus = await dbuslib.connect(bus_address)
    if not dbuslib.harden_writer(bus):
        log.warning(f"{dbuslib.LIB_NAME}: unknown writer layout, a reply burst may drop the connection")
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
    engine = Engine(cfg, Store(cfg.md_store, clock=clock), restarter, StateFile(cfg.state_dir),
                    clock=clock)
    service = ApacheRestartService(bus, engine, Authorizer(bus, cfg.polkit_timeout_seconds,
                                                           cfg.allow_interactive_authorization),
                                   cfg.max_in_flight)
    service.export()
    reply = await bus.request_name(names.BUS_NAME)
    code = int(getattr(reply, "value", reply))  # RequestNameReply is a plain Enum in both libraries
    if code != 1:  # PRIMARY_OWNER
        log.err(f"could not own {names.BUS_NAME} (reply {code}): another broker runs?")
        return 1
    log.notice(f"apache-restart-broker {__version__} serving {names.BUS_NAME} ({dbuslib.LIB_NAME}), "
               f"restart via {cfg.restart_via}, store {cfg.md_store}")

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
    except config.ConfigError as e:
        log.err(f"configuration: {e}")
        return 2
    if os.geteuid() != 0:
        log.warning("not running as root: restarting Apache and reading its store will likely fail")
    try:
        return asyncio.run(_serve(cfg, args.bus_address))
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.err(f"fatal: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
