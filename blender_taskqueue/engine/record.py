"""The engine's mutable record of one job. Only the engine touches it, under its lock.

Why a queued job is not ready shows in its fields: ``held`` (waits for release),
``backoff_until`` (a retry's backoff, on the engine's clock), ``waiting`` (the
prerequisites that have not completed yet) and ``time_pending`` (its wall-clock
``not_before`` has not come yet). It is ready when none of them holds."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Optional

from .models import TERMINAL_STATES, JobError, JobInfo, JobState


class JobRecord:
    __slots__ = (
        "id",
        "kind",
        "label",
        "params",
        "priority",
        "state",
        "progress",
        "stage",
        "message",
        "eta_seconds",
        "attempt",
        "max_retries",
        "errors",
        "result",
        "partial_result",
        "checkpoint",
        "held",
        "created_at",
        "started_at",
        "finished_at",
        "timeout",
        "memory_mb",
        # scheduling
        "key",
        "heap_key",
        "in_queue",
        "ready",
        "backoff_until",
        "not_before",
        "time_pending",
        "deadline",
        # pipelines
        "depends_on",
        "waiting",
        "inputs",
        "root_cause",
        # running
        "run_started",
        "cancel_requested",
        "cancel_reason",
        "timed_out",
        "cancel_event",
        "callable",
        "recovered_from",
        "yielded_at",
        "slot",
        "_view",
    )

    def __init__(
        self,
        id: str,
        kind: str,
        label: str,
        params: dict,
        priority: int,
        created_at: float,
        *,
        max_retries: int = 0,
        timeout: Optional[float] = None,
        memory_mb: Optional[int] = None,
        held: bool = False,
    ) -> None:
        self.id = id
        self.kind = kind
        self.label = label
        self.params = params
        self.priority = priority
        self.state = JobState.SUBMITTED
        self.progress = 0.0
        self.stage: Optional[str] = None
        self.message: Optional[str] = None
        self.eta_seconds: Optional[float] = None
        self.attempt = 0
        self.max_retries = max_retries
        self.errors: tuple[JobError, ...] = ()
        self.result: Any = None
        self.partial_result: Optional[dict] = None
        self.checkpoint: Optional[dict] = None
        self.held = held
        self.created_at = created_at
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.key: Any = None
        self.heap_key: Any = None
        self.in_queue = False
        self.ready = not held
        self.backoff_until: Optional[float] = None  # engine clock: a retry's backoff ends
        self.not_before: Optional[float] = None  # wall clock: the job does not start before
        self.time_pending = False  # not_before has not come yet (an entry in the timers' heap)
        self.depends_on: tuple[str, ...] = ()  # prerequisites, in the order given
        self.waiting: Optional[dict[str, None]] = None  # those not completed yet (None: none)
        self.inputs: Optional[dict[str, Any]] = None  # results of the completed ones, by id
        self.root_cause: Optional[tuple[str, str]] = None  # (id, state) a dependency failure began at
        self.deadline: Optional[float] = None
        self.run_started: Optional[float] = None
        self.cancel_requested = False
        self.cancel_reason: Optional[str] = None  # "user" | "timeout" | "shutdown"
        self.timed_out = False
        self.cancel_event: Any = None
        self.callable: Any = None
        self.recovered_from: Optional[str] = None
        self.yielded_at = 0.0
        self.slot: Optional[str] = None  # the resource admission gave it (KindSpec.slots)
        self._view: Any = None

    def may_run(self) -> bool:
        """Nothing but a free worker keeps this queued job from running."""
        return not (self.held or self.waiting or self.time_pending or self.backoff_until is not None)

    def params_view(self) -> Any:
        view = self._view
        if view is None:
            view = self._view = MappingProxyType(self.params)
        return view

    def snapshot(self) -> JobInfo:
        errors = self.errors
        state = self.state
        # tuple.__new__ skips the namedtuple's Python-level __new__: this runs
        # several times per job on the hot path.
        return _new_tuple(
            JobInfo,
            (
                self.id,
                self.kind,
                self.label,
                self._view or self.params_view(),
                self.priority,
                state,
                self.progress,
                self.stage,
                self.message,
                self.eta_seconds,
                self.attempt,
                self.max_retries,
                errors[-1] if errors and state is not JobState.COMPLETED else None,
                self.result,
                self.partial_result,
                self.held,
                self.created_at,
                self.started_at,
                self.finished_at,
                errors,
                self.timeout,
                self.memory_mb,
                self.cancel_requested and state not in TERMINAL_STATES,
                self.depends_on,
                tuple(waiting) if (waiting := self.waiting) else (),
                self.not_before,
            ),
        )


_new_tuple = tuple.__new__
