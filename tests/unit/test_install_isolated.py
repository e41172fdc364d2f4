"""scripts/install runs Python as root: never with a directory that others control on the import
path (an attacker's `pip.py` in the administrator's current directory would run as root)."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def load_installer(monkeypatch):
    loader = importlib.machinery.SourceFileLoader("arb_install", str(REPO / "scripts" / "install"))
    spec = importlib.util.spec_from_loader("arb_install", loader)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "arb_install", module)  # its dataclasses look it up
    loader.exec_module(module)
    return module


def test_every_python_child_is_isolated_and_starts_in_a_root_owned_directory(tmp_path, monkeypatch):
    install = load_installer(monkeypatch)
    opt = tmp_path / "opt"
    monkeypatch.setattr(install, "OPT_DIR", str(opt))
    monkeypatch.setattr(install, "VENV_DIR", str(opt / "venv"))
    # The administrator runs the installer from a directory another user can write.
    planted = tmp_path / "somewhere"
    planted.mkdir()
    planted.chmod(0o1777)
    (planted / "pip.py").write_text("raise SystemExit('planted pip ran')\n")
    monkeypatch.chdir(planted)
    calls: list[tuple[list[str], object]] = []

    def record(argv, **kwargs):
        calls.append((list(argv), kwargs.get("cwd")))
        out = "3 11\n" if "-c" in argv and "sys.version_info" in " ".join(argv) else ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(install.subprocess, "run", record)
    args = argparse.Namespace(source=str(REPO), destdir="", apache_user="www-data", restart_via=None,
                              pip_arg=[], purge=False, layout=install.LAYOUT.name, monitor_group=None)
    installer = install.Installer(args)
    with pytest.raises(install.InstallError, match="missing after pip install"):
        installer.make_venv()

    pythons = 0
    for argv, cwd in calls:
        if "--" in argv:  # runuser -u USER -- PROGRAM ...
            argv = argv[argv.index("--") + 1:]
        if os.path.basename(argv[0]).startswith("python"):
            pythons += 1
            assert argv[1] == "-I", argv
        assert cwd is not None, argv
        st = os.stat(cwd)
        assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), (argv, cwd)
        assert Path(cwd).resolve() != planted.resolve()
    assert pythons >= 3  # the version probe, the venv, pip


def test_the_installer_itself_runs_isolated():
    first = (REPO / "scripts" / "install").read_text().splitlines()[0]
    assert first.split()[1:] == ["-I"], first
