"""The Debian package as built from this tree: lintian-clean, exactly the expected files with
their modes, Debian's own libraries as dependencies, a conffile holding every key, manual pages
that render without a warning and name every option, and programs that run from it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from broker import __version__
from broker import config as broker_config
from broker import main as broker_main
from client import admin, hook
from tests.package.debbuild import ENV, REPO

pytestmark = pytest.mark.package

PKG = "apache-restart-broker"
CODE = f"/usr/share/{PKG}"
PROGRAMS = {"/usr/sbin/apache-restart-broker", "/usr/bin/apache-restart-hook", "/usr/bin/apache-restart"}
DATA = {
    "/etc/apache-restart-broker.toml",
    "/etc/apache2/conf-available/apache-restart-broker.conf",
    "/lib/systemd/system/apache-restart-broker.service",
    "/lib/systemd/system/apache-restart-broker-check.service",
    "/lib/systemd/system/apache-restart-broker-check.timer",
    "/usr/share/dbus-1/interfaces/org.masysma.ApacheRestart.xml",
    "/usr/share/dbus-1/system-services/org.masysma.ApacheRestart.service",
    "/usr/share/dbus-1/system.d/org.masysma.ApacheRestart.conf",
    "/usr/share/polkit-1/actions/org.masysma.apacherestart.policy",
    "/usr/share/polkit-1/rules.d/49-apache-restart-broker.rules",
    "/usr/share/polkit-1/rules.d/49-apache-restart-broker-monitor.rules",
    f"{CODE}/monitor-group.conf",
    f"/usr/share/doc/{PKG}/changelog.gz",
    f"/usr/share/doc/{PKG}/copyright",
    f"/usr/share/doc/{PKG}/examples/command-mode.conf",
    "/usr/share/man/man5/apache-restart-broker.toml.5.gz",
    "/usr/share/man/man8/apache-restart-broker.8.gz",
    "/usr/share/man/man8/apache-restart-hook.8.gz",
    "/usr/share/man/man8/apache-restart.8.gz",
    f"/usr/share/lintian/overrides/{PKG}",
}
EXECUTABLE = PROGRAMS | {f"/usr/share/python3/runtime.d/{PKG}.rtupdate"}
DEBIAN_LIBRARIES = ("python3-cryptography", "python3-openssl", "python3-prometheus-client",
                    "dbus", "polkitd", "ca-certificates", "apache2")


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300,
                          check=False, **kw)  # type: ignore[call-overload]


def code_files() -> set[str]:
    """Every module of the product, as the source tree has it."""
    return {f"{CODE}/{p.relative_to(REPO)}" for pkg in ("broker", "client")
            for p in (REPO / pkg).glob("*.py")}


def contents(deb: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode string, owner/group) from dpkg-deb --contents."""
    r = run(["dpkg-deb", "--contents", str(deb)])
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        out[path.removeprefix(".").rstrip("/") or "/"] = (mode, owner)
    return out


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    r = run(["dpkg-deb", "-x", str(deb), str(root)])
    assert r.returncode == 0, r.stderr
    return root


def field(deb: Path, name: str) -> str:
    r = run(["dpkg-deb", "--field", str(deb), name])
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_named_after_its_version(deb: Path) -> None:
    assert deb.name == f"{PKG}_{__version__}_all.deb"
    assert field(deb, "Version") == __version__
    assert field(deb, "Architecture") == "all"


def test_lintian_reports_no_error_and_no_warning(deb: Path) -> None:
    r = run(["lintian", "--pedantic", "--display-info", "--no-tag-display-limit", str(deb)])
    print(r.stdout)
    tags = [line for line in r.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert tags == [], r.stdout
    assert r.returncode == 0, r.stdout + r.stderr
    # An override says why, on the comment line above it.
    overrides = (REPO / "debian" / f"{PKG}.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line.strip() and not line.startswith("#"):
            assert i > 0 and overrides[i - 1].startswith("#"), f"override without a reason: {line}"


def test_holds_exactly_the_expected_files_with_their_modes(deb: Path) -> None:
    entries = contents(deb)
    files = {p for p, (mode, _o) in entries.items() if not mode.startswith("d")}
    expected = PROGRAMS | DATA | code_files() | {f"/usr/share/python3/runtime.d/{PKG}.rtupdate"}
    assert files == expected, (f"unexpected: {sorted(files - expected)}; "
                               f"missing: {sorted(expected - files)}")
    for path, (mode, owner) in entries.items():
        assert owner == "root/root", path
        if mode.startswith("d"):
            assert mode == "drwxr-xr-x", path
        elif path in EXECUTABLE:
            assert mode == "-rwxr-xr-x", path
        else:
            assert mode == "-rw-r--r--", path
    # The product's modules live only in the private directory; no harness, tests or benches.
    assert not any("dist-packages" in p or "site-packages" in p for p in entries)
    assert not any(re.search(r"/(harness|tests|bench)(/|$)", p) for p in entries)


def test_depends_on_debians_own_libraries(deb: Path) -> None:
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    for package in DEBIAN_LIBRARIES:
        assert package in depends, depends
    assert "python3-dbus-next | python3-dbus-fast" in depends
    assert any(d.startswith("python3") and ":any" in d or d.startswith("python3 ") for d in depends)


def test_conffiles_and_maintainer_scripts(deb: Path, tmp_path: Path) -> None:
    r = run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")])
    assert r.returncode == 0, r.stderr
    control = tmp_path / "control"
    assert (control / "conffiles").read_text().split() == [
        "/etc/apache-restart-broker.toml", "/etc/apache2/conf-available/apache-restart-broker.conf"]
    postinst = (control / "postinst").read_text()
    prerm = (control / "prerm").read_text()
    postrm = (control / "postrm").read_text()
    assert "apache2_invoke enconf apache-restart-broker" in postinst
    assert "apache2_invoke disconf apache-restart-broker" in prerm
    assert "apache2_invoke disconf apache-restart-broker" in postrm
    assert re.search(r'"purge".*\n(.*\n)*?\s*rm -rf /var/lib/apache-restart-broker\n', postrm)
    # Only the check timer is enabled; the broker itself is D-Bus activated.
    assert "enable 'apache-restart-broker-check.timer'" in postinst
    assert "enable 'apache-restart-broker.service'" not in postinst
    # Units are debhelper's business: our own parts of the scripts call no systemctl.
    for name in ("postinst", "prerm", "postrm"):
        own = (REPO / "debian" / f"{PKG}.{name}").read_text()
        assert "systemctl" not in own, name


def test_shipped_config_holds_every_key_and_lets_the_broker_exit_when_idle(unpacked: Path) -> None:
    text = (unpacked / "etc/apache-restart-broker.toml").read_text()
    data = tomllib.loads(text)
    assert data == {"restart_via": "systemd", "idle_exit_seconds": 60}
    cfg = broker_config.from_mapping(data)
    assert cfg.idle_exit_seconds == 60 and cfg.restart_via == "systemd"
    for name, key in broker_config.KEYS.items():
        if name in data:
            continue
        line = f"#{name} = {key.default_toml()}"
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
        # Uncommenting any default line gives a file the broker accepts, with the same value.
        assert broker_config.from_mapping(tomllib.loads(line[1:])) == \
            broker_config.from_mapping({}), name
        assert f"Range: {key.range_text()}." in text.replace("\n# ", " "), name


def test_programs_point_at_the_packaged_code(unpacked: Path) -> None:
    unit = (unpacked / "lib/systemd/system/apache-restart-broker.service").read_text()
    assert re.search(r"^ExecStart=/usr/sbin/apache-restart-broker$", unit, re.MULTILINE)
    check = (unpacked / "lib/systemd/system/apache-restart-broker-check.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/apache-restart check-all$", check, re.MULTILINE)
    assert "/usr/local" not in unit + check
    snippet = (unpacked / "etc/apache2/conf-available/apache-restart-broker.conf").read_text()
    assert re.search(r"^\s*MDMessageCmd /usr/bin/apache-restart-hook\s*$", snippet, re.MULTILINE)
    for program in PROGRAMS:
        text = (unpacked / program.lstrip("/")).read_text()
        assert text.startswith("#!/usr/bin/python3 -I\n"), program
        assert f'sys.path.insert(0, "{CODE}")' in text, program


def _run_launcher(unpacked: Path, program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A launcher of the package run by Debian's python3, with its code where it was unpacked."""
    text = (unpacked / program.lstrip("/")).read_text().replace(f'"{CODE}"', repr(str(unpacked) + CODE))
    return run(["/usr/bin/python3", "-I", "-c", text, *args])


def test_programs_run_with_debians_python_and_libraries(unpacked: Path) -> None:
    r = _run_launcher(unpacked, "/usr/bin/apache-restart-hook", "renewing", "example.org")
    assert (r.returncode, r.stderr) == (0, "apache-restart-hook: renewing example.org: renewal starting; "
                                           "nothing to do\n")
    r = _run_launcher(unpacked, "/usr/bin/apache-restart", "--version")
    assert r.returncode == 0 and __version__ in r.stdout, r.stdout + r.stderr
    r = _run_launcher(unpacked, "/usr/sbin/apache-restart-broker", "--config",
                      str(unpacked / "etc/apache-restart-broker.toml"), "--bus-address", "unix:path=/nonexistent")
    # The config is accepted; only the bus is missing.
    assert r.returncode == 1 and "configuration" not in r.stderr, r.stderr
    # The D-Bus and crypto libraries it imported are Debian's.
    probe = ("import sys; sys.path.insert(0, %r); from broker import dbuslib; import cryptography, OpenSSL; "
             "print(sys.modules[dbuslib.LIB_NAME].__file__, cryptography.__file__, OpenSSL.__file__)"
             % (str(unpacked) + CODE))
    r = run(["/usr/bin/python3", "-I", "-c", probe])
    assert r.returncode == 0, r.stderr
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in r.stdout.split()), r.stdout


def _man_text(page: Path) -> str:
    r = run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", str(page)],
            )
    assert r.returncode == 0 and r.stderr == "", f"{page.name}: {r.stderr}"
    return re.sub(r".\x08", "", r.stdout)


def test_manual_pages_render_cleanly_and_follow_the_parsers(unpacked: Path) -> None:
    man = unpacked / "usr/share/man"
    broker_page = _man_text(man / "man8/apache-restart-broker.8.gz")
    for action in broker_main.build_parser()._actions:
        for option in action.option_strings:
            assert option in broker_page, option
    admin_page = _man_text(man / "man8/apache-restart.8.gz")
    parser = admin._parser()
    for action in parser._actions:
        for option in action.option_strings:
            assert option in admin_page, option
        for command in getattr(action, "choices", None) or {}:
            assert re.search(rf"^\s+{re.escape(command)}\b", admin_page, re.MULTILINE), command
    hook_page = _man_text(man / "man8/apache-restart-hook.8.gz")
    assert "MDMessageCmd /usr/bin/apache-restart-hook" in hook_page
    for option in re.findall(r"\[(--[\w-]+)", hook.USAGE) + ["--help", "--version"]:
        assert option in hook_page, option
    for reason, _ in hook.REASONS:
        assert re.search(rf"^\s+{re.escape(reason)}$", hook_page, re.MULTILINE), reason
    assert "75" in hook_page and "syslog" in hook_page
    # man may break a line after a path's hyphen; rejoin, then read it as one line.
    config_page = re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", _man_text(man / "man5/apache-restart-broker.toml.5.gz")))
    for name, key in broker_config.KEYS.items():
        assert f"{name} " in config_page, name
        assert f"Default: {key.default_toml()}" in config_page, name


def test_build_refuses_a_changelog_behind_the_version(tmp_path: Path) -> None:
    """The package version comes from broker/__init__.py; a release without its changelog
    entry is refused before anything is built."""
    tree = tmp_path / "tree"
    r = run(["sh", "-c", "tar -C \"$0\" -cf - broker client deploy dbus polkit systemd scripts debian"
             " | tar -C \"$1\" -xf -", str(REPO), str(tree.mkdir() or tree)])
    assert r.returncode == 0, r.stderr
    init = tree / "broker/__init__.py"
    init.write_text(init.read_text().replace(f'"{__version__}"', '"99.0.0"'))
    r = run([str(tree / "scripts/build-deb"), str(tmp_path / "out")])
    assert r.returncode == 1
    assert "debian/changelog is at" in r.stderr and "99.0.0" in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*.deb"))


def test_make_deb_target_runs_the_build_script() -> None:
    makefile = (REPO / "Makefile").read_text()
    m = re.search(r"^deb:\n\t(.+)$", makefile, re.MULTILINE)
    assert m and shlex.split(m.group(1)) == ["./scripts/build-deb"]
