"""Memory readings for dispatch admission, cached so the hot path rarely calls psutil."""

from __future__ import annotations

import time
from typing import Callable

import psutil

_MB = 1024 * 1024


class MemoryProbe:
    """Free machine memory and this process's RSS in MB, re-read at most every ``ttl`` s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, ttl: float = 0.1) -> None:
        self._clock = clock
        self._ttl = ttl
        self._process = psutil.Process()
        self._at = float("-inf")
        self._available = 0.0
        self._rss = 0.0

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._at >= self._ttl:
            self._available = psutil.virtual_memory().available / _MB
            self._rss = self._process.memory_info().rss / _MB
            self._at = now

    def available_mb(self) -> float:
        self._refresh()
        return self._available

    def process_mb(self) -> float:
        self._refresh()
        return self._rss

    def total_mb(self) -> float:
        """The machine's memory in all (it does not change while we run)."""
        total = getattr(self, "_total", None)
        if total is None:
            total = self._total = psutil.virtual_memory().total / _MB
        return total

    def invalidate(self) -> None:
        self._at = float("-inf")
