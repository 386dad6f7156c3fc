"""Admission: whether the next job may start now, by per-kind capacity and memory.

Owns: how many jobs of each kind run, the memory reserved by running jobs (their
``memory_mb``, split into the part inside this process and the part in child
processes), and the one job that dispatch waits on for memory.

Must not touch: job states, the scheduler, events, threads or files. Every
method runs under the engine's lock; the engine decides what a refusal means
(the waiting job's message, the event, the watchdog's re-check).
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

from .kinds import KindSpec
from .models import EngineConfig
from .record import JobRecord
from .resources import MemoryProbe


class Admission:
    """Capacity bookkeeping for the jobs that run. A reservation taken with
    ``take`` is undone exactly by ``give_back``, whatever the registry says by
    then (a kind may be re-registered while its jobs run)."""

    __slots__ = (
        "_config", "_find_spec", "_memory", "kind_running", "slot_running",
        "reserved_mb", "reserved_inside_mb", "reservations", "blocked",
    )

    def __init__(
        self,
        config: Callable[[], EngineConfig],
        find_spec: Callable[[str], Optional[KindSpec]],
        memory: MemoryProbe,
    ) -> None:
        self._config = config
        self._find_spec = find_spec
        self._memory = memory
        self.kind_running: collections.Counter[str] = collections.Counter()
        self.slot_running: collections.Counter[tuple[str, str]] = collections.Counter()  # (kind, slot)
        self.reserved_mb = 0  # memory_mb of the running jobs
        self.reserved_inside_mb = 0  # the part of it inside this process (not out_of_process kinds)
        self.reservations: dict[str, tuple[int, int]] = {}  # job id -> (memory_mb, inside part)
        self.blocked: Optional[JobRecord] = None  # the job dispatch waits on for memory

    def kind_has_room(self, kind: str) -> bool:
        """Whether one more job of ``kind`` stays within its ``max_concurrency``."""
        spec = self._find_spec(kind)
        limit = spec.max_concurrency if spec is not None else None
        return limit is None or self.kind_running[kind] < limit

    def free_slot(self, job: JobRecord) -> Optional[str]:
        """The first of the job's slots (``KindSpec.slots``) with room, or None."""
        spec = self._find_spec(job.kind)
        if spec is None or spec.slots is None:
            return None
        try:
            candidates = spec.slots(job.params) or []
        except Exception:
            return None
        for slot in candidates:
            if self.slot_running[(job.kind, slot)] < spec.slot_limit:
                return str(slot)
        return None

    def head_has_room(self, job: JobRecord) -> bool:
        """Whether the first ready job of its kind may start on one of its slots
        (always, for kinds without slots)."""
        spec = self._find_spec(job.kind)
        if spec is None or spec.slots is None:
            return True
        return self.free_slot(job) is not None

    def is_inside(self, job: JobRecord) -> bool:
        """Whether the job's memory is used inside this process (see ``out_of_process``)."""
        spec = self._find_spec(job.kind)
        return spec is None or not spec.out_of_process

    def take(self, job: JobRecord) -> None:
        """Count a job that starts: its kind's slot and its memory."""
        self.kind_running[job.kind] += 1
        slot = self.free_slot(job)
        job.slot = slot
        if slot is not None:
            self.slot_running[(job.kind, slot)] += 1
        need = job.memory_mb
        if need:
            inside = need if self.is_inside(job) else 0
            self.reservations[job.id] = (need, inside)
            self.reserved_mb += need
            self.reserved_inside_mb += inside

    def give_back(self, job: JobRecord) -> None:
        """Undo ``take`` for a job that stopped running."""
        self.kind_running[job.kind] -= 1
        if job.slot is not None:
            self.slot_running[(job.kind, job.slot)] -= 1
            job.slot = None
        if self.reservations:
            need, inside = self.reservations.pop(job.id, (0, 0))
            self.reserved_mb -= need
            self.reserved_inside_mb -= inside

    def never_fits(self, need: Optional[int], inside: bool) -> Optional[str]:
        """Why a job needing ``need`` MB could never start on this machine, or None.
        Such a job must never wait at the head of the queue. (A Keep Free setting that
        leaves too little is the user's own choice and can change: jobs wait for it,
        visibly, instead.)"""
        if not need:
            return None
        cfg = self._config()
        total = self._memory.total_mb()
        if need > total:
            return f"memory_mb={need} can never fit: this machine has {total:.0f} MB of memory in all"
        if inside and cfg.max_memory_mb is not None and need > cfg.max_memory_mb:
            return f"memory_mb={need} exceeds max_memory_mb={cfg.max_memory_mb}: the job could never start"
        return None

    def memory_shortfall(self, job: JobRecord) -> Optional[list[str]]:
        """Why ``job`` does not fit in memory now: None when no memory limit applies
        at all, an empty list when it fits, else the reasons, as a person reads them."""
        cfg = self._config()
        need = job.memory_mb or 0
        if cfg.min_free_memory_mb is None and cfg.max_memory_mb is None and not need:
            return None
        reasons = []
        free = self._memory.available_mb() - self.reserved_mb
        floor = cfg.min_free_memory_mb or 0
        if free - need < floor:
            reasons.append(
                f"needs {need} MB + {floor} MB kept free, {max(free, 0):.0f} MB available"
                if need
                else f"{max(free, 0):.0f} MB free, below min_free_memory_mb={floor}"
            )
        if cfg.max_memory_mb is not None:
            used = self._memory.process_mb() + self.reserved_inside_mb
            inside = need if self.is_inside(job) else 0
            if used + inside > cfg.max_memory_mb:
                reasons.append(
                    f"Blender uses {used:.0f} MB{f' + {inside} MB needed' if inside else ''}, "
                    f"above max_memory_mb={cfg.max_memory_mb}"
                )
        return reasons
