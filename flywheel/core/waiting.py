"""Waiting: the one poll loop, for everything that waits on a service to reach a state."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The condition did not hold in time; the message says what was awaited and the last answer."""


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.5,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call `condition` every `interval` seconds until it returns something truthy, and return that.

    Raises WaitTimeout naming `what` (and `describe()`, the last state seen, if given) after `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() + interval > deadline:
            last = f" ({describe()})" if describe else ""
            raise WaitTimeout(f"not within {timeout:.0f}s: {what}{last}")
        time.sleep(interval)
