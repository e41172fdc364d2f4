"""Builds the Debian package once per test session (scripts/build-deb) for the tiers that need it."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BUILD_DEB = REPO / "scripts" / "build-deb"
# Debian's own tools first: the test interpreter may sit in a venv or another Python's PATH.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}


def missing() -> str | None:
    """Why this machine cannot build the package, or None."""
    if os.geteuid() != 0:
        return "building the package needs root (it installs the build dependencies)"
    if not Path("/usr/bin/dpkg-buildpackage").exists() and not Path("/usr/bin/apt-get").exists():
        return "not a Debian system"
    return None


@functools.lru_cache(maxsize=1)
def built_deb() -> Path:
    """The .deb of this tree, built into a session-wide temporary folder."""
    out = Path(tempfile.mkdtemp(prefix="arb-deb-"))
    os.chmod(out, 0o755)
    r = subprocess.run([str(BUILD_DEB), str(out)], capture_output=True, text=True, env=ENV,
                       timeout=900, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/build-deb failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return Path(r.stdout.strip().splitlines()[-1])
