"""The configuration loader: every key's type and range, unknown keys, and messages that name
the file and the key."""

import dataclasses
import re
from pathlib import Path

import pytest

from broker import config
from broker.config import KEYS, Config, ConfigError, from_mapping, load

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_are_within_their_own_ranges():
    # Every default must load when written out explicitly: the shipped file writes them.
    data = {}
    for key in KEYS.values():
        value = key.default
        data[key.name] = list(value) if isinstance(value, tuple) else value
    assert from_mapping(data).settle_seconds == Config().settle_seconds


def test_keys_are_the_dataclass_fields():
    assert list(KEYS) == [f.name for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("name", [k.name for k in KEYS.values() if k.kind in ("number", "integer")])
def test_each_number_is_refused_just_outside_its_range(name):
    key = KEYS[name]
    for bad in (key.low - 1, key.high * 2 + 1, float("nan"), float("inf"), -0.5):
        if key.kind == "integer" and isinstance(bad, float):
            bad_value = bad
        else:
            bad_value = bad
        with pytest.raises(ConfigError, match=rf"^{name}: must be "):
            from_mapping({name: bad_value})
    assert getattr(from_mapping({name: key.high}), name) == key.high
    assert getattr(from_mapping({name: key.low}), name) == key.low


@pytest.mark.parametrize("name,value", [
    ("settle_seconds", 1e14),
    ("min_interval_seconds", 1e300),
    ("command_timeout_seconds", 0),
    ("max_in_flight", 1000),
    ("polkit_timeout_seconds", 0),
])
def test_absurd_values_from_the_issue(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}: must be in the range"):
        from_mapping({name: value})


@pytest.mark.parametrize("probe", ["127.0.0.1:\u0664\u0664\u0663", "localhost:443\n", "host:0", "host:65536",
                                   ":443", "host", "ho st:443", "h\x1bost:443", "host:+443", "host:00000443"])
def test_probe_addresses_are_checked(probe):
    with pytest.raises(ConfigError, match=r"^probe: "):
        from_mapping({"probe": [probe]})


def test_good_probe_addresses():
    cfg = from_mapping({"probe": ["127.0.0.1:443", "[::1]:8443", "www.example.org:443"]})
    assert cfg.probe == ("127.0.0.1:443", "[::1]:8443", "www.example.org:443")


@pytest.mark.parametrize("name,value,problem", [
    ("md_store", "relative/md", "must be an absolute path"),
    ("md_store", 3, "must be a non-empty string"),
    ("md_store", "", "must be a non-empty string"),
    ("state_dir", "/var/lib/x\x1b[2J", "must be printable"),
    ("restart_via", "sudo", 'must be "command" or "systemd"'),
    ("graceful_command", [], "must not be empty"),
    ("graceful_command", "apachectl graceful", "must be a list of non-empty strings"),
    ("configtest_command", ["apachectl", ""], "must be a list of non-empty strings"),
    ("settle_seconds", "30", "must be a number"),
    ("settle_seconds", True, "must be a number"),
    ("max_in_flight", 2.5, "must be an integer"),
    ("allow_interactive_authorization", 1, "must be true or false"),
    ("trust_anchors", ["ca.pem"], "is not an absolute path"),
    ("trust_anchors", ["/x.pem"] * 33, "at most 32"),
    ("probe", ["127.0.0.1:443"] * 33, "at most 32"),
])
def test_wrong_types_and_values_name_the_key(name, value, problem):
    with pytest.raises(ConfigError) as e:
        from_mapping({name: value})
    assert str(e.value).startswith(f"{name}: ")
    assert problem in str(e.value)


def test_configtest_may_be_empty():
    assert from_mapping({"configtest_command": []}).configtest_command == ()


def test_unknown_key_suggests_the_nearest(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text("setle_seconds = 10\n")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert str(e.value) == f"{path}: setle_seconds: unknown key (did you mean settle_seconds?)"


def test_unknown_key_without_a_near_one():
    with pytest.raises(ConfigError, match=r"^frobnicate: unknown key$"):
        from_mapping({"frobnicate": 1})


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text("settle_seconds = -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: settle_seconds: must be in the range 0–3600$"):
        load(str(path))
    path.write_text("settle_seconds = \n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid TOML"):
        load(str(path))
    with pytest.raises(ConfigError, match=r"no such file"):
        load(str(tmp_path / "missing.toml"))


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert load(None) == from_mapping({})


def test_commands_are_resolved_against_a_fixed_path(tmp_path):
    cfg = from_mapping({"graceful_command": ["true", "x"]})
    assert cfg.graceful_command[0].startswith("/") and cfg.graceful_command[1:] == ("x",)
    assert from_mapping({"graceful_command": ["no-such-program-here"]}).graceful_command == (
        "no-such-program-here",)


def _readme_config_rows() -> dict[str, tuple[str, str]]:
    """key -> (default, range) from the README's configuration table."""
    text = README.read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`") and not cells[0].startswith("`key"):
            for name in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[name] = (cells[1], cells[2])
    return rows


def test_readme_table_matches_the_keys():
    rows = _readme_config_rows()
    assert sorted(rows) == sorted(KEYS)
    for name, key in KEYS.items():
        default, rng = rows[name]
        assert default == f"`{key.default_toml()}`", name
        assert rng == key.range_text(), name


# -- the one TOML writer (conffile, manual, installer, test harness) -------------------------------

@pytest.mark.parametrize("value", [
    True, False, 0, -3, 2.0, 0.1, 1e-7, 1e300, 123456.789012345,
    "", 'quote " and backslash \\', "newline\n tab\t nul\x00 del\x7f esc\x1b", "non-ASCII é 😀",
    ["a", "b"], (1, 2.5), [],
])
def test_toml_value_reads_back_as_written(value):
    import tomllib
    read = tomllib.loads(f"k = {config.toml_value(value)}")["k"]
    assert read == (list(value) if isinstance(value, tuple) else value)


def test_toml_value_of_every_default_loads_back_as_the_defaults(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text("".join(f"{name} = {key.default_toml()}\n" for name, key in KEYS.items()))
    assert load(str(path)) == from_mapping({})


def test_toml_value_refuses_what_toml_cannot_hold():
    with pytest.raises(TypeError):
        config.toml_value({"a": 1})
