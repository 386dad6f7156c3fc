"""Callbacks: who hears that a job finished, and on which thread.

Owns: the ``on_finished`` subscribers and how each is called: main-thread ones
are queued (as main-thread calls, under the engine lock, in the same hold that
makes the job terminal, so a main-thread ``wait()`` that sees the job finished
also finds its callbacks), worker-thread ones run on the thread that finished
the job, with the lock released. A callback that raises is logged, never
raised into the engine.

Must not touch: job records, the queue, the lock.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .events import MainCallQueue
from .models import JobInfo

Callback = Callable[[JobInfo], Any]


class Callbacks:
    __slots__ = ("_entries", "_main_calls", "_logger")

    def __init__(self, main_calls: MainCallQueue, logger: Callable[[], Any]) -> None:
        self._entries: list[tuple[Callback, bool]] = []
        self._main_calls = main_calls
        self._logger = logger

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add_locked(self, callback: Callback, on_main: bool) -> tuple[Callback, bool]:
        entry = (callback, bool(on_main))
        self._entries.append(entry)
        return entry

    def remove_locked(self, entry: tuple[Callback, bool]) -> None:
        if entry in self._entries:
            self._entries.remove(entry)

    def queue_main_locked(self, info: JobInfo) -> None:
        """Queue the main-thread callbacks for ``info`` (under the engine lock)."""
        for callback, on_main in self._entries:
            if on_main:
                self._main_calls.put(self.call_safely, callback, info)

    def fire_here(self, info: Optional[JobInfo]) -> None:
        """Run the worker-thread callbacks (lock released; main-thread ones are queued)."""
        if info is None or not self._entries:
            return
        for callback, on_main in list(self._entries):
            if not on_main:
                self.call_safely(callback, info)

    def call_safely(self, callback: Callback, info: JobInfo) -> None:
        try:
            callback(info)
        except Exception:
            self._logger().exception("on_finished callback failed", job_id=info.id, callback=repr(callback))
