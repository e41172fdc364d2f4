"""The broker's TOML configuration: every key, its type, default, range and meaning, in one place.

`Config`'s fields are the single source: the loader, the README's table (a test holds it
against them), the shipped commented configuration file and the manual page are all derived
from `KEYS`. Unknown keys, wrong types and values outside a key's range are refused at start
with a message that names the file and the key, so a typo never silently falls back to a
default on a production server.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DEFAULT_PATH = "/etc/apache-restart-broker.toml"

# argv[0] of the commands is resolved against this PATH at start, never the caller's.
COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MAX_LIST_ITEMS = 32        # probes, trust anchors, argv words
MAX_STRING_LEN = 4096      # any single string value


@dataclass(frozen=True)
class Key:
    """What one configuration key is: its kind, its range and what it means."""

    name: str
    kind: str                 # "string", "path", "optional-path", "choice", "argv", "number",
                              # "integer", "bool", "addresses", "paths"
    default: Any
    doc: str
    low: float | None = None  # numbers: inclusive range
    high: float | None = None
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        """The accepted values in words, as the README and the manual page print them."""
        if self.kind in ("number", "integer"):
            return f"{_fmt(self.low)}–{_fmt(self.high)}"
        if self.kind == "choice":
            return " or ".join(f'"{c}"' for c in self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "path":
            return "absolute path"
        if self.kind == "optional-path":
            return '"" or an absolute path'
        if self.kind == "argv":
            return f"list of at most {MAX_LIST_ITEMS} strings"
        if self.kind == "addresses":
            return f'at most {MAX_LIST_ITEMS} "host:port"'
        if self.kind == "paths":
            return f"at most {MAX_LIST_ITEMS} absolute paths"
        return "non-empty string"

    def default_toml(self) -> str:
        """The default as it would be written in the TOML file."""
        return toml_value(self.default)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def toml_value(value: Any) -> str:
    """`value` as a TOML literal: the one writer for the conffile, the manual, the installer
    and the test harness. Floats keep every digit (a whole number is written without ".0");
    strings are JSON strings (valid TOML basic strings) with DEL escaped too, which TOML
    requires and JSON does not."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


def _key(kind: str, default: Any, doc: str, low: float | None = None, high: float | None = None,
         choices: tuple[str, ...] = ()) -> Any:
    # The Key is completed with its name in KEYS below; the field keeps its default.
    return field(default=default, metadata={"key": (kind, doc, low, high, choices)})


@dataclass(frozen=True)
class Config:
    md_store: str = _key("path", "/etc/apache2/md", "mod_md's store directory (MDStoreDir)")
    restart_via: str = _key("choice", "command",
                            'how Apache is restarted: "command" runs configtest_command and '
                            'graceful_command; "systemd" reloads systemd_unit through systemd',
                            choices=("command", "systemd"))
    systemd_unit: str = _key("string", "apache2.service", 'unit to reload with restart_via = "systemd"')
    configtest_command: tuple[str, ...] = _key(
        "argv", ("apachectl", "configtest"),
        "config test argv, run before every restart (program resolved at start; [] skips it)")
    graceful_command: tuple[str, ...] = _key(
        "argv", ("apachectl", "graceful"), 'graceful restart argv (restart_via = "command")')
    pid_file: str = _key("path", "/run/apache2/apache2.pid",
                         "Apache's pid file: a stopped Apache is reported, never started")
    settle_seconds: float = _key("number", 30.0,
                                 "wait after the first request; later requests join the restart",
                                 0, 3600)
    min_interval_seconds: float = _key("number", 300.0, "least time between two restarts", 0, 86400)
    verify_timeout_seconds: float = _key(
        "number", 30.0, "how long to wait for the new certificate to be active and served", 0, 600)
    probe: tuple[str, ...] = _key(
        "addresses", (), '"host:port" TLS addresses to check after a restart ([] = off)')
    state_dir: str = _key("path", "/var/lib/apache-restart-broker",
                          "state across restarts of the broker")
    trust_anchors: tuple[str, ...] = _key(
        "paths", ("/etc/ssl/certs/ca-certificates.crt",),
        "PEM files of the roots a staged chain must verify to (add a private ACME CA here)")
    metrics_file: str = _key(
        "optional-path", "",
        "Prometheus text file written after each event and check "
        '("" = off; node-exporter reads /var/lib/prometheus/node-exporter/*.prom)')
    # Beyond the contract's keys:
    command_timeout_seconds: float = _key(
        "number", 60.0, "a command running longer is killed (its whole process group)", 1, 3600)
    polkit_timeout_seconds: float = _key(
        "number", 10.0, "polkit not answering in time means refusal", 1, 120)
    # Requests a caller (by uid) may send: a bucket of `rate_burst` refilled at `rate_per_second`.
    rate_burst: float = _key("number", 100.0,
                             "per-user token bucket size for requests (0: refuse every request)", 0, 100000)
    rate_per_second: float = _key("number", 2.0, "per-user token bucket refill rate (0: no refill)", 0, 10000)
    # Requests being authorized or checked at once; kept below dbus-daemon's 128 pending
    # replies per connection, which the broker's own polkit calls count against.
    max_in_flight: int = _key("integer", 64,
                              "requests being authorized at once; more get RateLimited", 1, 120)
    idle_exit_seconds: float = _key(
        "number", 0.0, "exit when idle this long (D-Bus activation starts it again); 0 = never",
        0, 86400)
    allow_interactive_authorization: bool = _key(
        "bool", False, "let polkit ask for a password when the caller allows it")


def _keys() -> dict[str, Key]:
    keys = {}
    for f in dataclasses.fields(Config):
        kind, doc, low, high, choices = f.metadata["key"]
        keys[f.name] = Key(f.name, kind, f.default, doc, low, high, choices)
    return keys


KEYS: Mapping[str, Key] = _keys()


def check_address(item: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError naming the problem."""
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # isdecimal() alone accepts other scripts' digits, which int() would read as a port.
    if (not sep or not host or not port.isascii() or not port.isdecimal() or len(port) > 5
            or not 0 < int(port) < 65536):
        raise ValueError(f"{item!r} is not host:port")
    if not host.isascii() or not host.isprintable() or any(c.isspace() for c in host):
        raise ValueError(f"{item!r}: the host must be printable ASCII")
    return host, int(port)


def _string(key: Key, value: object, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ConfigError(f"{key.name}: must be a non-empty string")
    if len(value) > MAX_STRING_LEN or not value.isprintable():
        raise ConfigError(f"{key.name}: must be printable and at most {MAX_STRING_LEN} characters")
    return value


def _string_list(key: Key, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key.name}: must be a list of non-empty strings")
    if len(value) > MAX_LIST_ITEMS:
        raise ConfigError(f"{key.name}: must have at most {MAX_LIST_ITEMS} entries")
    return tuple(_string(key, v) for v in value)


def _check_value(key: Key, value: object) -> object:
    """The value in its Config form; ConfigError naming the key when it is not acceptable."""
    if key.kind in ("string", "path", "optional-path", "choice"):
        text = _string(key, value, empty_ok=key.kind == "optional-path")
        if key.kind in ("path", "optional-path") and text and not os.path.isabs(text):
            raise ConfigError(f"{key.name}: must be an absolute path")
        if key.kind == "choice" and text not in key.choices:
            raise ConfigError(f"{key.name}: must be {key.range_text()}")
        return text
    if key.kind in ("number", "integer"):
        if key.kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{key.name}: must be an integer")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key.name}: must be a number")
        assert key.low is not None and key.high is not None
        if not math.isfinite(value) or not key.low <= value <= key.high:
            raise ConfigError(f"{key.name}: must be in the range {key.range_text()}")
        return value if key.kind == "integer" else float(value)
    if key.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key.name}: must be true or false")
        return value
    items = _string_list(key, value)
    if key.kind == "addresses":
        for item in items:
            try:
                check_address(item)
            except ValueError as e:
                raise ConfigError(f"{key.name}: {e}") from None
    if key.kind == "paths":
        for item in items:
            if not os.path.isabs(item):
                raise ConfigError(f"{key.name}: {item!r} is not an absolute path")
    return items


def _unknown(name: str) -> ConfigError:
    near = difflib.get_close_matches(name, list(KEYS), n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return ConfigError(f"{name}: unknown key{hint}")


def _resolve_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """Resolve argv[0] to an absolute path now, so that PATH at restart time cannot matter."""
    if not argv or os.path.isabs(argv[0]):
        return argv
    found = shutil.which(argv[0], path=COMMAND_PATH)
    # Not found: keep it; the restart reports the missing program.
    return argv if found is None else (found,) + argv[1:]


def from_mapping(data: Mapping[str, object]) -> Config:
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = KEYS.get(name)
        if key is None:
            raise _unknown(name)
        values[name] = _check_value(key, value)
    if "graceful_command" in values and not values["graceful_command"]:
        raise ConfigError("graceful_command: must not be empty")
    cfg = dataclasses.replace(Config(), **values)
    return dataclasses.replace(
        cfg,
        configtest_command=_resolve_argv(cfg.configtest_command),
        graceful_command=_resolve_argv(cfg.graceful_command),
    )


def load(path: str | None) -> Config:
    """Load `path`; None means the default file, whose absence means all defaults.

    Every ConfigError names the file.
    """
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
    try:
        return from_mapping(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
