"""The commented /etc/apache-restart-broker.toml that the package ships and scripts/install writes.

Every key of broker.config.KEYS appears with its meaning, range and default, commented out, so
that the file documents itself and cannot drift from the code; the few keys a layout sets on
purpose are written as live lines with the reason.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

from broker.config import KEYS, Key

# Idle cost 0: D-Bus activation starts the broker again on the next call, so where systemd
# activates it (the package, or scripts/install under systemd) it need not stay resident.
ACTIVATED_IDLE_EXIT_SECONDS = 60

# What a reader of the file should know beyond the key's own sentence.
NOTES = {
    "state_dir": "must stay the unit's StateDirectory: the only place the sandbox lets the "
                 "broker write",
    "probe": 'e.g. ["127.0.0.1:443"]: check the certificate served there after a restart; the '
             "unit lets the broker reach loopback addresses only",
    "restart_via": '"command" also needs the unit\'s command-mode drop-in (command-mode.conf), '
                   "which loosens the sandbox for apachectl",
    "idle_exit_seconds": "with D-Bus activation (systemd) the broker is started again by the "
                         "next call, so it need not stay resident; without systemd nothing "
                         "would start it again: keep 0 there",
}


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=92, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False)


def key_block(key: Key, value: str | None, why: str = "") -> list[str]:
    """One key: its meaning and range, then the line (commented out when it is the default)."""
    lines = _comment(f"{key.name}: {key.doc}.")
    lines += _comment(f"Range: {key.range_text()}. Default: {key.default_toml()}.")
    if key.name in NOTES:
        lines += _comment(f"({NOTES[key.name]})")
    if value is None:
        lines.append(f"#{key.name} = {key.default_toml()}")
    else:
        if why:
            lines += _comment(f"Set here: {why}")
        lines.append(f"{key.name} = {value}")
    return lines


def text(header: str, values: Mapping[str, str], why: Mapping[str, str] | None = None) -> str:
    """The whole file. `values`: key -> TOML value text for the keys written live."""
    unknown = set(values) - set(KEYS)
    if unknown:
        raise KeyError(f"not configuration keys: {', '.join(sorted(unknown))}")
    out = [*_comment(header), "#",
           *_comment("Every key is listed below with its default; a key left commented out "
                     "takes that default. Unknown keys, wrong types and values out of range "
                     "stop the broker at start with a message naming the key."), ""]
    for name, key in KEYS.items():
        out += key_block(key, values.get(name), (why or {}).get(name, ""))
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def package_text() -> str:
    """The conffile of the Debian package."""
    return text(
        "Configuration of apache-restart-broker, read by the broker when it starts (D-Bus "
        "activation starts it on the first request). A conffile of the package: your changes "
        "are kept on upgrades. Manual: apache-restart-broker.toml(5).",
        {"restart_via": '"systemd"', "idle_exit_seconds": str(ACTIVATED_IDLE_EXIT_SECONDS)},
        {"restart_via": "the packaged unit's sandbox is made for reloading Apache through "
                        "systemd.",
         "idle_exit_seconds": "the broker is D-Bus activated, so it exits when idle "
                              "(nothing pending, nothing running) and costs nothing between "
                              "renewals."})
