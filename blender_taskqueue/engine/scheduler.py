"""The queue's order and who runs next. Pure data structure; the engine holds the lock.

Two structures, each with one job:

* ``_Order`` keeps every queued job (ready, held or backing off) sorted by
  ``(priority, seq)``. ``seq`` is a submit counter, so a priority band is FIFO;
  ``move`` rewrites ``seq`` (top: below the band's first, up: swap with the
  neighbour, ...), which keeps the priority untouched. It is a list of sorted
  blocks, so insert, remove and neighbour lookup are O(log n) plus a short memmove.
* one heap per kind of the jobs that are ready to run: ``heappush(q, (priority,
  seq, n, job))``; ``n`` is unique, so two entries (a stale one and its
  replacement after a move) never fall through to comparing jobs. Dispatch takes the smallest head among the kinds that are below
  their ``max_concurrency``, so a saturated kind is skipped in O(1) instead of
  scanning its jobs. Entries go stale when a job is moved, held or removed;
  they are dropped when they reach the top, and the heap is rebuilt when more
  than half of it is stale.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from itertools import count
from typing import Callable, Iterator, Optional

from .record import JobRecord

Key = tuple  # (priority: int, seq: int)

_BLOCK = 512


class _Order:
    """A sorted set of unique keys kept as a list of sorted blocks."""

    def __init__(self) -> None:
        self._blocks: list[list[Key]] = []
        self._maxes: list[Key] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Key]:
        for block in self._blocks:
            yield from block

    def add(self, key: Key) -> None:
        self._len += 1
        if not self._blocks:
            self._blocks.append([key])
            self._maxes.append(key)
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._blocks):
            i -= 1
            self._blocks[i].append(key)
            self._maxes[i] = key
        else:
            insort(self._blocks[i], key)
        block = self._blocks[i]
        if len(block) > 2 * _BLOCK:
            half = block[_BLOCK:]
            del block[_BLOCK:]
            self._blocks.insert(i + 1, half)
            self._maxes[i] = block[-1]
            self._maxes.insert(i + 1, half[-1])

    def _locate(self, key: Key) -> tuple[int, int]:
        i = bisect_left(self._maxes, key)
        if i < len(self._blocks):
            block = self._blocks[i]
            j = bisect_left(block, key)
            if j < len(block) and block[j] == key:
                return i, j
        raise KeyError(key)

    def remove(self, key: Key) -> None:
        i, j = self._locate(key)
        block = self._blocks[i]
        del block[j]
        self._len -= 1
        if not block:
            del self._blocks[i]
            del self._maxes[i]
        elif j == len(block):
            self._maxes[i] = block[-1]

    def neighbour(self, key: Key, step: int) -> Optional[Key]:
        """The key just before (step=-1) or after (step=+1) ``key``, or None."""
        i, j = self._locate(key)
        j += step
        if 0 <= j < len(self._blocks[i]):
            return self._blocks[i][j]
        i += step
        if 0 <= i < len(self._blocks):
            return self._blocks[i][-1 if step < 0 else 0]
        return None

    def first_at_or_after(self, key: Key) -> Optional[Key]:
        i = bisect_left(self._maxes, key)
        if i == len(self._blocks):
            return None
        block = self._blocks[i]
        return block[bisect_left(block, key)]

    def last_before(self, key: Key) -> Optional[Key]:
        i = bisect_left(self._maxes, key)
        if i < len(self._blocks):
            block = self._blocks[i]
            j = bisect_left(block, key)
            if j > 0:
                return block[j - 1]
        if i > 0:
            return self._blocks[i - 1][-1]
        return None


class Scheduler:
    """Queued jobs in dispatch order, with per-kind ready heaps."""

    def __init__(self) -> None:
        self._order = _Order()
        self._by_key: dict[Key, JobRecord] = {}
        self._ready: dict[str, list] = {}
        self._ready_live: dict[str, int] = {}
        self._seq = count()
        self._top = count(-1, -1)  # "top" keys: below every key ever given, never reused
        self._tiebreak = count()

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[JobRecord]:
        """Every queued job (ready, held or backing off) in dispatch order."""
        by_key = self._by_key
        for key in list(self._order):
            yield by_key[key]

    def ready_count(self) -> int:
        return sum(self._ready_live.values())

    def add(self, job: JobRecord, *, seq: Optional[int] = None) -> None:
        """Queue ``job`` at the end of its priority band (or at ``seq`` when re-adding)."""
        job.key = (job.priority, next(self._seq) if seq is None else seq)
        self._order.add(job.key)
        self._by_key[job.key] = job
        job.in_queue = True
        if job.ready:
            self._push_ready(job)

    def remove(self, job: JobRecord) -> None:
        """Take ``job`` out of the queue (dispatched, cancelled, ...)."""
        if not job.in_queue:
            return
        self._order.remove(job.key)
        del self._by_key[job.key]
        job.in_queue = False
        if job.ready:
            job.ready = False
            self._ready_live[job.kind] -= 1
            self._trim(job.kind)

    def _trim(self, kind: str) -> None:
        """Drop stale entries so that removed jobs are not kept alive by the heap."""
        heap = self._ready[kind]
        if self._ready_live[kind] == 0:
            for entry in heap:
                if entry[3].heap_key == entry[:2]:
                    entry[3].heap_key = None
            heap.clear()
        elif len(heap) > 64 and len(heap) > 2 * self._ready_live[kind]:
            self._compact(kind)

    def set_ready(self, job: JobRecord, ready: bool) -> None:
        """Mark a queued job dispatchable or not (held, backing off)."""
        if not job.in_queue or job.ready == ready:
            return
        job.ready = ready
        if ready:
            self._push_ready(job)
        else:
            self._ready_live[job.kind] -= 1
            self._trim(job.kind)

    def move(self, job: JobRecord, where: str) -> list[JobRecord]:
        """Reorder ``job`` within its priority band. Returns the jobs whose key changed
        (none if it already stood there)."""
        p = job.priority
        if where in ("top", "bottom"):
            # Fresh keys from two counters, never "first - 1" or "last + 1": those may
            # be a dispatched job's key that a retry will bring back.
            if where == "top":
                edge = self._order.first_at_or_after((p,))
                if edge is None or edge == job.key:
                    return []
                new_seq = next(self._top)
            else:
                edge = self._order.last_before((p + 1,))
                if edge is None or edge == job.key:
                    return []
                new_seq = next(self._seq)
            self._rekey(job, new_seq)
            return [job]
        other_key = self._order.neighbour(job.key, -1 if where == "up" else 1)
        if other_key is None or other_key[0] != p:
            return []
        other = self._by_key[other_key]
        mine = job.key[1]
        self._rekey(job, None)
        self._rekey(other, mine)
        self._rekey(job, other_key[1])
        return [job, other]

    def _rekey(self, job: JobRecord, seq: Optional[int]) -> None:
        if job.key is not None and job.key in self._by_key and self._by_key[job.key] is job:
            self._order.remove(job.key)
            del self._by_key[job.key]
        if seq is None:  # parked while two jobs swap keys
            job.key = None
            return
        job.key = (job.priority, seq)
        self._order.add(job.key)
        self._by_key[job.key] = job
        if job.ready:
            self._ready_live[job.kind] -= 1
            self._push_ready(job)

    def _push_ready(self, job: JobRecord) -> None:
        kind = job.kind
        heap = self._ready.get(kind)
        if heap is None:
            heap = self._ready[kind] = []
            self._ready_live[kind] = 0
        self._ready_live[kind] += 1
        if job.heap_key != job.key:
            job.heap_key = job.key
            heapq.heappush(heap, (job.key[0], job.key[1], next(self._tiebreak), job))
            if len(heap) > 64 and len(heap) > 2 * self._ready_live[kind]:
                self._compact(kind)

    def _compact(self, kind: str) -> None:
        heap = []
        for entry in self._ready[kind]:
            job = entry[3]
            if job.ready and job.in_queue and job.key == entry[:2] == job.heap_key:
                heap.append(entry)
            elif job.heap_key == entry[:2]:
                job.heap_key = None  # its entry is gone: the next _push_ready must push again
        heapq.heapify(heap)
        self._ready[kind] = heap

    def _head(self, kind: str) -> Optional[JobRecord]:
        heap = self._ready[kind]
        while heap:
            p, seq, _, job = heap[0]
            if job.ready and job.in_queue and job.key == (p, seq) and job.heap_key == (p, seq):
                return job
            heapq.heappop(heap)
            if job.heap_key == (p, seq):
                job.heap_key = None
        return None

    def next_ready(
        self,
        kind_allowed: Callable[[str], bool],
        head_allowed: Optional[Callable[[JobRecord], bool]] = None,
    ) -> Optional[JobRecord]:
        """The first ready job in dispatch order whose kind may start one more (and,
        with ``head_allowed``, that the kind's first ready job may start)."""
        best: Optional[JobRecord] = None
        for kind, live in self._ready_live.items():
            if live <= 0 or not kind_allowed(kind):
                continue
            head = self._head(kind)
            if head is not None and (best is None or head.key < best.key):
                if head_allowed is None or head_allowed(head):
                    best = head
        return best
