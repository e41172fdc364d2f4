"""Fixtures for the real-stack tier (see stack.py): the stack per test, log dumps on failure.

Where root, dbus-daemon, polkitd, runuser or the users www-data and nobody are missing, the tests
are skipped with the reason; with ARB_TIERS_REQUIRED=1 (./scripts/test) they fail instead, so a machine
that cannot run them never passes as green.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.procs import kill_marked, make_dir, marked_pids
from tests.realstack.stack import RealStack, check_reachable, missing_requirements, skip_or_fail


@pytest.fixture(autouse=True)
def _realstack_requirements() -> None:
    missing = missing_requirements()
    if missing:
        skip_or_fail("the real-stack tests need " + ", ".join(missing)
                     + " (Debian: dbus-daemon dbus-bin polkitd util-linux)")


@dataclass
class _Started:
    stack: RealStack
    leftovers: list[int] = field(default_factory=list)


@pytest.fixture
def realstack(request: pytest.FixtureRequest) -> Iterator[Callable[..., RealStack]]:
    """``realstack(policy_files=None, **broker_config)`` starts a stack for this test.

    ``policy_files`` replace the shipped bus policy (None: the shipped one); ``broker_config``
    overrides keys of the broker's configuration. Everything started is stopped after the test,
    also when it failed or a start went wrong half-way; then no process with the run's marker
    may be left.
    """
    started: list[_Started] = []
    request.node.realstacks = started
    with ExitStack() as outer:

        def start(policy_files: Sequence[Path] | None = None, **broker_config: Any) -> RealStack:
            root = make_dir(Path(tempfile.mkdtemp(prefix="arb-realstack-")))
            outer.callback(shutil.rmtree, root, ignore_errors=True)
            check_reachable(root)
            run_id = f"realstack-{uuid.uuid4().hex}"
            processes = ExitStack()
            entry = _Started(RealStack(root, run_id, processes))
            # Last: whatever still carries the run's marker is killed and listed.
            outer.callback(lambda: entry.leftovers.extend(kill_marked(run_id)))
            outer.enter_context(processes)
            started.append(entry)
            entry.stack.start(policy_files, broker_config)
            return entry.stack

        yield start
    for entry in started:
        assert entry.leftovers == [], f"processes left after the teardown: {entry.leftovers}"
        assert marked_pids(entry.stack.run_id) == []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for entry in getattr(item, "realstacks", []):
            report.sections.append((f"real-stack logs ({entry.stack.root})", entry.stack.dump_logs()))
    return report
