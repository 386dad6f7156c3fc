"""The Engine: a priority queue of jobs run on a pool of daemon worker threads.

Every state transition happens under one lock (``self._lock``), shared by three
conditions: workers wait on ``_work_cv``, the watchdog on ``_timer_cv`` and
``wait()`` callers on ``_done_cv``. Callbacks and handlers run with the lock
released. A worker claims a job atomically (removes it from the scheduler and
marks it dispatched under the lock), so a cancel and a start never both win.

Workers are daemon threads, not a ``concurrent.futures`` pool: the pool joins
its threads at interpreter exit, so one handler that ignores cancellation would
hang Blender's quit. Here shutdown asks, waits a bounded time, records what did
not stop, and lets the process exit.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import secrets
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from . import kinds as _kinds
from .context import JobContext, _local
from .errors import (
    EngineClosed,
    InvalidParams,
    InvalidStateError,
    JobCancelled,
    JobNotFound,
    NotPermitted,
    QueueFull,
    UnknownKind,
)
from .events import EventQueue, MainCallQueue
from .kinds import KindRegistry, KindSpec
from .logs import EngineLog
from .models import (
    MOVE_WHERE,
    Recovery,
    EngineConfig,
    EngineStats,
    Event,
    JobError,
    JobInfo,
    JobState,
    parse_priority,
    parse_states,
)
from .record import JobRecord
from .resources import MemoryProbe
from .scheduler import Scheduler
from .store import (
    APP,
    CLAIM_MARK,
    SCHEMA_VERSION,
    Owner,
    _capture,
    check_document,
    job_to_dict,
    SidecarError,
    SnapshotStore,
    claim_name,
    job_from_dict,
    move_aside,
    read_sidecar,
    sidecar_candidates,
)

PYTHON_CALL = "python.call"
BACKOFF_CAP_S = 60.0
EVICTED_MEMORY = 100_000  # evicted ids remembered, so wait() can tell "gone" from "never was"
THROUGHPUT_WINDOW_S = 60.0
GIL_YIELD_S = 0.001
LOCK_YIELDS = 10  # GIL yields granted to a holder of the engine lock (see _WorkerLock)
_perf = time.perf_counter
_sleep = time.sleep

_S = JobState
_ACTIVE = (_S.DISPATCHED, _S.RUNNING)
_RANK = {_S.SUBMITTED: 0, _S.QUEUED: 0, _S.DISPATCHED: 1, _S.RUNNING: 2,
         _S.COMPLETED: 3, _S.FAILED: 3, _S.CANCELLED: 3, _S.INTERRUPTED: 3}


def _python_call(ctx: JobContext, params: dict) -> Any:
    fn, args, kwargs = ctx._job.callable
    return fn(*args, **kwargs)


PYTHON_CALL_SPEC = KindSpec(
    name=PYTHON_CALL,
    handler=_python_call,
    recoverable=False,
    description="An ad-hoc Python callable (tq.run); not recoverable after a crash",
)

IdList = Union[str, Iterable[str], None]


class _WorkerLock:
    """The engine lock as a worker takes it to record an outcome and claim its next job.

    When the lock is taken, its holder is not running Python (this thread has the
    GIL): it is almost always a thread that the switch interval preempted inside
    its critical section and that now waits for the GIL. A blocking acquire
    sleeps on the lock and hands the GIL to the next thread, which finds the lock
    taken too; the lock then passes from sleeping thread to sleeping thread, each
    handoff a wake-up, and the convoy sustains itself (measured: 4 workers on
    no-op jobs at ~1.5 context switches per job and twice the CPU time). Yielding
    the GIL instead lets the holder finish and release, and keeps sleepers off the
    lock. One yield often hands the GIL straight back (the holder is slower to
    wake), hence a few; after LOCK_YIELDS the holder is taken to be blocked
    outside Python and this thread blocks as before. Only how the lock is
    acquired changes, not what it guards.

    Worker threads only: a Python-level ``__enter__`` that has acquired the lock
    could be interrupted before the with-block starts by a KeyboardInterrupt,
    which only the main thread receives. (Submit, the other hot path, keeps the
    plain ``with self._lock``: with the workers off the lock's sleep queue, it
    measured no different.)
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        if lock.acquire(False):
            return
        for _ in range(LOCK_YIELDS):
            _sleep(0)
            if lock.acquire(False):
                return
        lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


class Engine:
    """Runs jobs of registered kinds on worker threads. See ``EngineConfig`` for limits.

    Use ``start()`` then ``submit()``; ``shutdown()`` when done (or use it as a
    context manager). Every public method is thread-safe.
    """

    def __init__(
        self,
        config: Optional[EngineConfig] = None,
        *,
        registry: Optional[KindRegistry] = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        memory_probe: Optional[MemoryProbe] = None,
        sidecar_writer: Optional[Callable[[Path, bytes], None]] = None,
    ) -> None:
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self._config = config or EngineConfig()
        self._registry = registry if registry is not None else _kinds.registry
        self._clock = clock
        self._wall = wall_clock
        self._memory = memory_probe or MemoryProbe(clock)

        self._lock = threading.Lock()
        self._worker_lock = _WorkerLock(self._lock)
        self._work_cv = threading.Condition(self._lock)
        self._timer_cv = threading.Condition(self._lock)
        self._done_cv = threading.Condition(self._lock)

        self._jobs: dict[str, JobRecord] = {}
        self._scheduler = Scheduler()
        self._running: dict[str, JobRecord] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._evicted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._kind_running: collections.Counter[str] = collections.Counter()
        self._backoff: list = []  # heap of (not_before, n, job)
        self._deadlines: list = []  # heap of (deadline, n, job)
        self._heap_n = itertools.count()
        self._busy = 0
        self._idle = 0  # workers waiting for work
        self._done_waiters = 0  # threads in wait()/shutdown() waiting on _done_cv
        self._reserved_mb = 0  # memory_mb of the running jobs
        self._reserved_inside_mb = 0  # the part of it inside this process (not out_of_process kinds)
        self._reservations: dict[str, tuple[int, int]] = {}  # job id -> (memory_mb, inside part)
        self._memory_blocked: Optional[JobRecord] = None
        self._counts: collections.Counter[JobState] = collections.Counter()
        self._finish_times: collections.deque[float] = collections.deque()
        self._callbacks: list[tuple[Callable[[JobInfo], Any], bool]] = []

        self._events = EventQueue()
        self._main_calls = MainCallQueue()
        self.main_tick: Optional[Callable[[], Any]] = None  # set by the Blender pump
        # Set by the host (Blender): a reason to refuse a kind at submit, or None.
        self.submit_check: Optional[Callable[[KindSpec], Optional[str]]] = None

        self._workers: set[threading.Thread] = set()
        self._watchdog: Optional[threading.Thread] = None
        self._started = False
        self._closing = False
        self._closed = False
        self._paused = False
        self.order_version = 0  # bumped whenever the queue's order changes (for UI mirrors)
        self.state_version = 0  # bumped on every change a snapshot writer must persist
        self.recovery: Optional[Any] = None

        self._id_prefix = secrets.token_hex(3)
        self._id_counter = itertools.count(1)
        self._log = EngineLog(self._config.log_dir, self._config.log_level, self._config.console_log)
        self._dirty: set[JobRecord] = set()  # jobs the sidecar must re-encode
        self._progress_dirty: dict[str, JobRecord] = {}  # same, filled without the lock
        self._removed: set[str] = set()  # ids the sidecar must drop
        self._store: Optional[SnapshotStore] = None
        if self._config.state_dir is not None:
            self._store = SnapshotStore(
                self, self._config.state_dir, self._id_prefix, writer=sidecar_writer
            )

    # ------------------------------------------------------------------ lifecycle

    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def logger(self) -> Any:
        return self._log.logger

    @property
    def log_path(self) -> Optional[Path]:
        return self._log.path

    @property
    def is_running(self) -> bool:
        return self._started and not self._closing

    def start(self) -> "Engine":
        """Start the workers and the watchdog. Jobs submitted before start wait for it.

        Raises:
            EngineClosed: the engine was shut down; engines are not restartable.
        """
        with self._lock:
            if self._closing:
                raise EngineClosed("this engine was shut down; create a new Engine")
            if self._started:
                return self
            self._log.start()
            if self._store is not None:
                self._store.start()
                self._adopt_locked()
            self._started = True
            self._spawn_workers_locked()
            self._watchdog = threading.Thread(
                target=self._watchdog_main, name="taskqueue-watchdog", daemon=True
            )
            self._watchdog.start()
            self._work_cv.notify_all()
        self.logger.info("engine started", max_workers=self._config.max_workers)
        return self

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Stop taking work and stop the threads.

        Queued jobs stay queued (in the sidecar, when there is one). Running jobs
        are asked to stop: resumable ones are left to resume at the next start,
        others are recorded ``interrupted`` if they do not finish within
        ``timeout`` seconds. A handler that ignores the request keeps running on
        its daemon thread but never delays the process's exit.
        """
        with self._lock:
            if self._closed:
                return
            first = not self._closing
            self._closing = True
            if first:
                for job in self._running.values():
                    if not job.cancel_requested:
                        self._request_stop_locked(job, "shutdown")
            self._work_cv.notify_all()
            self._timer_cv.notify_all()
            self._done_cv.notify_all()
        # Deadlines for waiting are real time; the injected clock only drives job
        # semantics (timeouts, backoff, ETA), and a test's frozen clock must not hang us.
        deadline = time.monotonic() + (timeout if wait else 0.0)
        stuck: list[JobInfo] = []
        with self._lock:
            self._done_waiters += 1
            while self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._done_cv.wait(min(remaining, 0.05))
            self._done_waiters -= 1
            now_wall = self._wall()
            for job in list(self._running.values()):
                spec = self._spec_or_none(job.kind)
                if spec is not None and spec.resumable:
                    continue  # stays "running" on disk; adoption re-queues it from its checkpoint
                job.message = (
                    f"did not stop within {timeout:g} s of shutdown"
                    if wait
                    else "still running when the engine shut down without waiting"
                )
                stuck.append(self._terminal_locked(job, _S.INTERRUPTED, now_wall))
            self._closed = True
            self._work_cv.notify_all()
            self._timer_cv.notify_all()
            workers = [w for w in self._workers if w is not threading.current_thread()]
            watchdog = self._watchdog
        # Idle workers were woken and exit at once; a stuck one is not waited for
        # past the deadline (plus a moment for the idle ones).
        end = max(deadline, time.monotonic()) + 0.2
        for thread in workers + ([watchdog] if watchdog else []):
            thread.join(max(0.0, end - time.monotonic()))
        for info in stuck:
            self._log_finished(info)
            self._fire_callbacks(info)
        self.logger.info("engine stopped", stuck_workers=sum(t.is_alive() for t in workers))
        self._after_shutdown()
        self._log.close()

    def _after_shutdown(self) -> None:
        if self._store is not None:
            self._store.close(clean=True, empty=not self._jobs)

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        kind: str,
        params: Any = None,
        *,
        priority: Union[str, int] = "normal",
        label: Optional[str] = None,
        timeout: Optional[float] = None,
        max_retries: int = 0,
        memory_mb: Optional[int] = None,
        held: bool = False,
    ) -> str:
        """Queue a job and return its id at once.

        Args:
            kind: a registered kind name.
            params: a dict (or the kind's params model) validated against the kind.
            priority: "urgent" | "high" | "normal" | "low" or an int 0..9 (0 first).
            label: shown in the UI; defaults to the kind name.
            timeout: seconds from ``running`` after which the job fails with ``Timeout``.
            max_retries: extra tries after a failure, with 1 s, 2 s, 4 s ... backoff.
            memory_mb: memory the job needs; dispatch waits until it is free.
            held: queue it but wait for ``release()`` before it runs.

        Raises:
            UnknownKind, InvalidParams, ValueError, TypeError: bad input; nothing queued.
            QueueFull: ``max_queued`` jobs are already queued.
            EngineClosed: the engine was shut down.
        """
        if kind == PYTHON_CALL:
            raise InvalidParams("python.call jobs are made with run(fn, *args), not submit()")
        job = self._build(kind, params, priority, label, timeout, max_retries, memory_mb, held)
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(1)
            self._enqueue_locked(job)
        return job.id

    def submit_many(self, specs: list[dict]) -> list[str]:
        """Queue several jobs, all or nothing. Each dict holds submit's arguments by name.

        Raises:
            The errors of ``submit``, naming the spec's index; nothing is queued.
        """
        if not isinstance(specs, (list, tuple)):
            raise TypeError(f"submit_many takes a list of dicts, got {type(specs).__name__}")
        allowed = {"kind", "params", "priority", "label", "timeout", "max_retries", "memory_mb", "held"}
        built = []
        for i, spec in enumerate(specs):
            try:
                if not isinstance(spec, dict):
                    raise TypeError(f"a job spec must be a dict, got {type(spec).__name__}")
                unknown = set(spec) - allowed
                if unknown:
                    raise TypeError(
                        f"unknown job spec keys {sorted(unknown)} (allowed: {sorted(allowed)})"
                    )
                if "kind" not in spec:
                    raise TypeError("a job spec needs a 'kind'")
                if spec["kind"] == PYTHON_CALL:
                    raise InvalidParams("python.call jobs are made with run(fn), not submit_many()")
                built.append(
                    self._build(
                        spec["kind"],
                        spec.get("params"),
                        spec.get("priority", "normal"),
                        spec.get("label"),
                        spec.get("timeout"),
                        spec.get("max_retries", 0),
                        spec.get("memory_mb"),
                        spec.get("held", False),
                    )
                )
            except Exception as exc:
                raise type(exc)(f"specs[{i}]: {exc}") from None
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(len(built))
            for job in built:
                self._enqueue_locked(job)
        return [job.id for job in built]

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        label: Optional[str] = None,
        priority: Union[str, int] = "normal",
        **kwargs: Any,
    ) -> str:
        """Run ``fn(*args, **kwargs)`` as a job of kind ``python.call``; returns its id.

        Such jobs cannot be recovered after a crash (they come back ``interrupted``).
        Inside ``fn``, ``tq.current_context()`` gives the JobContext.
        """
        if not callable(fn):
            raise TypeError(f"run() needs a callable, got {fn!r}")
        name = f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', repr(fn))}"
        job = self._build(PYTHON_CALL, {"callable": name}, priority, label or name, None, 0, None, False)
        job.callable = (fn, args, kwargs)
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(1)
            self._enqueue_locked(job)
        return job.id

    def _spec_or_none(self, kind: str) -> Optional[KindSpec]:
        return PYTHON_CALL_SPEC if kind == PYTHON_CALL else self._registry.find(kind)

    def _build(
        self,
        kind: Any,
        params: Any,
        priority: Any,
        label: Any,
        timeout: Any,
        max_retries: Any,
        memory_mb: Any,
        held: Any,
    ) -> JobRecord:
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a kind name (str), got {kind!r}")
        spec = PYTHON_CALL_SPEC if kind == PYTHON_CALL else self._registry.get(kind)
        check = self.submit_check
        if check is not None:
            refusal = check(spec)
            if refusal:
                raise NotPermitted(refusal)
        json_params = spec.validate_params(params)
        prio = parse_priority(priority)
        if label is not None and not isinstance(label, str):
            raise TypeError(f"label must be a str or None, got {type(label).__name__}")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
            timeout = float(timeout)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if memory_mb is not None:
            if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
                raise ValueError(f"memory_mb must be a positive int or None, got {memory_mb!r}")
            limit = self._config.max_memory_mb
            if limit is not None and memory_mb > limit and not spec.out_of_process:
                raise ValueError(
                    f"memory_mb={memory_mb} exceeds max_memory_mb={limit}: the job could never start"
                )
        if not isinstance(held, bool):
            raise TypeError(f"held must be a bool, got {held!r}")
        return JobRecord(
            f"{self._id_prefix}-{next(self._id_counter)}",
            kind,
            label if label else kind,
            json_params,
            prio,
            self._wall(),
            max_retries=max_retries,
            timeout=timeout,
            memory_mb=memory_mb,
            held=held,
        )

    def _check_accepting_locked(self) -> None:
        if self._closing:
            raise EngineClosed("the engine is shut down and takes no new jobs")

    def _check_capacity_locked(self, n: int) -> None:
        queued = len(self._scheduler)
        limit = self._config.max_queued
        if queued + n > limit:
            raise QueueFull(
                f"queue is full: {queued} jobs queued, {n} more would exceed max_queued={limit}"
            )

    def _enqueue_locked(self, job: JobRecord) -> None:
        self._jobs[job.id] = job
        self._events.state(job)  # submitted
        job.state = _S.QUEUED
        self._scheduler.add(job)
        self._events.state(job)
        self.order_version += 1
        self._changed_locked(job, urgent=True)
        if job.ready and self._idle:
            self._work_cv.notify()

    # ------------------------------------------------------------------ queries

    def _get_locked(self, job_id: Any) -> JobRecord:
        job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            if not isinstance(job_id, str):
                raise TypeError(f"job id must be a str, got {job_id!r}")
            if job_id in self._evicted:
                raise JobNotFound(
                    f"job {job_id!r} finished and was evicted from history "
                    f"(history_limit={self._config.history_limit})"
                )
            raise JobNotFound(f"unknown job id {job_id!r}")
        return job

    def get(self, job_id: str) -> JobInfo:
        """An immutable snapshot of the job.

        Raises:
            KeyError (``JobNotFound``): unknown or evicted id.
        """
        with self._lock:
            return self._get_locked(job_id).snapshot()

    def jobs(self, states: Any = None) -> list[JobInfo]:
        """Snapshots: running first, then queued in dispatch order, then finished newest first."""
        wanted = parse_states(states)
        with self._lock:
            running = sorted(self._running.values(), key=lambda j: (j.run_started or 0.0, j.id))
            ordered = itertools.chain(
                running,
                self._scheduler,
                (self._jobs[i] for i in reversed(self._finished)),
            )
            return [j.snapshot() for j in ordered if wanted is None or j.state in wanted]

    def stats(self) -> EngineStats:
        """Counts, worker use, throughput (jobs finished per minute over the last minute), memory."""
        with self._lock:
            now = self._clock()
            self._trim_finish_times_locked(now)
            held = sum(1 for j in self._scheduler if j.held)
            return EngineStats(
                queued=len(self._scheduler),
                held=held,
                running=len(self._running),
                max_workers=self._config.max_workers,
                busy_workers=self._busy,
                completed=self._counts[_S.COMPLETED],
                failed=self._counts[_S.FAILED],
                cancelled=self._counts[_S.CANCELLED],
                interrupted=self._counts[_S.INTERRUPTED],
                finished_kept=len(self._finished),
                throughput_per_min=len(self._finish_times) * 60.0 / THROUGHPUT_WINDOW_S,
                waiting_for_memory=1 if self._memory_blocked is not None else 0,
                paused=self._paused,
                process_memory_mb=round(self._memory.process_mb(), 1),
                available_memory_mb=round(self._memory.available_mb(), 1),
                write_error=self._write_error(),
            )

    def _write_error(self) -> Optional[str]:
        return self._store.error if self._store is not None else None

    def _trim_finish_times_locked(self, now: float) -> None:
        times = self._finish_times
        while times and times[0] < now - THROUGHPUT_WINDOW_S:
            times.popleft()

    # ------------------------------------------------------------------ steering

    def cancel(self, job_id: str) -> bool:
        """Cancel a job. Queued: cancelled at once. Running: asked to stop; it ends
        ``cancelled`` when its handler returns (a result it still returns is discarded).

        Returns:
            True if the job was cancelled or asked to stop, False if it had already finished.

        Raises:
            KeyError (``JobNotFound``): unknown id.
        """
        with self._lock:
            job = self._get_locked(job_id)
            if job.state.is_terminal:
                return False
            if job.in_queue:
                self._unqueue_locked(job)
                job.message = "cancelled before it ran"
                info = self._terminal_locked(job, _S.CANCELLED, self._wall())
            else:
                if job.cancel_reason != "user":
                    self._request_stop_locked(job, "user")
                return True
        self._log_finished(info)
        self._fire_callbacks(info)
        return True

    def _unqueue_locked(self, job: JobRecord) -> None:
        self._scheduler.remove(job)
        job.not_before = None
        if self._memory_blocked is job:
            self._memory_blocked = None  # the jobs behind it may fit
            self._work_cv.notify_all()
        self.order_version += 1

    def _request_stop_locked(self, job: JobRecord, reason: str) -> None:
        job.cancel_requested = True
        job.cancel_reason = reason
        if job.cancel_event is not None:
            job.cancel_event.set()
        self._events.progress(job)
        self._changed_locked(job, urgent=False)

    def retry(self, job_id: str, params: Optional[dict] = None) -> str:
        """Queue a new job from a finished one; ``params`` (a dict) overrides some of its params.

        Raises:
            InvalidStateError: the job has not finished, or is an ad-hoc call whose callable is gone.
            InvalidParams: the changed params do not validate.
        """
        if params is not None and not isinstance(params, dict):
            raise InvalidParams(f"retry params must be a dict of changes, got {type(params).__name__}")
        with self._lock:
            old = self._get_locked(job_id)
            if not old.state.is_terminal:
                raise InvalidStateError(
                    f"job {job_id!r} is {old.state.value}: only finished jobs "
                    "(completed, failed, cancelled, interrupted) can be retried"
                )
            kind, label, callable_ = old.kind, old.label, old.callable
            merged = {**old.params, **(params or {})}
            options = (old.priority, old.timeout, old.max_retries, old.memory_mb)
        if kind == PYTHON_CALL:
            if callable_ is None:
                raise InvalidStateError(
                    f"job {job_id!r} ran an ad-hoc callable from an earlier session; "
                    "it cannot be retried, run it again with run()"
                )
            if params:
                raise InvalidParams("python.call jobs take no changed params; use run() with new arguments")
        priority, timeout, max_retries, memory_mb = options
        job = self._build(kind, merged, priority, label, timeout, max_retries, memory_mb, False)
        job.callable = callable_
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(1)
            self._enqueue_locked(job)
        self.logger.info("job retried", job_id=job.id, kind=kind, retry_of=job_id)
        return job.id

    def move(self, job_id: str, where: str) -> bool:
        """Reorder a queued job within its priority band: "top" | "up" | "down" | "bottom".

        Returns:
            True if it moved, False if it already stood there.

        Raises:
            ValueError: bad ``where``. InvalidStateError: the job is not queued.
        """
        if where not in MOVE_WHERE:
            raise ValueError(f"where must be one of {', '.join(map(repr, MOVE_WHERE))}, got {where!r}")
        with self._lock:
            job = self._get_locked(job_id)
            if not job.in_queue:
                raise InvalidStateError(
                    f"job {job_id!r} is {job.state.value}: only queued jobs can be moved"
                )
            rekeyed = self._scheduler.move(job, where)
            for other in rekeyed:
                self._changed_locked(other, urgent=True)
            if rekeyed:
                self.order_version += 1
            return bool(rekeyed)

    def release(self, ids: IdList = None) -> int:
        """Let held jobs run (all held jobs when ``ids`` is None). Returns how many were released.

        Raises:
            KeyError: unknown id. InvalidStateError: a named job is not queued.
            UnknownKind: a named job's kind is not registered (it stays held).
        """
        with self._lock:
            if ids is None:
                targets = [j for j in self._scheduler if j.held]
            else:
                targets = [self._get_locked(i) for i in _id_list(ids)]
                for job in targets:
                    if not job.in_queue:
                        raise InvalidStateError(
                            f"job {job.id!r} is {job.state.value}: only queued jobs can be released"
                        )
                    self._spec_for_release(job)
            released = 0
            for job in targets:
                if not job.held or self._spec_or_none(job.kind) is None:
                    continue
                job.held = False
                if job.not_before is None:
                    self._scheduler.set_ready(job, True)
                if job.message and job.message.startswith("held"):
                    job.message = None
                self._events.progress(job)
                self._changed_locked(job, urgent=True)
                released += 1
            if released:
                self._work_cv.notify_all()
            return released

    def _spec_for_release(self, job: JobRecord) -> KindSpec:
        spec = self._spec_or_none(job.kind)
        if spec is None:
            raise UnknownKind(
                f"job {job.id!r} needs kind {job.kind!r}, which is not registered; "
                "enable the add-on that provides it first"
            )
        return spec

    def pause(self) -> None:
        """Start no new jobs until ``resume()``; running jobs go on."""
        with self._lock:
            if not self._paused:
                self._paused = True
                self._events.notice("queue paused")

    def resume(self) -> None:
        """Undo ``pause()``."""
        with self._lock:
            if self._paused:
                self._paused = False
                self._events.notice("queue resumed")
                self._work_cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def configure(self, **changes: Any) -> EngineConfig:
        """Change limits live (e.g. ``max_workers=2``). Returns the new config.

        Raises:
            pydantic.ValidationError (a ValueError): an unknown field or a bad value;
            nothing changes.
        """
        if "state_dir" in changes and self._started and changes["state_dir"] != self._config.state_dir:
            raise ValueError("state_dir cannot change while the engine runs; create a new Engine")
        new = EngineConfig.model_validate({**self._config.model_dump(), **changes})
        with self._lock:
            old, self._config = self._config, new
            if self._started and not self._closing:
                self._spawn_workers_locked()
            self._evict_locked()
            self._memory.invalidate()
            self._work_cv.notify_all()
            self._timer_cv.notify_all()
        if new.log_level != old.log_level:
            self._log.set_level(new.log_level)
        return new

    def clear_finished(self) -> int:
        """Forget every finished job. Returns how many."""
        with self._lock:
            n = len(self._finished)
            for job_id in list(self._finished):
                self._forget_locked(job_id)
            self._finished.clear()
            if n:
                self.order_version += 1
                self._changed_locked(None, urgent=True)
            return n

    def _forget_locked(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._events.forget(job_id)
        self._progress_dirty.pop(job_id, None)
        if self._store is not None:
            self._removed.add(job_id)
        self._evicted[job_id] = None
        if len(self._evicted) > EVICTED_MEMORY:
            self._evicted.popitem(last=False)

    def _evict_locked(self) -> None:
        limit = self._config.history_limit
        finished = self._finished
        while len(finished) > limit:
            job_id, _ = finished.popitem(last=False)
            self._forget_locked(job_id)

    # ------------------------------------------------------------------ waiting, callbacks, pump

    def wait(self, ids: IdList = None, timeout: Optional[float] = None) -> bool:
        """Block until the jobs finish (all unfinished jobs when ``ids`` is None).

        On the main thread it keeps running main-thread calls (and ``main_tick``,
        the Blender pump) while it waits, so ``call_on_main`` works in headless
        scripts. An evicted id counts as finished.

        Returns:
            True if all finished, False if ``timeout`` ran out first.

        Raises:
            KeyError (``JobNotFound``): an id that was never known here.
        """
        on_main = threading.current_thread() is threading.main_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if ids is None:
                watch = [j.id for j in self._jobs.values() if not j.state.is_terminal]
            else:
                watch = list(_id_list(ids))
                for job_id in watch:
                    if job_id not in self._jobs and job_id not in self._evicted:
                        self._get_locked(job_id)  # raises with a clear message
        cursor = 0  # watch[:cursor] have finished; jobs mostly finish in order
        while True:
            if on_main:
                tick = self.main_tick
                if tick is not None:
                    tick()  # the Blender pump: events into the panel, callbacks
                self.run_main_calls(0.05)  # this engine's own calls, whoever the tick serves
            with self._lock:
                jobs = self._jobs
                while cursor < len(watch):
                    job = jobs.get(watch[cursor])
                    if job is not None and not job.state.is_terminal:
                        break
                    cursor += 1
                if cursor == len(watch):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if on_main and len(self._main_calls):
                    continue
                step = 0.1 if on_main else 1.0  # main: keep pumping; others: re-check the clock
                self._done_waiters += 1
                try:
                    self._done_cv.wait(step if remaining is None else min(step, remaining))
                finally:
                    self._done_waiters -= 1
        if on_main:  # callbacks of the jobs just waited for were queued when they finished
            self.run_main_calls(0.05)
        return True

    def on_finished(self, callback: Callable[[JobInfo], Any], *, on_main: bool = True) -> Callable[[], None]:
        """Call ``callback(info)`` whenever a job finishes; returns a function that unsubscribes.

        With ``on_main`` (the default) it runs on the main thread, from the pump
        (``run_main_calls``) or ``wait()``; otherwise on the worker thread that
        finished the job. Exceptions are logged, never raised into the engine.
        """
        if not callable(callback):
            raise TypeError(f"on_finished needs a callable, got {callback!r}")
        entry = (callback, bool(on_main))
        with self._lock:
            self._callbacks.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._callbacks:
                    self._callbacks.remove(entry)

        return unsubscribe

    def _queue_main_callbacks_locked(self, info: JobInfo) -> None:
        # Queued under the lock, in the same hold that makes the job terminal, so a
        # main-thread wait() that sees the job finished also finds its callbacks.
        for callback, on_main in self._callbacks:
            if on_main:
                self._main_calls.put(self._safe_callback, callback, info)

    def _fire_callbacks(self, info: Optional[JobInfo]) -> None:
        """Run the worker-thread callbacks (main-thread ones are already queued)."""
        if info is None or not self._callbacks:
            return
        for callback, on_main in list(self._callbacks):
            if not on_main:
                self._safe_callback(callback, info)

    def _safe_callback(self, callback: Callable[[JobInfo], Any], info: JobInfo) -> None:
        try:
            callback(info)
        except Exception:
            self.logger.exception("on_finished callback failed", job_id=info.id, callback=repr(callback))

    def drain_events(self) -> list[Event]:
        """Everything that happened since the last drain: state changes in order, at most
        one (the latest) progress event per job, and notices."""
        with self._lock:
            return self._events.drain()

    def run_main_calls(self, budget_s: float = 0.005) -> int:
        """Run queued main-thread calls in order within ``budget_s`` seconds. Returns how many ran."""
        if not len(self._main_calls):
            return 0
        return self._main_calls.run(budget_s)

    @property
    def pending_main_calls(self) -> int:
        return len(self._main_calls)

    def flush(self, timeout: float = 10.0) -> bool:
        """Write the sidecar (and the log) now; wait until it holds every change made before the call.

        The write itself happens on the writer thread. Returns False if it failed or
        did not finish within ``timeout`` (the error is in ``stats().write_error``);
        True at once without a ``state_dir``.
        """
        self._log.flush()
        if self._store is None:
            return True
        return self._store.flush(timeout)

    @property
    def sidecar_path(self) -> Optional[Path]:
        return self._store.path if self._store is not None else None

    @property
    def store(self) -> Optional[SnapshotStore]:
        return self._store

    # ------------------------------------------------------------------ adoption

    def _adopt_locked(self) -> None:
        """Take over the sidecars of dead or shut-down engines in ``state_dir``."""
        store = self._store
        assert store is not None
        problems: list[str] = []
        moved: list[str] = []
        documents: list[tuple[str, dict]] = []
        for path in sidecar_candidates(store.dir, store.path):
            try:
                data = read_sidecar(path)
            except (OSError, SidecarError) as exc:
                reason = "unreadable" if isinstance(exc, OSError) else "corrupt"
                problems.append(f"{path.name}: {exc}")
                try:
                    moved.append(move_aside(path, reason).name)
                except OSError as move_exc:
                    problems.append(f"{path.name}: could not move it aside: {move_exc}")
                self.logger.error("damaged queue file moved aside", path=str(path), error=str(exc))
                continue
            owner = data["_owner"]
            if CLAIM_MARK not in path.name and not data.get("closed") and owner.is_alive():
                continue  # a live engine's queue: never touch it
            claimed = claim_name(path, store.owner)
            try:
                path.rename(claimed)  # atomic: of two engines adopting at once, one wins
            except FileNotFoundError:
                continue
            except OSError as exc:
                problems.append(f"{path.name}: cannot claim it: {exc}")
                continue
            source = path.name.split(CLAIM_MARK, 1)[0]
            stale_tmp = path.with_name(f".{source}.tmp")  # a write its owner never finished
            try:
                stale_tmp.unlink()
            except OSError:
                pass
            documents.append((source, data))
            store.after_next_write(claimed)  # deleted once our sidecar holds its jobs
        recovery = self._merge_documents_locked(documents, problems=problems, moved=moved)
        if recovery is not None:
            self.recovery = recovery
            self.logger.info("recovered queue", summary=recovery.summary, problems=list(recovery.problems))

    def _merge_documents_locked(
        self,
        documents: list[tuple[str, dict]],
        *,
        problems: Optional[list[str]] = None,
        moved: Optional[list[str]] = None,
        hold: bool = False,
    ) -> Optional[Recovery]:
        """Adopt the jobs of checked queue documents (sidecars, or a .blend's copy).

        The same job may stand in several documents (an adopter that died before
        deleting the file it claimed); its most advanced copy wins, so a job that
        finished anywhere is never queued again.
        """
        problems = problems if problems is not None else []
        moved = moved if moved is not None else []
        counts: collections.Counter[str] = collections.Counter()
        best: dict[tuple, tuple[str, JobRecord]] = {}
        for source, data in documents:
            for entry in data["jobs"]:
                try:
                    job = job_from_dict(entry)
                except SidecarError as exc:
                    problems.append(f"{source}: {exc}")
                    continue
                ident = (job.id, job.kind, job.created_at)
                kept = best.get(ident)
                if kept is not None:
                    counts["duplicates"] += 1
                if kept is None or _RANK[job.state] > _RANK[kept[1].state]:
                    best[ident] = (source, job)
        queued: list[JobRecord] = []
        finished: list[JobRecord] = []
        for source, job in best.values():
            self._adopt_record_locked(job, source, counts, queued, finished, hold=hold)
        queued.sort(key=lambda j: (j.priority, j.key[1] if j.key else 0))
        for job in queued:
            self._scheduler.add(job)
        if finished:
            finished.sort(key=lambda j: j.finished_at or 0.0)
            self._finished = collections.OrderedDict(
                [(j.id, None) for j in finished] + [(i, None) for i in self._finished]
            )
        for job in queued + finished:
            self._events.state(job)
            self._changed_locked(job, urgent=True)
        self._evict_locked()
        if queued:
            self._work_cv.notify_all()
        if not documents and not moved:
            return None
        self.order_version += 1
        recovery = Recovery(
            sources=tuple(source for source, _ in documents),
            requeued=counts["requeued"],
            resumed=counts["resumed"],
            interrupted=counts["interrupted"],
            held=counts["held"],
            finished=counts["finished"],
            duplicates=counts["duplicates"],
            moved_aside=tuple(moved),
            problems=tuple(problems),
        )
        level = "warning" if problems or counts["interrupted"] else "info"
        self._events.notice(recovery.summary, level=level)
        return recovery

    def export_state(self) -> dict:
        """The whole queue as a JSON-ready document (the sidecar's schema), e.g. to
        store it inside a .blend file."""
        with self._lock:
            captured = [_capture(job) for job in self._jobs.values()]
        return {
            "app": APP,
            "schema_version": SCHEMA_VERSION,
            "owner": (self._store.owner if self._store else Owner.current(self._id_prefix)).as_dict(),
            "closed": True,
            "written_at": time.time(),
            "jobs": [job_to_dict(values, self.workdir_for) for values in captured],
        }

    def import_state(self, document: Any, *, source: str = "imported", hold: bool = True) -> Recovery:
        """Adopt the jobs of an ``export_state()`` document, e.g. from an opened .blend.

        Jobs already known here (same id) are not adopted twice. With ``hold``,
        unfinished jobs come back held: they wait for ``release()``.

        Raises:
            ValueError (``SidecarError``): the document is not a queue of this schema.
        """
        data = check_document(document)
        with self._lock:
            recovery = self._merge_documents_locked([(source, data)], hold=hold)
        assert recovery is not None
        self.logger.info("imported queue", source=source, summary=recovery.summary)
        return recovery

    def _adopt_record_locked(
        self,
        job: JobRecord,
        source: str,
        counts: collections.Counter,
        queued: list[JobRecord],
        finished: list[JobRecord],
        *,
        hold: bool = False,
    ) -> None:
        existing = self._jobs.get(job.id)
        if existing is not None:
            if existing.kind == job.kind and existing.created_at == job.created_at:
                counts["duplicates"] += 1
                if not (existing.in_queue and _RANK[job.state] > _RANK[existing.state]):
                    return
                # The copy here is behind the adopted one (e.g. restored from a .blend
                # while the sidecar saw it finish): the adopted one wins.
                self._unqueue_locked(existing)
                del self._jobs[existing.id]
            else:
                n = 2
                while f"{job.id}~{n}" in self._jobs:
                    n += 1
                job.id = f"{job.id}~{n}"
        job.recovered_from = source
        spec = self._spec_or_none(job.kind)
        state = job.state
        if state.is_terminal:
            counts["finished"] += 1
            finished.append(job)
            self._jobs[job.id] = job
            return
        resumable = spec is not None and spec.resumable
        if job.kind != PYTHON_CALL and (state is not _S.RUNNING or resumable):
            if state is _S.DISPATCHED:
                job.attempt = max(0, job.attempt - 1)  # claimed, never started
            if state is _S.RUNNING:
                counts["resumed"] += 1
                job.attempt = max(0, job.attempt - 1)  # the resume continues that attempt
                job.message = (
                    "resumes from its checkpoint after a crash"
                    if job.checkpoint is not None
                    else "starts again after a crash (it had no checkpoint)"
                )
            else:
                counts["requeued"] += 1
            job.state = _S.QUEUED
            if spec is None:
                job.held = True
                job.message = (
                    f"held: kind {job.kind!r} is not registered; enable the add-on that "
                    "provides it, then release the job"
                )
            elif hold or not self._config.auto_resume:
                job.held = True
            if job.held:
                counts["held"] += 1
            job.ready = not job.held
            queued.append(job)
            self._jobs[job.id] = job
            return
        counts["interrupted"] += 1
        job.state = _S.INTERRUPTED
        job.finished_at = self._wall()
        if job.kind == PYTHON_CALL:
            job.message = "ad-hoc python.call jobs cannot be recovered after a crash; run it again"
        elif spec is None:
            job.message = (
                f"was running when its process ended; kind {job.kind!r} is not registered, "
                "so it cannot resume (retry it once the add-on is enabled)"
            )
        else:
            job.message = "was running when its process ended; its partial result is kept"
        finished.append(job)
        self._jobs[job.id] = job

    # ------------------------------------------------------------------ workers

    def _spawn_workers_locked(self) -> None:
        while len(self._workers) < self._config.max_workers:
            thread = threading.Thread(
                target=self._worker_main, name=f"taskqueue-worker-{next(self._heap_n)}", daemon=True
            )
            self._workers.add(thread)
            thread.start()

    def _worker_main(self) -> None:
        me = threading.current_thread()
        job: Optional[JobRecord] = None
        while True:
            if job is None:
                with self._lock:
                    while True:
                        if self._closing or len(self._workers) > self._config.max_workers:
                            self._workers.discard(me)
                            return
                        job = self._claim_locked()
                        if job is not None:
                            break
                        self._idle += 1
                        try:
                            self._work_cv.wait()
                        finally:
                            self._idle -= 1
            # _execute finishes the job and, in the same lock hold, claims the next one.
            job = self._execute(job)

    def _wake_idle_locked(self) -> None:
        """Wake one idle worker if one waits and something is ready to run."""
        if self._idle and self._scheduler.ready_count():
            self._work_cv.notify()

    def _kind_has_room(self, kind: str) -> bool:
        spec = self._spec_or_none(kind)
        limit = spec.max_concurrency if spec is not None else None
        return limit is None or self._kind_running[kind] < limit

    def _claim_locked(self) -> Optional[JobRecord]:
        if self._paused or not self._started or self._busy >= self._config.max_workers:
            return None
        job = self._scheduler.next_ready(self._kind_has_room)
        if job is None or not self._memory_admits_locked(job):
            return None
        self._scheduler.remove(job)
        self.order_version += 1
        job.state = _S.DISPATCHED
        job.attempt += 1
        job.not_before = None
        self._running[job.id] = job
        self._kind_running[job.kind] += 1
        self._busy += 1
        self._reserve_locked(job, 1)
        self._events.state(job)
        self._mark_running_locked(job)
        return job

    def _inside(self, job: JobRecord) -> bool:
        """Whether the job's memory is used inside this process (see out_of_process)."""
        spec = self._registry.find(job.kind)
        return spec is None or not spec.out_of_process

    def _reserve_locked(self, job: JobRecord, sign: int) -> None:
        """Reserve (+1) or release (-1) a running job's memory_mb; a release undoes
        exactly what the reservation took, whatever the registry says by then."""
        if sign > 0:
            need = job.memory_mb or 0
            if need:
                inside = need if self._inside(job) else 0
                self._reservations[job.id] = (need, inside)
                self._reserved_mb += need
                self._reserved_inside_mb += inside
        else:
            need, inside = self._reservations.pop(job.id, (0, 0))
            self._reserved_mb -= need
            self._reserved_inside_mb -= inside

    def _memory_admits_locked(self, job: JobRecord) -> bool:
        cfg = self._config
        need = job.memory_mb or 0
        if cfg.min_free_memory_mb is None and cfg.max_memory_mb is None and not need:
            if self._memory_blocked is not None:  # the limits were lifted
                self._memory_blocked.message = None
                self._events.progress(self._memory_blocked)
                self._memory_blocked = None
            return True
        reasons = []
        free = self._memory.available_mb() - self._reserved_mb
        floor = cfg.min_free_memory_mb or 0
        if free - need < floor:
            reasons.append(
                f"needs {need} MB + {floor} MB kept free, {max(free, 0):.0f} MB available"
                if need
                else f"{max(free, 0):.0f} MB free, below min_free_memory_mb={floor}"
            )
        if cfg.max_memory_mb is not None:
            used = self._memory.process_mb() + self._reserved_inside_mb
            inside = need if self._inside(job) else 0
            if used + inside > cfg.max_memory_mb:
                reasons.append(
                    f"Blender uses {used:.0f} MB{f' + {inside} MB needed' if inside else ''}, "
                    f"above max_memory_mb={cfg.max_memory_mb}"
                )
        if reasons:
            if self._memory_blocked is not job:
                self._memory_blocked = job
                job.message = "waiting for memory: " + "; ".join(reasons)
                self._events.progress(job)
                self.logger.info("dispatch waits for memory", job_id=job.id, reason=job.message)
                self._timer_cv.notify()
            return False
        if self._memory_blocked is job:
            self._memory_blocked = None
            job.message = None
        return True

    def _execute(self, job: JobRecord) -> Optional[JobRecord]:
        """Run ``job``'s handler and record the outcome; returns the next job to run."""
        spec = self._spec_or_none(job.kind)
        stage = "params"
        outcome: tuple
        try:
            if spec is None:
                raise UnknownKind(
                    f"job kind {job.kind!r} is not registered (is the add-on that provides it enabled?)"
                )
            params = spec.handler_params(job.params)
            if job.cancel_requested:
                raise JobCancelled("cancelled before it started")
            ctx = JobContext(self, job, params, job.checkpoint if spec.resumable else None)
            stage = "run"
            _local.ctx = ctx
            result = spec.handler(ctx, params)
            outcome = ("ok", result)
        except JobCancelled as exc:
            outcome = ("cancelled", exc)
        except BaseException as exc:  # a handler's SystemExit must not kill the worker
            outcome = ("error", exc, traceback.format_exc(), None if stage == "run" else stage)
        finally:
            _local.ctx = None
        return self._finish(job, spec, outcome)

    def _mark_running_locked(self, job: JobRecord) -> None:
        job.state = _S.RUNNING
        job.started_at = self._wall()
        job.run_started = now = self._clock()
        job.progress = 0.0 if job.checkpoint is None else job.progress
        job.eta_seconds = None
        if job.timeout is not None:
            job.deadline = now + job.timeout
            heapq.heappush(self._deadlines, (job.deadline, next(self._heap_n), job))
            self._timer_cv.notify()
        self._events.state(job)
        self._changed_locked(job, urgent=True)

    def _finish(self, job: JobRecord, spec: Optional[KindSpec], outcome: tuple) -> Optional[JobRecord]:
        info = None
        nxt = None
        with self._worker_lock:
            if job.id not in self._running:
                return None  # recorded interrupted at shutdown; whatever it returned is moot
            del self._running[job.id]
            self._busy -= 1
            self._kind_running[job.kind] -= 1
            self._reserve_locked(job, -1)
            job.deadline = None
            now_wall = self._wall()
            reason = job.cancel_reason if job.cancel_requested else None
            kind = outcome[0]
            if reason == "shutdown" and kind != "ok":
                if spec is not None and spec.resumable and kind == "cancelled":
                    self._requeue_locked(job, "stopped by shutdown; resumes from its checkpoint")
                else:
                    job.message = "stopped by shutdown"
                    info = self._terminal_locked(job, _S.INTERRUPTED, now_wall)
            elif reason == "user" or (kind == "cancelled" and reason is None):
                if kind == "cancelled" and str(outcome[1]):
                    job.message = str(outcome[1])  # the handler's word on what it stopped
                info = self._terminal_locked(job, _S.CANCELLED, now_wall)
            elif reason == "timeout":
                err = JobError(
                    "Timeout",
                    f"timed out after {job.timeout:g} s",
                    "",
                    job.stage,
                    job.attempt,
                )
                info = self._fail_or_retry_locked(job, err, now_wall)
            elif kind == "error":
                exc, tb, stage = outcome[1], outcome[2], outcome[3]
                err = JobError(
                    type(exc).__name__,
                    str(exc) or type(exc).__name__,
                    tb,
                    stage or job.stage,
                    job.attempt,
                )
                info = self._fail_or_retry_locked(job, err, now_wall)
            else:
                job.result = outcome[1]
                job.progress = 1.0
                job.eta_seconds = 0.0
                info = self._terminal_locked(job, _S.COMPLETED, now_wall)
            if not self._closing and len(self._workers) <= self._config.max_workers:
                nxt = self._claim_locked()
            self._wake_idle_locked()  # a kind or memory slot may have freed up for another
            self._notify_done_locked()
        if info is not None:
            self._log_finished(info)
            self._fire_callbacks(info)
        return nxt

    def _fail_or_retry_locked(self, job: JobRecord, err: JobError, now_wall: float) -> Optional[JobInfo]:
        job.errors = job.errors + (err,)
        if job.attempt <= job.max_retries and not self._closing:
            delay = min(BACKOFF_CAP_S, 2.0 ** (job.attempt - 1))
            job.not_before = self._clock() + delay
            heapq.heappush(self._backoff, (job.not_before, next(self._heap_n), job))
            self._timer_cv.notify()
            self._requeue_locked(
                job,
                f"attempt {job.attempt} of {job.max_retries + 1} failed ({err.type}: "
                f"{_first_line(err.message)}); retrying in {delay:g} s",
                ready=False,
            )
            self.logger.warning(
                "job attempt failed; retrying",
                job_id=job.id, kind=job.kind, attempt=job.attempt, error=err.type, delay_s=delay,
            )
            return None
        job.message = f"{err.type}: {_first_line(err.message)}"
        return self._terminal_locked(job, _S.FAILED, now_wall)

    def _requeue_locked(self, job: JobRecord, message: str, *, ready: bool = True) -> None:
        job.state = _S.QUEUED
        job.message = message
        job.cancel_requested = False
        job.cancel_reason = None
        job.timed_out = False
        job.cancel_event = None
        job.ready = ready and not job.held
        self._scheduler.add(job, seq=job.key[1] if job.key else None)
        self.order_version += 1
        self._events.state(job)
        self._changed_locked(job, urgent=True)

    def _terminal_locked(self, job: JobRecord, state: JobState, now_wall: float) -> JobInfo:
        if job.id in self._running:  # interrupted by shutdown while its handler still runs
            del self._running[job.id]
            self._busy -= 1
            self._kind_running[job.kind] -= 1
            self._reserve_locked(job, -1)
        job.state = state
        job.finished_at = now_wall
        if state is not _S.COMPLETED:
            job.eta_seconds = None
            job.result = None
        job.cancel_event = None
        self._counts[state] += 1
        now = self._clock()
        self._finish_times.append(now)
        self._trim_finish_times_locked(now)
        self._finished[job.id] = None
        self.order_version += 1  # it moves from the running (or queued) part to history
        info = job.snapshot()
        self._events.state_info(info)
        if self._callbacks:
            self._queue_main_callbacks_locked(info)
        self._changed_locked(job, urgent=True)
        if len(self._finished) > self._config.history_limit:
            self._evict_locked()
        self._notify_done_locked()
        return info

    def _notify_done_locked(self) -> None:
        if self._done_waiters:
            self._done_cv.notify_all()

    def _log_finished(self, info: JobInfo) -> None:
        """Log a finished job; called with the lock released."""
        log = self.logger
        state = info.state
        if state is _S.COMPLETED:
            log.debug("job completed", job_id=info.id, kind=info.kind, attempt=info.attempt)
        elif state is _S.FAILED and info.error is not None:
            err = info.error
            log.warning(
                "job failed", job_id=info.id, kind=info.kind, attempt=info.attempt,
                error_type=err.type, error=err.message, stage=err.stage,
            )
        else:
            log.info(f"job {state.value}", job_id=info.id, kind=info.kind, reason=info.message)

    # ------------------------------------------------------------------ calls from JobContext

    def _report_progress(
        self, job: JobRecord, fraction: Optional[float], stage: Optional[str], message: Optional[str]
    ) -> None:
        # Deliberately lock-free: only the job's own handler thread reports its
        # progress, and it does so before the same thread records the outcome, so
        # these plain attribute stores never race with a state transition. The
        # event slot and the sidecar's dirty map are single dict stores.
        if job.state is not _S.RUNNING:
            return
        now = _perf()
        if now - job.yielded_at > GIL_YIELD_S:
            # A handler that reports progress in a tight pure-Python loop would hold
            # the GIL for whole switch intervals and starve Blender's main thread
            # (measured: 190 ms pump gaps with 8 such jobs). A blocking call hands
            # the GIL to a waiter, at most once a millisecond per job.
            job.yielded_at = now
            _sleep(0)
        if fraction is not None:
            job.progress = fraction
            if 0.0 < fraction < 1.0 and job.run_started is not None:
                elapsed = self._clock() - job.run_started
                job.eta_seconds = elapsed * (1.0 - fraction) / fraction
            elif fraction >= 1.0:
                job.eta_seconds = 0.0
        if stage is not None:
            job.stage = stage
        if message is not None:
            job.message = message
        self._events.progress(job)
        store = self._store
        if store is not None:
            self._progress_dirty[job.id] = job
            store.mark_lazy()

    def _record_checkpoint(self, job: JobRecord, data: dict) -> None:
        with self._lock:
            if job.state.is_terminal:
                return
            job.checkpoint = data
            job.partial_result = data
            self._events.progress(job)
            self._changed_locked(job, urgent=False)

    def _cancel_event(self, job: JobRecord) -> threading.Event:
        with self._lock:
            if job.cancel_event is None:
                job.cancel_event = threading.Event()
                if job.cancel_requested:
                    job.cancel_event.set()
            return job.cancel_event

    def _call_on_main(self, job: JobRecord, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if threading.current_thread() is threading.main_thread():
            return fn(*args, **kwargs)
        call = self._main_calls.put(fn, *args, **kwargs)
        with self._lock:
            self._notify_done_locked()  # a main-thread wait() runs it now
        while not call.done.wait(0.05):
            if (job.cancel_requested or self._closed) and self._main_calls.abandon(call):
                raise JobCancelled(f"job {job.id} was asked to stop while waiting for the main thread")
        if call.exc is not None:
            raise call.exc
        return call.result

    def workdir_for(self, job_id: str) -> Path:
        """The per-job work folder (not created here)."""
        cfg = self._config
        if cfg.work_dir is not None:
            root = cfg.work_dir
        elif cfg.state_dir is not None:
            root = cfg.state_dir / "jobs"
        else:
            root = Path(tempfile.gettempdir()) / "blender_taskqueue" / "jobs"
        return root / job_id

    # ------------------------------------------------------------------ watchdog

    def check_timers(self, now: Optional[float] = None) -> Optional[float]:
        """Run what is due at ``now`` (default: the engine's clock): retries whose backoff
        ended, timeouts of running jobs, a memory re-check. Returns seconds until the
        next thing is due, or None. The watchdog thread calls this; tests with an
        injected clock call it directly."""
        with self._lock:
            return self._check_timers_locked(self._clock() if now is None else now)

    def _check_timers_locked(self, now: float) -> Optional[float]:
        wake = False
        backoff = self._backoff
        while backoff and backoff[0][0] <= now:
            due, _, job = heapq.heappop(backoff)
            if job.in_queue and job.not_before == due:
                job.not_before = None
                if not job.held:
                    self._scheduler.set_ready(job, True)
                    wake = True
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            due, _, job = heapq.heappop(deadlines)
            if job.deadline == due and job.state in _ACTIVE and not job.cancel_requested:
                job.timed_out = True
                job.message = f"timed out after {job.timeout:g} s; waiting for the job to stop"
                self._request_stop_locked(job, "timeout")
                self.logger.warning("job timed out", job_id=job.id, kind=job.kind, timeout_s=job.timeout)
        if self._memory_blocked is not None:
            self._memory.invalidate()
            wake = True
        if wake:
            self._work_cv.notify_all()
        nxt = []
        if backoff:
            nxt.append(backoff[0][0] - now)
        if deadlines:
            nxt.append(deadlines[0][0] - now)
        if self._memory_blocked is not None:
            nxt.append(0.25)
        return max(0.0, min(nxt)) if nxt else None

    def _watchdog_main(self) -> None:
        with self._lock:
            while not self._closed:
                delay = self._check_timers_locked(self._clock())
                self._timer_cv.wait(delay)

    # ------------------------------------------------------------------ persistence hook

    def _changed_locked(self, job: Optional[JobRecord], *, urgent: bool) -> None:
        """Note that state the sidecar holds has changed: ``urgent`` for state
        transitions (written as soon as the writer is free), else within 0.5 s."""
        self.state_version += 1
        store = self._store
        if store is not None:
            if job is not None:
                self._dirty.add(job)
            store.mark(urgent)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:199] + "…"


def _id_list(ids: IdList) -> list[str]:
    if isinstance(ids, str):
        return [ids]
    if ids is None:
        return []
    try:
        out = list(ids)
    except TypeError:
        raise TypeError(f"ids must be a job id or an iterable of job ids, got {ids!r}") from None
    for i in out:
        if not isinstance(i, str):
            raise TypeError(f"job ids must be str, got {i!r}")
    return out
