"""Timers: what falls due, retry backoffs and timeouts (engine clock), start times (wall clock).

Owns: three heaps of ``(due, n, job)``: queued jobs waiting out a retry backoff
and running jobs with a timeout, both on the engine's (monotonic) clock, and
queued jobs whose ``not_before`` has not come, on the wall clock (a start time
must mean the same after a restart, so it cannot be monotonic). ``n`` is
unique, so equal times never fall through to comparing jobs. Entries are not
removed early: an entry whose job has moved on (cancelled, re-timed, finished)
is stale, recognised by its ``due`` no longer matching the job, and dropped
when it surfaces. Start times may lie up to a year ahead, so that heap is also
rebuilt when more than half of it is stale (a cancelled scheduled job is not
kept alive for a year).

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
# The wall clock can jump (the user sets it, a laptop sleeps): a start time is
# re-checked at least this often, so a jump delays it by at most this much.
WALL_RECHECK_S = 30.0


class Timers:
    """The backoff and deadline heaps. All methods run under the engine's lock."""

    __slots__ = ("_backoff", "_deadlines", "_wakes", "_wakes_stale", "_n")

    def __init__(self) -> None:
        self._backoff: list = []
        self._deadlines: list = []
        self._wakes: list = []
        self._wakes_stale = 0
        self._n = itertools.count()

    def add_backoff(self, job: JobRecord, due: float) -> None:
        """``job`` (queued, not ready) becomes ready at ``due`` unless it moves on first."""
        job.backoff_until = due
        heapq.heappush(self._backoff, (due, next(self._n), job))

    def add_wake(self, job: JobRecord, due_wall: float) -> None:
        """``job`` (queued) may start from ``due_wall`` (wall clock) on; ``time_pending``
        holds until then."""
        job.not_before = due_wall
        job.time_pending = True
        heapq.heappush(self._wakes, (due_wall, next(self._n), job))

    def drop_wake(self, job: JobRecord) -> None:
        """``job`` left the queue before its start time: its entry is stale."""
        if not job.time_pending:
            return
        job.time_pending = False
        self._wakes_stale += 1
        heap = self._wakes
        if self._wakes_stale > 64 and 2 * self._wakes_stale > len(heap):
            self._wakes = [e for e in heap if e[2].time_pending and e[2].not_before == e[0]]
            heapq.heapify(self._wakes)
            self._wakes_stale = 0

    def wakes_due(self, now_wall: float) -> list[JobRecord]:
        """Queued jobs whose start time came by ``now_wall``; their ``time_pending`` is cleared."""
        out = []
        heap = self._wakes
        while heap and heap[0][0] <= now_wall:
            due, _, job = heapq.heappop(heap)
            if job.time_pending and job.not_before == due:
                job.time_pending = False
                if job.in_queue:
                    out.append(job)
            elif self._wakes_stale:
                self._wakes_stale -= 1
        return out

    def add_deadline(self, job: JobRecord, due: float) -> None:
        """``job`` (running) times out at ``due`` unless it ends or is stopped first."""
        job.deadline = due
        heapq.heappush(self._deadlines, (due, next(self._n), job))

    def backoffs_ended(self, now: float) -> list[JobRecord]:
        """Queued jobs whose backoff ended by ``now``; their ``backoff_until`` is cleared."""
        out = []
        heap = self._backoff
        while heap and heap[0][0] <= now:
            due, _, job = heapq.heappop(heap)
            if job.in_queue and job.backoff_until == due:
                job.backoff_until = None
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

    def next_due(self, now: float, now_wall: float) -> Optional[float]:
        """Seconds until the earliest entry (stale ones included), or None: ``now`` is
        the engine's clock, ``now_wall`` the wall clock."""
        firsts = [heap[0][0] - now for heap in (self._backoff, self._deadlines) if heap]
        if self._wakes:
            firsts.append(min(self._wakes[0][0] - now_wall, WALL_RECHECK_S))
        return max(0.0, min(firsts)) if firsts else None
