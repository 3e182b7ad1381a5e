"""Polling a store's watch in tests."""

from __future__ import annotations

import time


def wait_for(watch, predicate, timeout: float = 5.0):
    """Poll a watch until the events seen so far satisfy predicate; returns them."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += watch.poll(0.1)
        if predicate(seen):
            return seen
    raise AssertionError(f"no matching events in {timeout}s, saw {seen}")
