"""Waiting for an event instead of sleeping for a while: a sleep either races what it waits for
(too short on a busy machine) or wastes time (too long everywhere else)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy, and return that. After ``timeout``
    seconds, fail with a message naming ``what`` was awaited. The timeout only stops a hang: it
    is never what a test measures."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)
