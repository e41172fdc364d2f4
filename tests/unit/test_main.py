"""The daemon's command line: --check-config, --version and the settings it announces."""

import subprocess
import sys
from pathlib import Path

import pytest

import broker
from broker import config, main
from harness import storefactory

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, module: str = "broker.main") -> subprocess.CompletedProcess:
    # A process of its own: argparse exits, and the broker must not need a bus for any of this.
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_check_config_accepts_a_good_file_without_starting(tmp_path):
    store = tmp_path / "md"
    store.mkdir()
    anchor = storefactory.ca_file(tmp_path)
    path = tmp_path / "broker.toml"
    path.write_text(f'md_store = "{store}"\nsettle_seconds = 10\nprobe = ["127.0.0.1:443"]\n'
                    f'restart_via = "systemd"\nconfigtest_command = ["{sys.executable}", "-V"]\n'
                    f'trust_anchors = ["{anchor}"]\n')
    done = _run("--check-config", "--config", str(path), "--bus-address", "unix:path=/nonexistent")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"{path}: ok: store {store}, restart via systemd (apache2.service), "
                           f"settle 10 s, min interval 300 s, probes 127.0.0.1:443, trust anchors {anchor}\n")
    assert done.stderr == ""


def test_check_config_warns_about_what_the_host_lacks(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text(f'md_store = "{tmp_path}/no-store"\nconfigtest_command = ["/nonexistent/apachectl", "-t"]\n'
                    f'graceful_command = ["{sys.executable}", "-V"]\n'
                    f'trust_anchors = ["{storefactory.ca_file(tmp_path)}"]\n')
    done = _run("--check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr  # valid: the broker would start
    assert done.stderr.splitlines() == [
        f"apache-restart-broker: warning: md_store {tmp_path}/no-store is not a directory (yet): "
        "nothing will be found to activate",
        "apache-restart-broker: warning: configtest_command: /nonexistent/apachectl is not an executable "
        f"program here (PATH {config.COMMAND_PATH})",
    ]


@pytest.mark.parametrize("content,why", [(None, "cannot read it"), ("", "holds no PEM certificate")])
def test_check_config_fails_for_trust_anchors_the_broker_could_not_start_with(tmp_path, content, why):
    """The broker reads its trust anchors at start and stops without them: so does the check."""
    anchor = tmp_path / "ca.pem"
    if content is not None:
        anchor.write_text(content)
    path = tmp_path / "broker.toml"
    path.write_text(f'trust_anchors = ["{anchor}"]\n')
    done = _run("--check-config", "--config", str(path))
    assert done.returncode == main.EXIT_CONFIG
    assert done.stdout == ""
    assert done.stderr.startswith(f"apache-restart-broker: configuration: trust_anchors: {anchor}: {why}")


def test_check_config_names_the_typo_and_exits_non_zero(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text("setle_seconds = 10\n")
    done = _run("--check-config", "--config", str(path))
    assert done.returncode == main.EXIT_CONFIG == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"apache-restart-broker: configuration: {path}: ")
    assert "setle_seconds" in done.stderr and "did you mean settle_seconds?" in done.stderr
    assert not done.stderr.startswith("<")  # for a terminal, not a log priority prefix


def test_check_config_of_a_missing_file(tmp_path):
    done = _run("--check-config", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "no such file" in done.stderr


@pytest.mark.parametrize("module,program", [("broker.main", "apache-restart-broker"),
                                            ("client.hook", "apache-restart-hook"),
                                            ("client.admin", "apache-restart")])
def test_version_names_the_program(module, program):
    done = _run("--version", module=module)
    assert done.returncode == 0
    assert done.stdout == f"{program} {broker.__version__}\n"


def test_settings_line_lists_what_matters():
    cfg = config.from_mapping({"probe": [], "trust_anchors": ["/a.pem", "/b.pem"], "settle_seconds": 2.5,
                               "min_interval_seconds": 0})
    line = main.settings_line(cfg)
    assert line == ("store /etc/apache2/md, restart via command, settle 2.5 s, min interval 0 s, "
                    "probes off, trust anchors /a.pem, /b.pem")
