"""Skip or fail when a real component a test needs is missing: one rule for every tier.

`./scripts/test` installs every component the suite uses and sets ARB_TIERS_REQUIRED=1, so
there a missing component is a failure, never a silent skip. Run by hand elsewhere (no root,
no Apache), such a test skips and says what it needs.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRED_ENV = "ARB_TIERS_REQUIRED"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def required() -> bool:
    return os.environ.get(REQUIRED_ENV) == "1"


def unavailable(reason: str) -> NoReturn:
    """Fail where every tier is required, skip elsewhere."""
    if required():
        pytest.fail(f"{reason} ({REQUIRED_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def need(tool: str) -> str:
    """The absolute path of `tool`, looked up in the system's PATH."""
    path = shutil.which(tool, path=SYSTEM_PATH)
    if path is None:
        unavailable(f"{tool} is not installed")
    return path
