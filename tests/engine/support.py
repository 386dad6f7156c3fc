"""Helpers shared by the engine tests: an injected clock, a memory probe the test
controls, and a bounded wait for a condition to be reached."""

from __future__ import annotations

import threading
import time
from typing import Callable

WAIT = 10.0


def wait_until(predicate: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds (a condition to reach, never a delay to sleep)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        tick.wait(0.002)


class FakeClock:
    """The engine's clock, advanced by the test."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class FakeProbe:
    """What the engine asks about memory; the test sets the numbers."""

    def __init__(self, available: float = 4096.0, process: float = 256.0, total: float = 1e6) -> None:
        self.available = available
        self.process = process
        self.total = total
        self.invalidations = 0

    def total_mb(self) -> float:
        return self.total

    def available_mb(self) -> float:
        return self.available

    def process_mb(self) -> float:
        return self.process

    def invalidate(self) -> None:
        self.invalidations += 1
