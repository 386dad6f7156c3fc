"""History: the finished jobs kept, the ids evicted, and the finish counts.

Owns: the order of finished jobs (oldest first), a bounded memory of evicted
ids (so ``wait()`` and ``get()`` can tell "finished and gone" from "never
was"), the count of jobs that ended in each terminal state, and the finish
times of the last minute (throughput).

Must not touch: the job records themselves. Eviction hands back the ids it
dropped; the engine forgets those records. Runs under the engine's lock.
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

from .models import JobState

EVICTED_MEMORY = 100_000  # evicted ids remembered
THROUGHPUT_WINDOW_S = 60.0


class History:
    __slots__ = ("finished", "_evicted", "counts", "_finish_times")

    def __init__(self) -> None:
        self.finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._evicted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.counts: collections.Counter[JobState] = collections.Counter()
        self._finish_times: collections.deque[float] = collections.deque()

    def __len__(self) -> int:
        return len(self.finished)

    def newest_first(self) -> Iterator[str]:
        return reversed(self.finished)

    def record(self, job_id: str, state: JobState, now: float) -> None:
        """A job ended in ``state`` at ``now`` (the engine's clock)."""
        self.counts[state] += 1
        times = self._finish_times
        times.append(now)
        while times[0] < now - THROUGHPUT_WINDOW_S:
            times.popleft()
        self.finished[job_id] = None

    def put_older(self, job_ids: Iterable[str]) -> None:
        """Insert adopted finished jobs before everything finished in this session."""
        self.finished = collections.OrderedDict(
            [(i, None) for i in job_ids] + [(i, None) for i in self.finished]
        )

    def over_limit(self, limit: int) -> list[str]:
        """Drop the oldest finished ids beyond ``limit``; returns them (to be forgotten)."""
        finished = self.finished
        out = []
        while len(finished) > limit:
            job_id, _ = finished.popitem(last=False)
            out.append(job_id)
        return out

    def take_all(self) -> list[str]:
        """Every finished id, removed from the history (clear finished)."""
        out = list(self.finished)
        self.finished.clear()
        return out

    def note_evicted(self, job_id: str) -> None:
        evicted = self._evicted
        evicted[job_id] = None
        if len(evicted) > EVICTED_MEMORY:
            evicted.popitem(last=False)

    def was_evicted(self, job_id: str) -> bool:
        return job_id in self._evicted

    def per_minute(self, now: float) -> float:
        """Jobs finished per minute over the last minute."""
        times = self._finish_times
        while times and times[0] < now - THROUGHPUT_WINDOW_S:
            times.popleft()
        return len(times) * 60.0 / THROUGHPUT_WINDOW_S
