"""Fixtures for the end-to-end tier: the harness's stack, a folder www-data can reach, log dumps.

These tests need root and Debian's apache2 (with mod_md), pebble, dbus and polkitd. Where that is
missing they are skipped with the reason; with ARB_TIERS_REQUIRED=1 (./scripts/test) they fail instead, so a
machine that cannot run them never passes as green.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from harness import Stack, marked_pids, running_stack
from harness.procs import make_dir
from tests import tiers

REQUIRED_PROGRAMS = ("apache2", "pebble", "dbus-daemon", "dbus-send", "gdbus", "unshare", "setpriv")
REQUIRED_FILES = ("/usr/lib/polkit-1/polkitd", "/usr/lib/apache2/modules/mod_md.so")
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _missing() -> list[str]:
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=SEARCH_PATH) is None]
    missing += [f for f in REQUIRED_FILES if not os.path.exists(f)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@pytest.fixture(autouse=True)
def _e2e_requirements() -> None:
    missing = _missing()
    if missing:
        reason = "end-to-end tests need " + ", ".join(missing) + " (Debian: apache2 pebble dbus polkitd)"
        tiers.unavailable(reason)


@pytest.fixture
def www_tmp() -> Iterator[Path]:
    """A fresh 0755 folder under the system's temp dir (pytest's tmp_path is 0700: www-data cannot enter)."""
    path = make_dir(Path(tempfile.mkdtemp(prefix="arb-e2e-")))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_stack(request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """``start_stack(**StackOptions fields)`` starts a stack that is stopped after the test.

    When the test fails, the tail of every daemon's log is added to its report; after the test,
    nothing the stack started may be left.
    """
    stacks: list[Stack] = []
    request.node.harness_stacks = stacks
    with ExitStack() as cleanup:

        def start(**options: Any) -> Stack:
            stack = cleanup.enter_context(running_stack(**options))
            stacks.append(stack)
            return stack

        yield start
    for stack in stacks:
        assert stack.leftovers == [], "the stack's teardown left processes for the final sweep"
        assert marked_pids(stack.run_id) == []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        for stack in getattr(item, "harness_stacks", []):
            report.sections.append((f"harness logs ({stack.root})", stack.dump_logs()))
    return report
