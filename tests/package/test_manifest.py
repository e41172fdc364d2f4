"""One manifest for both installers: scripts/install (other distributions) and the Debian package
put the same files in their places, with the programs' paths of their own layout."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from broker import config as broker_config
from deploy import conffile, manifest

REPO = Path(__file__).resolve().parent.parent.parent
INSTALL = REPO / "scripts" / "install"


def stage(tmp_path: Path, *args: str) -> Path:
    dest = tmp_path / "stage"
    r = subprocess.run([sys.executable, str(INSTALL), "--destdir", str(dest), *args],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


def test_render_writes_each_layouts_program_paths() -> None:
    unit = next(f for f in manifest.DATA_FILES if f.source == "systemd/apache-restart-broker.service")
    text = (REPO / unit.source).read_text()
    assert "ExecStart=/usr/local/sbin/apache-restart-broker\n" in text
    assert manifest.render(unit, text, manifest.LOCAL, "www-data") == text
    debian = manifest.render(unit, text, manifest.DEBIAN, "www-data")
    assert "ExecStart=/usr/sbin/apache-restart-broker\n" in debian and "/usr/local" not in debian
    # "/usr/local/bin/apache-restart" is not a prefix match inside the hook's path.
    assert manifest.render(unit, "x /usr/local/bin/apache-restart-hook y", manifest.DEBIAN, "u") == \
        "x /usr/bin/apache-restart-hook y"


def test_render_refuses_a_path_of_the_other_layout() -> None:
    unit = next(f for f in manifest.DATA_FILES if f.source == "systemd/apache-restart-broker.service")
    with pytest.raises(manifest.ManifestError, match="still names /usr/sbin/apache-restart-broker"):
        manifest.render(unit, "ExecStart=/usr/sbin/apache-restart-broker\n", manifest.LOCAL, "www-data")


def test_both_installers_ship_every_file_of_the_manifest(tmp_path: Path) -> None:
    local = stage(tmp_path / "local")
    debian = stage(tmp_path / "debian", "--layout", "debian")
    for item in manifest.DATA_FILES:
        a = (local / item.target_in(manifest.LOCAL).lstrip("/")).read_text()
        b = (debian / item.target_in(manifest.DEBIAN).lstrip("/")).read_text()
        for program in manifest.PROGRAMS:
            a = a.replace(manifest.program_path(manifest.LOCAL, program),
                          manifest.program_path(manifest.DEBIAN, program))
        # The one other difference: the package's units name its manual pages.
        b = re.sub(r"^Documentation=man:.*\n", "", b, flags=re.M)
        assert a == b, item.source
    for layout, root in ((manifest.LOCAL, local), (manifest.DEBIAN, debian)):
        snippet = (root / manifest.APACHE_CONF.lstrip("/")).read_text()
        assert f"MDMessageCmd {manifest.hook_path(layout)}\n" in snippet
        assert (root / manifest.CONFIG_FILE.lstrip("/")).is_file()
    # The packaged code is the product's modules and nothing else.
    code = {p.relative_to(debian / manifest.DEBIAN.code_dir.lstrip("/")).parts[0]
            for p in (debian / manifest.DEBIAN.code_dir.lstrip("/")).rglob("*.py")}
    assert code == set(manifest.CODE_PACKAGES)


def _installer() -> object:
    loader = importlib.machinery.SourceFileLoader("arb_install", str(INSTALL))
    spec = importlib.util.spec_from_loader("arb_install", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _config(text: str) -> broker_config.Config:
    return broker_config.from_mapping(tomllib.loads(text))


def test_installer_config_lets_the_broker_exit_when_idle_only_where_activation_restarts_it() -> None:
    inst = _installer()
    args = argparse.Namespace(source=str(REPO), destdir="", apache_user="www-data", restart_via=None,
                              pip_arg=None, purge=False, layout="local", monitor_group=None)
    live = inst.Installer(args)  # type: ignore[attr-defined]
    live.systemd_booted = False
    text = live.config_text("command")
    assert _config(text).idle_exit_seconds == 0       # nothing would start it again
    live.systemd_booted = True
    assert _config(live.config_text("systemd")).idle_exit_seconds == conffile.ACTIVATED_IDLE_EXIT_SECONDS
    for name in broker_config.KEYS:
        assert f"{name} = " in text, name


def test_installer_stages_the_same_commented_file(tmp_path: Path) -> None:
    text = (stage(tmp_path) / manifest.CONFIG_FILE.lstrip("/")).read_text()
    cfg = _config(text)
    assert (cfg.restart_via, cfg.idle_exit_seconds) == ("systemd", 60)
    for name, key in broker_config.KEYS.items():
        assert f"Range: {key.range_text()}." in text.replace("\n# ", " "), name


def test_the_package_ships_the_monitoring_policy_as_a_file_of_its_own(tmp_path: Path) -> None:
    """The packaged bus policy keeps the monitoring block closed (dbus-daemon warns about an
    unknown group); postinst installs the template, a complete policy for the group alone."""
    debian = stage(tmp_path / "debian", "--layout", "debian")
    policy = (debian / manifest.BUS_POLICY.target_in(manifest.DEBIAN).lstrip("/")).read_text()
    assert "MONITOR-GROUP-BEGIN" in policy
    template = (debian / manifest.MONITOR_POLICY_TEMPLATE.lstrip("/")).read_text()
    assert '<policy group="nagios">' in template and "MONITOR-GROUP" not in template
    assert 'send_member="GetStatus"' in template and "RequestGracefulRestart" not in template
    lint = subprocess.run(["xmllint", "--noout", "-"], input=template, capture_output=True, text=True,
                          check=False)
    assert lint.returncode == 0, lint.stderr
    postinst = (REPO / "debian" / "apache-restart-broker.postinst").read_text()
    postrm = (REPO / "debian" / "apache-restart-broker.postrm").read_text()
    assert f"{manifest.MONITOR_POLICY_TEMPLATE} \"$MONITOR_POLICY\"" in postinst
    assert f"MONITOR_POLICY={manifest.MONITOR_POLICY}\n" in postinst
    assert f"rm -f {manifest.MONITOR_POLICY}\n" in postrm
    # scripts/install opens the block in place for the group it is given.
    local = (stage(tmp_path / "local", "--monitor-group", "icinga")
             / manifest.BUS_POLICY.target_in(manifest.LOCAL).lstrip("/")).read_text()
    assert "MONITOR-GROUP" not in local and '<policy group="icinga">' in local
    assert manifest.monitor_policy(policy, "icinga").count('<policy group="icinga">') == 1


@pytest.mark.parametrize("unit", [f for f in manifest.DATA_FILES if f.source.startswith("systemd/")],
                         ids=lambda f: f.source)
def test_units_name_their_manual_pages_where_the_layout_installs_them(unit) -> None:
    """`systemctl help UNIT` shows Documentation=; `systemd-analyze verify` fails a unit that
    names a page which is not there. So the package's units name pages it ships, and the venv
    installer's units (no manual pages) name none."""
    text = (REPO / unit.source).read_text()
    assert "Documentation=" not in manifest.render(unit, text, manifest.LOCAL, "www-data")
    debian = manifest.render(unit, text, manifest.DEBIAN, "www-data")
    pages = re.findall(r"^Documentation=.*", debian, flags=re.M)
    assert len(pages) == 1, debian
    named = re.findall(r"man:([\w.-]+)\((\d)\)", pages[0])
    assert named and all(manifest.manual_pages().get(name) == int(sec) for name, sec in named), pages
