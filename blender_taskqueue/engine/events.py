"""What flows from worker threads to the main thread: events and main-thread calls.

``EventQueue`` is not locked by itself: the engine calls it under its own lock,
so a snapshot and the event that carries it are always consistent.
``MainCallQueue`` has its own lock because workers block on it while the
engine lock must stay free.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Optional

from .models import Event, JobInfo
from .record import JobRecord

_new_tuple = tuple.__new__

RESYNC = "resync"  # notice level: events were dropped, re-read jobs()


class EventQueue:
    """State events and notices in order; progress coalesced to one slot per job.

    ``state``/``notice`` are called under the engine lock. ``progress`` may be
    called without it (from ``ctx.progress`` on a worker): it is a single dict
    store, atomic under the GIL, so a flood of progress reports never contends
    for the engine lock and memory is bounded by the number of jobs, not the
    report rate. The drain pops that dict item by item (safe against concurrent
    stores) and appends one progress event per job after the state events, each
    with the snapshot taken at drain time, so applying a drain in order always
    ends with the newest information.
    """

    def __init__(self, max_events: int = 100_000) -> None:
        self._items: list[Any] = []  # Events, and state events as their bare JobInfo
        self._progress: dict[str, JobRecord] = {}
        self._max = max_events
        self._dropped = 0

    def __len__(self) -> int:
        return len(self._items) + len(self._progress)

    # State events are queued as their bare snapshot; drain() wraps each in its
    # Event. One object per event instead of two: this runs five times per job,
    # and the cyclic GC's work grows with the objects allocated and kept.
    def state(self, job: JobRecord) -> None:
        self._append(job.snapshot())

    def state_info(self, info: JobInfo) -> None:
        self._append(info)

    def progress(self, job: JobRecord) -> None:
        self._progress[job.id] = job

    def forget(self, job_id: str) -> None:
        """The job left history: do not keep it alive for a drain that may never come."""
        self._progress.pop(job_id, None)

    def notice(
        self,
        message: str,
        *,
        level: str = "info",
        job: Optional[JobRecord] = None,
    ) -> None:
        self._append(
            Event(
                "notice",
                job.id if job else None,
                job.snapshot() if job else None,
                message,
                level,
            )
        )

    def _append(self, item: Any) -> None:
        if len(self._items) >= self._max:
            # Nobody drains: keep memory bounded and tell the consumer to resync.
            self._dropped += len(self._items)
            self._items.clear()
        self._items.append(item)

    def drain(self) -> list[Event]:
        items, self._items = self._items, []
        # The fields are Event's, in order; tuple.__new__ skips the namedtuple's
        # Python-level __new__.
        out = [
            _new_tuple(Event, ("state", item.id, item, None, "info")) if type(item) is JobInfo else item
            for item in items
        ]
        if self._dropped:
            out.insert(
                0,
                Event(
                    "notice",
                    None,
                    None,
                    f"{self._dropped} events were dropped because nobody drained them; "
                    "re-read the job list",
                    RESYNC,
                ),
            )
            self._dropped = 0
        progress = self._progress
        while progress:
            try:
                _, job = progress.popitem()
            except KeyError:
                break
            out.append(Event("progress", job.id, job.snapshot()))
        return out


class MainCall:
    """One call waiting for the main thread."""

    __slots__ = ("fn", "args", "kwargs", "done", "result", "exc", "abandoned", "started")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.exc: Optional[BaseException] = None
        self.abandoned = False
        self.started = False


class MainCallQueue:
    """Calls from workers (and completion callbacks) that must run on the main thread."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._calls: collections.deque[MainCall] = collections.deque()
        self._lock = threading.Lock()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._calls)

    def put(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MainCall:
        call = MainCall(fn, args, kwargs)
        self._calls.append(call)  # deque.append is atomic
        return call

    def abandon(self, call: MainCall) -> bool:
        """Withdraw a call that has not started. Returns False if it already runs/ran."""
        with self._lock:
            if call.started:
                return False
            call.abandoned = True
            return True

    def run(self, budget_s: float) -> int:
        """Run queued calls in order until ``budget_s`` is spent; at least one runs."""
        deadline = self._clock() + budget_s
        ran = 0
        while self._calls:
            try:
                call = self._calls.popleft()
            except IndexError:
                break
            with self._lock:
                if call.abandoned:
                    continue
                call.started = True
            try:
                call.result = call.fn(*call.args, **call.kwargs)
            except Exception as exc:  # handed to the waiting worker
                call.exc = exc
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: theirs and ours
                call.exc = exc
                raise
            finally:
                call.done.set()
            ran += 1
            if self._clock() >= deadline:
                break
        return ran
