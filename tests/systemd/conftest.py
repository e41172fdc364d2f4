"""Fixtures of the systemd tier: one booted bookworm container per module (see harness/nspawn.py).

Needs root, systemd-nspawn (Debian: systemd-container), mmdebstrap and zstd, and the first run of a
week needs the Debian mirror and PyPI (the root file system and the wheelhouse are cached under
/var/cache/apache-restart-broker-test/). Where something is missing the tests are skipped with the
reason. With ARB_TIERS_REQUIRED=1 the missing host packages are installed first (never upgrading an
installed package: see harness.nspawn.install_host_tools), and anything still missing fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import nspawn
from tests import tiers
from harness.procs import HarnessError

REPO = Path(__file__).resolve().parent.parent.parent

# Phase -> seconds, and other measurements (name -> text), printed at the end of the session.
TIMINGS: dict[str, float] = {}
RESULTS: dict[str, str] = {}
# The container of the running module, for log dumps of failed tests.
CURRENT: list[nspawn.Container] = []


def required() -> bool:
    """May this tier install its host tools? Only where every tier is required (the suite)."""
    return tiers.required()


skip_or_fail = tiers.unavailable


def note(name: str, seconds: float) -> None:
    TIMINGS[name] = seconds


def note_result(name: str, value: str) -> None:
    RESULTS[name] = value


@pytest.fixture(scope="session")
def host_ready() -> None:
    missing = nspawn.missing_prerequisites()
    if missing and "root" not in missing and required():
        try:
            installed = nspawn.install_host_tools()
        except HarnessError as e:
            pytest.fail(str(e), pytrace=False)
        if installed:
            print(f"installed on the host: {' '.join(installed)}")
        missing = nspawn.missing_prerequisites()
    if missing:
        skip_or_fail("the systemd tier needs " + ", ".join(missing)
                     + f" (Debian: {' '.join(nspawn.HOST_PACKAGES)}; {tiers.REQUIRED_ENV}=1 installs them)")


@pytest.fixture(scope="session")
def rootfs_and_wheels(host_ready: None) -> tuple[Path, Path]:
    t0 = time.monotonic()
    try:
        base = nspawn.ensure_rootfs()
        note("rootfs (cached or built)", time.monotonic() - t0)
        t1 = time.monotonic()
        wheels = nspawn.ensure_wheelhouse(REPO)
        note("wheelhouse (cached or built)", time.monotonic() - t1)
    except (HarnessError, OSError) as e:
        skip_or_fail(f"cannot prepare the container image (network to the Debian mirror and PyPI "
                     f"is needed once a week): {e}")
    return base, wheels


@pytest.fixture(scope="module")
def booted(rootfs_and_wheels: tuple[Path, Path]) -> Iterator[nspawn.Container]:
    """A container booted to `running`, the project's source at /src and the wheels at /wheels."""
    base, wheels = rootfs_and_wheels
    container = nspawn.Container(base, {wheels: "/wheels", REPO: "/src"})
    CURRENT.append(container)
    try:
        with container:
            note("boot to running", container.timings["boot"])
            yield container
    finally:
        CURRENT.remove(container)
        note("poweroff", container.timings.get("poweroff", 0.0))
        note("teardown (poweroff, cgroups, files)", container.timings.get("teardown", 0.0))
    assert container.leftovers == [], f"left after the teardown: {container.leftovers}"
    assert not container.killed, (f"the container did not power off within {nspawn.STOP_TIMEOUT:g} s "
                                  "(a unit that does not stop in time?): it was killed")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call") and CURRENT:
        report.sections.append(("container logs", CURRENT[-1].dump_logs()))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "systemd tier timings")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:>52}: {seconds:7.2f} s")
    for name, value in RESULTS.items():
        terminalreporter.write_sep("-", name)
        terminalreporter.write_line(value)
