"""The package tier: build the .deb from this tree, lint it and look inside (root, Debian 12).

Under ./scripts/test (ARB_TIERS_REQUIRED=1) a machine that cannot build it fails the tier;
elsewhere the tests are skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiers
from tests.package import debbuild


@pytest.fixture(scope="session")
def deb() -> Path:
    why = debbuild.missing()
    if why:
        tiers.unavailable(why)
    return debbuild.built_deb()
