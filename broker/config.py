"""The broker's TOML configuration: defaults, types and validation.

Unknown keys and wrong types are refused at start with a message that names the key,
so a typo never silently falls back to a default on a production server.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tomllib
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_PATH = "/etc/apache-restart-broker.toml"


@dataclass(frozen=True)
class Config:
    md_store: str = "/etc/apache2/md"
    restart_via: str = "command"
    systemd_unit: str = "apache2.service"
    configtest_command: tuple[str, ...] = ("apachectl", "configtest")
    graceful_command: tuple[str, ...] = ("apachectl", "graceful")
    pid_file: str = "/run/apache2/apache2.pid"
    settle_seconds: float = 30.0
    min_interval_seconds: float = 300.0
    verify_timeout_seconds: float = 30.0
    probe: tuple[str, ...] = ()
    state_dir: str = "/var/lib/apache-restart-broker"
    # Beyond the contract's keys:
    command_timeout_seconds: float = 60.0
    polkit_timeout_seconds: float = 10.0
    # Requests a caller (by uid) may send: a bucket of `rate_burst` refilled at `rate_per_second`.
    rate_burst: float = 100.0
    rate_per_second: float = 2.0
    # Requests being authorized or checked at once; keeps the broker's own polkit calls well
    # below dbus-daemon's 128 pending replies per connection.
    max_in_flight: int = 64
    # Exit after this long with nothing pending (D-Bus activation starts us again); 0 = never.
    idle_exit_seconds: float = 0.0
    allow_interactive_authorization: bool = False


_STRING_KEYS = {"md_store", "restart_via", "systemd_unit", "pid_file", "state_dir"}
_ARGV_KEYS = {"configtest_command", "graceful_command"}
_NUMBER_KEYS = {
    "settle_seconds", "min_interval_seconds", "verify_timeout_seconds",
    "command_timeout_seconds", "polkit_timeout_seconds", "rate_burst", "rate_per_second",
    "idle_exit_seconds",
}
_INT_KEYS = {"max_in_flight"}
_BOOL_KEYS = {"allow_interactive_authorization"}
_KNOWN = _STRING_KEYS | _ARGV_KEYS | _NUMBER_KEYS | _INT_KEYS | _BOOL_KEYS | {"probe"}


def _resolve_argv(key: str, argv: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve argv[0] to an absolute path now, so that PATH at restart time cannot matter."""
    if not argv:
        return argv
    if os.path.isabs(argv[0]):
        return argv
    found = shutil.which(argv[0], path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        # Keep it: the restart reports the missing program; a config test may not need it.
        return argv
    return (found,) + argv[1:]


def _check_probe(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("probe: must be a list of \"host:port\" strings")
    for item in value:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"probe: {item!r} is not host:port")
    return tuple(value)


def from_mapping(data: dict[str, object]) -> Config:
    values: dict[str, object] = {}
    for key, value in data.items():
        if key not in _KNOWN:
            raise ConfigError(f"{key}: unknown key")
        if key in _STRING_KEYS:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{key}: must be a non-empty string")
            values[key] = value
        elif key in _ARGV_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{key}: must be a list of non-empty strings")
            values[key] = tuple(value)
        elif key in _NUMBER_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key}: must be a number")
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"{key}: must be a finite non-negative number")
            values[key] = float(value)
        elif key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: must be a positive integer")
            values[key] = value
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: must be true or false")
            values[key] = value
        elif key == "probe":
            values[key] = _check_probe(value)
    if values.get("restart_via", "command") not in ("command", "systemd"):
        raise ConfigError('restart_via: must be "command" or "systemd"')
    if "graceful_command" in values and not values["graceful_command"]:
        raise ConfigError("graceful_command: must not be empty")
    for key in ("md_store", "state_dir", "pid_file"):
        if key in values and not os.path.isabs(str(values[key])):
            raise ConfigError(f"{key}: must be an absolute path")
    cfg = dataclasses.replace(Config(), **values)  # type: ignore[arg-type]
    return dataclasses.replace(
        cfg,
        configtest_command=_resolve_argv("configtest_command", cfg.configtest_command),
        graceful_command=_resolve_argv("graceful_command", cfg.graceful_command),
    )


def load(path: str | None) -> Config:
    """Load `path`; None means the default file, whose absence means all defaults."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return from_mapping({})
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return from_mapping(data)
