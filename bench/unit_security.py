#!/usr/bin/env python3
"""Exposure of the broker's systemd sandbox, as `systemd-analyze security --offline=yes` rates it.

    python3 bench/unit_security.py

Prints a small table: the broker unit as shipped (restart_via = "systemd"), the unit with
the command-mode drop-in (restart_via = "command"), and the daily check service. Exits 1
when the broker unit in systemd mode is rated above 2.0 (the project's limit), 2 when
systemd-analyze is missing or gives no rating.

Each unit is rated from a scratch root directory that holds just the unit (and the
drop-in), placed where the installer puts them, so that units installed on this machine
cannot change the result.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = "usr/local/lib/systemd/system"
LIMIT = 2.0
BROKER_UNIT = "apache-restart-broker.service"
CHECK_UNIT = "apache-restart-broker-check.service"
DROPIN = "command-mode.conf"

_OVERALL = re.compile(r"Overall exposure level for \S+:\s*([0-9]+(?:\.[0-9]+)?)")


class NoRating(Exception):
    pass


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


def exposure(unit_name: str, unit_text: str, dropins: dict[str, str] | None = None) -> float:
    """The overall exposure (0.0 .. 10.0) of a unit given as text, with optional drop-ins."""
    tool = systemd_analyze()
    if tool is None:
        raise NoRating("systemd-analyze not found")
    with tempfile.TemporaryDirectory(prefix="unit-security.") as root:
        unit_dir = Path(root, UNIT_DIR)
        unit_dir.mkdir(parents=True)
        (unit_dir / unit_name).write_text(unit_text)
        if dropins:
            d = unit_dir / f"{unit_name}.d"
            d.mkdir()
            for name, text in dropins.items():
                (d / name).write_text(text)
        result = subprocess.run(
            [tool, "security", "--offline=yes", f"--root={root}", "--no-pager", unit_name],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        )
    m = _OVERALL.search(result.stdout)
    if m is None:
        raise NoRating(f"no rating from systemd-analyze (exit {result.returncode}): "
                       f"{(result.stderr or result.stdout).strip()[:500]}")
    return float(m.group(1))


def measure() -> list[tuple[str, str, float]]:
    """(row label, restart_via, exposure) for the shipped units."""
    systemd_dir = REPO / "systemd"
    broker = (systemd_dir / BROKER_UNIT).read_text()
    dropin = (systemd_dir / DROPIN).read_text()
    check = (systemd_dir / CHECK_UNIT).read_text()
    return [
        (BROKER_UNIT, "systemd", exposure(BROKER_UNIT, broker)),
        (f"{BROKER_UNIT} + {DROPIN}", "command", exposure(BROKER_UNIT, broker, {DROPIN: dropin})),
        (CHECK_UNIT, "-", exposure(CHECK_UNIT, check)),
    ]


def version() -> str:
    tool = systemd_analyze()
    out = subprocess.run([tool or "systemd-analyze", "--version"], capture_output=True, text=True,
                         check=False).stdout
    return out.splitlines()[0] if out else "systemd-analyze (unknown version)"


def main() -> int:
    try:
        rows = measure()
    except NoRating as e:
        print(f"unit_security: {e}", file=sys.stderr)
        return 2
    width = max(len(r[0]) for r in rows)
    print(f"systemd-analyze security --offline=yes ({version()}); lower is better, 10.0 is unconfined\n")
    print(f"{'unit':<{width}}  {'restart_via':<11}  exposure")
    print(f"{'-' * width}  {'-' * 11}  --------")
    for label, mode, value in rows:
        print(f"{label:<{width}}  {mode:<11}  {value:8.1f}")
    systemd_mode = rows[0][2]
    verdict = "OK" if systemd_mode <= LIMIT else "TOO HIGH"
    print(f"\nlimit for restart_via = \"systemd\": {LIMIT:.1f} -> {systemd_mode:.1f} {verdict}")
    return 0 if systemd_mode <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
