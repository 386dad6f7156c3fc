"""Timers: what falls due on the engine's clock, retry backoffs and timeouts.

Owns: two heaps of ``(due, n, job)``, one of queued jobs waiting out a retry
backoff, one of running jobs with a timeout. ``n`` is unique, so equal times
never fall through to comparing jobs. Entries are never removed early: an entry
whose job has moved on (cancelled, re-timed, finished) is stale, recognised by
its ``due`` no longer matching the job, and dropped when it surfaces.

Must not touch: job states or anything outside the heaps. It says what is due;
the engine (under its lock) decides what that means, and the watchdog thread
(``workers.WorkerPool``) decides when to ask.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Optional

from .models import JobState
from .record import JobRecord

_ACTIVE = (JobState.DISPATCHED, JobState.RUNNING)


class Timers:
    """The backoff and deadline heaps. All methods run under the engine's lock."""

    __slots__ = ("_backoff", "_deadlines", "_n")

    def __init__(self) -> None:
        self._backoff: list = []
        self._deadlines: list = []
        self._n = itertools.count()

    def add_backoff(self, job: JobRecord, due: float) -> None:
        """``job`` (queued, not ready) becomes ready at ``due`` unless it moves on first."""
        job.not_before = due
        heapq.heappush(self._backoff, (due, next(self._n), job))

    def add_deadline(self, job: JobRecord, due: float) -> None:
        """``job`` (running) times out at ``due`` unless it ends or is stopped first."""
        job.deadline = due
        heapq.heappush(self._deadlines, (due, next(self._n), job))

    def backoffs_ended(self, now: float) -> list[JobRecord]:
        """Queued jobs whose backoff ended by ``now``; their ``not_before`` is cleared."""
        out = []
        heap = self._backoff
        while heap and heap[0][0] <= now:
            due, _, job = heapq.heappop(heap)
            if job.in_queue and job.not_before == due:
                job.not_before = None
                out.append(job)
        return out

    def deadlines_passed(self, now: float) -> list[JobRecord]:
        """Running jobs whose timeout passed by ``now`` and that were not already stopped."""
        out = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            due, _, job = heapq.heappop(heap)
            if job.deadline == due and job.state in _ACTIVE and not job.cancel_requested:
                out.append(job)
        return out

    def next_due(self, now: float) -> Optional[float]:
        """Seconds from ``now`` until the earliest entry (stale ones included), or None."""
        firsts = [heap[0][0] for heap in (self._backoff, self._deadlines) if heap]
        return max(0.0, min(firsts) - now) if firsts else None
