"""A test that needs an outside tool: skipped where a developer lacks it, a failure under CI.

CI (`.ci/run` sets CI=true) installs every tool the tests use; a missing one there is a broken
install, and a skip would hide it.
"""

from __future__ import annotations

import os

import pytest


def require(found, what: str):
    """Return `found`, or skip (locally) / fail (CI=true) naming what is missing."""
    if found:
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing under CI: the install is broken")
    pytest.skip(f"{what} is not installed")
