"""``python -m harness``: start the stack, print where everything is, run until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from .procs import HarnessError
from .stack import StackOptions, running_stack


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    parser.add_argument(
        "--md",
        action="append",
        metavar="NAMES",
        help="an MDomain (names separated by commas); repeatable; default www.example.test",
    )
    parser.add_argument("--validity", type=int, metavar="SECONDS", help="certificate lifetime pebble gives")
    parser.add_argument("--renew-window", metavar="WINDOW", help="MDRenewWindow, e.g. 20s")
    parser.add_argument("--message-cmd", nargs="+", metavar="ARG", help="MDMessageCmd argv (absolute path)")
    parser.add_argument("--no-bus", action="store_true", help="no private bus and no polkitd")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory afterwards")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)
    options = StackOptions(
        domains=[md.split(",") for md in args.md] if args.md else [["www.example.test"]],
        validity_seconds=args.validity,
        renew_window=args.renew_window,
        message_cmd=args.message_cmd,
        with_bus=not args.no_bus,
        with_polkit=not args.no_bus,
        keep=args.keep,
    )
    try:
        with running_stack(options) as stack:
            assert stack.apache is not None and stack.pebble is not None
            print(f"directory     {stack.root}")
            print(f"pebble        {stack.pebble.directory_url}")
            print(
                f"apache        http://127.0.0.1:{stack.http_port}/md-status  https://{stack.https_address}"
            )
            print(f"apache conf   {stack.apache.conf_path}")
            print(f"configtest    {' '.join(stack.apache.configtest_command)}")
            print(f"graceful      {' '.join(stack.apache.graceful_command)}")
            print(f"md store      {stack.apache.store_dir}")
            if stack.bus:
                print(f"bus           {stack.bus.address}")
            print("running; Ctrl-C stops everything", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("stopped")
        return 0
    except HarnessError as e:
        print(f"harness: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
