"""The Engine: the one public facade, the one lock, and the job state machine.

Owns: every job record and every state transition (enqueue, claim, run,
finish, retry, requeue, terminal), all under one lock (``self._lock``); the
public API (submit, cancel, move, release, wait, ...); and the wiring of the
rooms that hold the other concerns, each with a small interface:

  submission.py  argument checks and the record a submission becomes
  admission.py   per-kind capacity and memory: may the next job start?
  timers.py      retry backoffs, timeouts and start times that fall due
  dependencies.py  who waits on whom (pipelines), and the rules of new edges
  workers.py     worker threads, the watchdog thread, the polite worker lock
  executor.py    where a claimed job's work runs (local thread; a cluster later)
  history.py     finished jobs kept, evicted ids, counts, throughput
  callbacks.py   on_finished subscribers, on the main thread or a worker's
  recovery.py    adopting dead engines' sidecars and .blend documents
  store.py       the sidecar writer thread and its files
  events.py      the coalescing event queue and main-thread calls

A worker claims a job atomically (removes it from the scheduler and marks it
dispatched under the lock), so a cancel and a start never both win. Callbacks
and handlers run with the lock released. Rooms never take the lock
themselves: the engine calls them while it holds it.

Must not touch: bpy, files (the store and recovery own those), threads other
than through ``WorkerPool``.
"""

from __future__ import annotations

import collections
import itertools
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from . import kinds as _kinds
from .admission import Admission
from .callbacks import Callbacks
from .context import JobContext
from .dependencies import Dependencies, plan_links, stuck
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
from .cluster import REMOTE_KEY, Refuse, dask_key
from .executor import Executor, LocalExecutor, Outcome
from .history import History
from .kinds import KindRegistry, KindSpec
from .logs import EngineLog
from .models import (
    DEPENDENCY_FAILED,
    MOVE_WHERE,
    Recovery,
    EngineConfig,
    EngineStats,
    Event,
    JobError,
    JobInfo,
    JobState,
    job_id_error,
    parse_states,
)
from .record import JobRecord
from .recovery import RANK, best_copies, claim_orphans, export_document, revive
from .resources import MemoryProbe
from .results import ResultLoader
from .scheduler import Scheduler
from .store import Owner, _capture, check_document, is_result_file, SnapshotStore
from .submission import (
    BATCH_REF,
    PYTHON_CALL,
    IdList,
    build_record,
    dependency_refs,
    first_line,
    id_list,
    pipeline_specs,
    spec_arguments,
)
from .timers import Timers
from .workers import WorkerLock, WorkerPool

BACKOFF_CAP_S = 60.0
GIL_YIELD_S = 0.001
MEMORY_RECHECK_S = 0.25  # how often the watchdog re-reads memory while a job waits for it
_perf = time.perf_counter
_sleep = time.sleep

_S = JobState
_SET_ASIDE = "set aside"  # a verdict of _memory_admits_locked: held, try the next job


def _python_call(ctx: JobContext, params: dict) -> Any:
    fn, args, kwargs = ctx._job.callable
    return fn(*args, **kwargs)


PYTHON_CALL_SPEC = KindSpec(
    name=PYTHON_CALL,
    handler=_python_call,
    recoverable=False,
    description="An ad-hoc Python callable (tq.run); not recoverable after a crash",
)



def _on_cluster(job: JobRecord) -> bool:
    """The job's current attempt runs on a dask cluster (it re-attaches after a restart)."""
    checkpoint = job.checkpoint
    return isinstance(checkpoint, dict) and checkpoint.get(REMOTE_KEY) == dask_key(job.id, job.attempt)

def _rename_edges(job: JobRecord, source: str, renamed: dict[tuple[str, str], str]) -> None:
    """An adopted job's edges follow the ids its document's jobs got here (``id~2``)."""
    def new(pid: str) -> str:
        return renamed.get((source, pid), pid)

    job.depends_on = tuple(new(p) for p in job.depends_on)
    if job.waiting:
        job.waiting = {new(p): None for p in job.waiting}
    if job.inputs:
        job.inputs = {new(p): v for p, v in job.inputs.items()}


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
        self._worker_lock = WorkerLock(self._lock)
        self._pool = WorkerPool(self, self._lock)
        self._work_cv = self._pool.work_cv
        self._timer_cv = self._pool.timer_cv
        self._done_cv = threading.Condition(self._lock)

        self._jobs: dict[str, JobRecord] = {}
        self._scheduler = Scheduler()
        self._running: dict[str, JobRecord] = {}
        self._history = History()
        self._admission = Admission(lambda: self._config, self._spec_or_none, self._memory)
        self._timers = Timers()
        self._deps = Dependencies()
        self._cascaded: list[JobInfo] = []  # dependents failed with a prerequisite, to announce
        self._local_executor: Executor = LocalExecutor(self)
        self._cluster: Optional[Any] = None  # a ClusterExecutor while config.cluster is set
        self._cluster_for: Optional[tuple] = None
        self._cluster_lock = threading.Lock()
        self._results = ResultLoader(self, self.workdir_for)
        self._busy = 0
        self._done_waiters = 0  # threads in wait()/shutdown() waiting on _done_cv

        self._events = EventQueue()
        self._main_calls = MainCallQueue()
        self._callbacks = Callbacks(self._main_calls, lambda: self.logger)
        self.main_tick: Optional[Callable[[], Any]] = None  # set by the Blender pump
        # Set by the host (Blender): a reason to refuse a kind at submit, or None.
        self.submit_check: Optional[Callable[[KindSpec, dict], Optional[str]]] = None

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
            self._pool.grow_locked(self._config.max_workers)
            self._pool.start_watchdog_locked()
            self._work_cv.notify_all()
        self._announce(None)
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
                if spec is not None and (spec.resumable or _on_cluster(job)):
                    continue  # stays "running" on disk; adoption re-queues it from its checkpoint
                job.message = (
                    f"did not stop within {timeout:g} s of shutdown"
                    if wait
                    else "still running when the engine shut down without waiting"
                )
                stuck.append(self._terminal_locked(job, _S.INTERRUPTED, now_wall))
            self._closed = True
            self._pool.stopped = True
            self._pool.wake_all_locked()
            workers = self._pool.others_locked()
        # Idle workers were woken and exit at once; a stuck one is not waited for
        # past the deadline (plus a moment for the idle ones).
        stuck_workers = self._pool.join(workers, max(deadline, time.monotonic()) + 0.2)
        for info in stuck:
            self._announce(info)
        self._announce(None)
        if self._cluster is not None:
            self._cluster.close()
        self._results.stop(1.0)
        self.logger.info("engine stopped", stuck_workers=stuck_workers)
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
        depends_on: IdList = None,
        not_before: Any = None,
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
            depends_on: job ids (or one id) that must all complete first; the job
                waits queued, and its handler gets their results in ``ctx.inputs``.
                If one fails, is cancelled or interrupted, this job ends ``failed``
                with a ``DependencyFailed`` error naming it.
            not_before: a ``datetime`` (naive: local time) or seconds from now; the
                job waits until then (wall clock, so it survives a restart).

        Raises:
            UnknownKind, InvalidParams, ValueError, TypeError: bad input (an unknown
                or failed prerequisite among them); nothing queued.
            QueueFull: ``max_queued`` jobs are already queued.
            EngineClosed: the engine was shut down.
        """
        if kind == PYTHON_CALL:
            raise InvalidParams("python.call jobs are made with run(fn, *args), not submit()")
        refs = dependency_refs(depends_on, batch=False)
        job = self._build(kind, params, priority, label, timeout, max_retries, memory_mb, held, not_before)
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(1)
            if refs:
                self._link_locked([job], [refs], {})
            self._enqueue_locked(job)
        return job.id

    def submit_many(self, specs: list[dict]) -> list[str]:
        """Queue several jobs, all or nothing. Each dict holds submit's arguments by
        name, plus an optional ``name``: another spec's ``depends_on`` may refer to it
        as ``"@name"``, so a whole pipeline is queued at once.

        Raises:
            The errors of ``submit``, naming the spec's index (a cycle or an unknown
            ``@name`` among them); nothing is queued.
        """
        if not isinstance(specs, (list, tuple)):
            raise TypeError(f"submit_many takes a list of dicts, got {type(specs).__name__}")
        built: list[JobRecord] = []
        refs: list[tuple[str, ...]] = []
        names: dict[str, int] = {}
        for i, spec in enumerate(specs):
            try:
                args, name, deps = spec_arguments(spec)
                if name is not None and name in names:
                    raise InvalidParams(f"name {name!r} is already used by specs[{names[name]}]")
                built.append(self._build(*args))
            except Exception as exc:
                raise type(exc)(f"specs[{i}]: {exc}") from None
            if name is not None:
                names[name] = i
            refs.append(deps)
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(len(built))
            if any(refs):
                self._link_locked(built, refs, names)
            for job in built:
                self._enqueue_locked(job)
        return [job.id for job in built]

    def pipeline(self, steps: list, **options: Any) -> list[str]:
        """Queue ``steps`` as a chain, all or nothing: each step runs after the one
        before it completed and gets its result in ``ctx.inputs``. A step is a kind
        name, ``(kind, params)``, ``(kind, params, {submit options})`` or a
        ``submit_many`` spec (whose ``depends_on`` may add ``"@name"`` references
        to earlier steps, named ``step-0``, ``step-1``, ... unless they say).
        ``options`` (priority, label, held, ``depends_on`` for the first step, ...)
        apply to every step. Returns the ids in order.
        """
        return self.submit_many(pipeline_specs(steps, dict(options)))

    def _link_locked(
        self,
        jobs: list[JobRecord],
        refs: list[tuple[str, ...]],
        names: dict[str, int],
        prior: Optional[list[Optional[dict]]] = None,
    ) -> None:
        """Give ``jobs`` (about to be queued) their edges, or raise naming the problem."""
        batch = len(jobs) > 1 or bool(names)
        links = plan_links(
            jobs, refs, names, self._jobs.get, self._history.was_evicted,
            prior=prior, where=(lambda i: f"specs[{i}]: ") if batch else (lambda i: ""),
        )
        for job, link in zip(jobs, links):
            job.depends_on = link.depends_on
            job.waiting = link.waiting or None
            job.inputs = link.inputs or None

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
        not_before: Any = None,
    ) -> JobRecord:
        if not isinstance(kind, str):
            raise TypeError(f"kind must be a kind name (str), got {kind!r}")
        spec = PYTHON_CALL_SPEC if kind == PYTHON_CALL else self._registry.get(kind)
        job = build_record(
            spec,
            f"{self._id_prefix}-{next(self._id_counter)}",
            self._wall(),
            params,
            priority,
            label,
            timeout,
            max_retries,
            memory_mb,
            held,
            not_before,
            max_memory_mb=self._config.max_memory_mb,
        )
        never = self._admission.never_fits(job.memory_mb, not spec.out_of_process)
        if never:
            raise InvalidParams(never)
        check = self.submit_check
        if check is not None:
            refusal = check(spec, job.params)
            if refusal:
                raise NotPermitted(refusal)
        return job

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
        self._schedule_waits_locked(job)
        self._scheduler.add(job)
        self._events.state(job)
        self.order_version += 1
        self._changed_locked(job, urgent=True)
        if job.ready and self._pool.idle:
            self._work_cv.notify()

    def _schedule_waits_locked(self, job: JobRecord) -> None:
        """Before a job enters the queue: index its unmet edges, set its start time,
        and decide whether it is ready."""
        at = job.not_before
        if at is not None and at > self._wall() and not job.time_pending:
            self._timers.add_wake(job, at)
            self._timer_cv.notify()
        if job.waiting:
            self._deps.add(job)
        job.ready = job.may_run()

    # ------------------------------------------------------------------ queries

    def _get_locked(self, job_id: Any) -> JobRecord:
        job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            if not isinstance(job_id, str):
                raise TypeError(f"job id must be a str, got {job_id!r}")
            if self._history.was_evicted(job_id):
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
                (self._jobs[i] for i in self._history.newest_first()),
            )
            return [j.snapshot() for j in ordered if wanted is None or j.state in wanted]

    def stats(self) -> EngineStats:
        """Counts, worker use, throughput (jobs finished per minute over the last minute), memory."""
        with self._lock:
            held = sum(1 for j in self._scheduler if j.held)
            history = self._history
            return EngineStats(
                queued=len(self._scheduler),
                held=held,
                running=len(self._running),
                max_workers=self._config.max_workers,
                busy_workers=self._busy,
                completed=history.counts[_S.COMPLETED],
                failed=history.counts[_S.FAILED],
                cancelled=history.counts[_S.CANCELLED],
                interrupted=history.counts[_S.INTERRUPTED],
                finished_kept=len(history),
                throughput_per_min=history.per_minute(self._clock()),
                waiting_for_memory=1 if self._admission.blocked is not None else 0,
                paused=self._paused,
                process_memory_mb=round(self._memory.process_mb(), 1),
                available_memory_mb=round(self._memory.available_mb(), 1),
                write_error=self._write_error(),
                thread_error=self._pool.error,
                cluster_error=self._cluster.last_error if self._cluster is not None else None,
            )

    def _write_error(self) -> Optional[str]:
        return self._store.problem if self._store is not None else None

    # ------------------------------------------------------------------ steering

    def cancel(self, job_id: str, *, with_dependents: bool = False) -> bool:
        """Cancel a job. Queued: cancelled at once. Running: asked to stop; it ends
        ``cancelled`` when its handler returns (a result it still returns is discarded).
        The queued jobs that depend on it end ``failed`` (``DependencyFailed``) once it
        has ended; with ``with_dependents`` they are cancelled at once instead.

        Returns:
            True if the job was cancelled or asked to stop, False if it had already finished.

        Raises:
            KeyError (``JobNotFound``): unknown id.
        """
        with self._lock:
            job = self._get_locked(job_id)
            if job.state.is_terminal:
                return False
            infos = []
            if with_dependents:
                now_wall = self._wall()
                for dep, _ in self._deps.take_closure(job.id):
                    self._unqueue_locked(dep)
                    dep.message = f"cancelled with job {job.id} ({job.label}), which it depends on"
                    infos.append(self._terminal_locked(dep, _S.CANCELLED, now_wall))
            if job.in_queue:
                self._unqueue_locked(job)
                job.message = "cancelled before it ran"
                infos.append(self._terminal_locked(job, _S.CANCELLED, self._wall()))
            elif job.cancel_reason != "user":
                self._request_stop_locked(job, "user")
        for info in infos:
            self._announce(info)
        self._announce(None)
        return True

    def dependents(self, job_id: str, *, failed_with: bool = False) -> list[str]:
        """Ids of the queued jobs that wait on ``job_id``, directly or through others
        (those a cancel of it would end), in queue order; with ``failed_with``, the
        finished jobs that failed because it did not complete (those
        ``retry(job_id, with_dependents=True)`` queues again).

        Raises:
            KeyError (``JobNotFound``): unknown id.
        """
        with self._lock:
            self._get_locked(job_id)
            if failed_with:
                return [j.id for j in self._failed_with_locked(job_id)]
            found = self._deps.closure(job_id)
            return [j.id for j in self._scheduler if j.id in found]

    def _announce(self, info: Optional[JobInfo]) -> None:
        """Log a finished job and run its worker-thread callbacks, then those of the
        dependents that failed with it; called with the lock released."""
        if info is not None:
            self._log_finished(info)
            self._callbacks.fire_here(info)
        if self._cascaded:
            with self._lock:
                cascaded, self._cascaded = self._cascaded, []
            for other in cascaded:
                self._log_finished(other)
                self._callbacks.fire_here(other)

    def _unqueue_locked(self, job: JobRecord) -> None:
        self._scheduler.remove(job)
        job.backoff_until = None
        self._timers.drop_wake(job)
        if self._admission.blocked is job:
            self._admission.blocked = None  # the jobs behind it may fit
            self._work_cv.notify_all()
        self.order_version += 1

    def _request_stop_locked(self, job: JobRecord, reason: str) -> None:
        job.cancel_requested = True
        job.cancel_reason = reason
        if job.cancel_event is not None:
            job.cancel_event.set()
        self._events.progress(job)
        self._changed_locked(job, urgent=False)

    def retry(self, job_id: str, params: Optional[dict] = None, *, with_dependents: bool = False) -> str:
        """Queue a new job from a finished one; ``params`` (a dict) overrides some of its params.
        The new job keeps the old one's ``depends_on`` (results already passed along
        are kept). With ``with_dependents``, the jobs that failed because this one did
        not complete (``DependencyFailed``, directly or through others) are queued
        again too, now waiting on the new job, all or nothing.

        Raises:
            InvalidStateError: the job has not finished, or is an ad-hoc call whose callable is gone.
            InvalidParams: the changed params do not validate, or a prerequisite of it
                has itself ended without completing (retry that one first).
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
            merged = {**old.params, **(params or {})}
            chain = [old] + (self._failed_with_locked(old.id) if with_dependents else [])
            copies = [(j.id, j.kind, j.label, j.callable, j.priority, j.timeout, j.max_retries,
                       j.memory_mb, j.depends_on, dict(j.inputs or {})) for j in chain]
        if old.kind == PYTHON_CALL:
            if old.callable is None:
                raise InvalidStateError(
                    f"job {job_id!r} ran an ad-hoc callable from an earlier session; "
                    "it cannot be retried, run it again with run()"
                )
            if params:
                raise InvalidParams("python.call jobs take no changed params; use run() with new arguments")
        index = {c[0]: str(i) for i, c in enumerate(copies)}
        built: list[JobRecord] = []
        refs: list[tuple[str, ...]] = []
        prior: list[Optional[dict]] = []
        for i, (oid, kind, label, callable_, priority, timeout, max_retries, memory_mb, deps,
                inputs) in enumerate(copies):
            job = self._build(kind, merged if i == 0 else dict(chain[i].params), priority, label,
                              timeout, max_retries, memory_mb, False)
            job.callable = callable_
            built.append(job)
            refs.append(tuple(BATCH_REF + index[p] if p in index else p for p in deps))
            prior.append({p: v for p, v in inputs.items() if p not in index})
        with self._lock:
            self._check_accepting_locked()
            self._check_capacity_locked(len(built))
            if any(refs):
                self._link_locked(built, refs, {v: int(v) for v in index.values()}, prior)
            for job in built:
                self._enqueue_locked(job)
        for job, copy in zip(built, copies):
            self.logger.info("job retried", job_id=job.id, kind=job.kind, retry_of=copy[0])
        return built[0].id

    def _failed_with_locked(self, job_id: str) -> list[JobRecord]:
        """Finished jobs that failed because ``job_id`` did not complete, oldest first."""
        found = [j for i in self._history.newest_first()
                 if (j := self._jobs.get(i)) is not None and j.state is _S.FAILED
                 and j.root_cause is not None and j.root_cause[0] == job_id]
        found.sort(key=lambda j: (j.created_at, j.key[1] if j.key else 0))
        return found

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
                targets = [self._get_locked(i) for i in id_list(ids)]
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
                if job.may_run():
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
                self._pool.grow_locked(new.max_workers)
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
            gone = self._history.take_all()
            for job_id in gone:
                self._forget_locked(job_id)
            if gone:
                self.order_version += 1
                self._changed_locked(None, urgent=True)
            return len(gone)

    def _forget_locked(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._events.forget(job_id)
        self._progress_dirty.pop(job_id, None)
        if self._store is not None:
            self._removed.add(job_id)
        self._history.note_evicted(job_id)

    def _evict_locked(self) -> None:
        for job_id in self._history.over_limit(self._config.history_limit):
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
                watch = id_list(ids)
                for job_id in watch:
                    if job_id not in self._jobs and not self._history.was_evicted(job_id):
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
        with self._lock:
            entry = self._callbacks.add_locked(callback, on_main)

        def unsubscribe() -> None:
            with self._lock:
                self._callbacks.remove_locked(entry)

        return unsubscribe

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

        It also waits until the results that adopted jobs keep in files are read
        back (they are read off the calling thread, after adoption).

        The write itself happens on the writer thread. Returns False if it failed or
        did not finish within ``timeout`` (the error is in ``stats().write_error``);
        True at once without a ``state_dir``.
        """
        started = time.monotonic()
        self._log.flush()
        loaded = self._results.wait_idle(timeout)  # results of adopted jobs read back first
        if self._store is None:
            return loaded
        return self._store.flush(max(0.0, timeout - (time.monotonic() - started))) and loaded

    @property
    def sidecar_path(self) -> Optional[Path]:
        return self._store.path if self._store is not None else None

    @property
    def store(self) -> Optional[SnapshotStore]:
        return self._store

    # ------------------------------------------------------------------ adoption

    def _adopt_locked(self) -> None:
        """Take over the sidecars of dead or shut-down engines in ``state_dir``."""
        assert self._store is not None
        claimed = claim_orphans(self._store, self.logger)
        recovery = self._merge_documents_locked(
            claimed.documents, problems=claimed.problems, moved=claimed.moved,
            skipped=claimed.skipped,
        )
        if recovery is not None:
            self.recovery = recovery
            self.logger.info("recovered queue", summary=recovery.summary, problems=list(recovery.problems))

    def _merge_documents_locked(
        self,
        documents: list[tuple[str, dict]],
        *,
        problems: Optional[list[str]] = None,
        moved: Optional[list[str]] = None,
        skipped: Optional[list[str]] = None,
        hold: bool = False,
    ) -> Optional[Recovery]:
        """Adopt the jobs of checked queue documents (sidecars, or a .blend's copy):
        the most advanced copy of each (``recovery.best_copies``), revived
        (``recovery.revive``) into the queue or the history."""
        problems = problems if problems is not None else []
        moved = moved if moved is not None else []
        counts: collections.Counter[str] = collections.Counter()
        queued: list[JobRecord] = []
        finished: list[JobRecord] = []
        renamed: dict[tuple[str, str], str] = {}
        sources: dict[int, str] = {}
        for source, job in best_copies(documents, problems, counts):
            original = job.id
            if not self._make_room_for_locked(job, counts):
                continue
            if job.id != original:
                renamed[(source, original)] = job.id
            sources[id(job)] = source
            job.recovered_from = source
            counted = revive(
                job,
                self._spec_or_none(job.kind),
                hold=hold,
                auto_resume=self._config.auto_resume,
                now_wall=self._wall(),
            )
            counts[counted] += 1
            if counted in ("finished", "interrupted"):
                finished.append(job)
            else:
                if job.held:
                    counts["held"] += 1
                queued.append(job)
            self._jobs[job.id] = job
        if self._store is not None:
            for _, data in documents:
                if data.get("_refused") and data.get("_claimed") is not None:
                    self._store.quarantine(data["_claimed"])
        if renamed:
            for job in queued + finished:
                _rename_edges(job, sources[id(job)], renamed)
        queued.sort(key=lambda j: (j.priority, j.key[1] if j.key else 0))
        broken = self._adopt_edges_locked(queued)
        for job in queued:
            self._schedule_waits_locked(job)
            self._scheduler.add(job)
        if finished:
            finished.sort(key=lambda j: j.finished_at or 0.0)
            self._history.put_older(j.id for j in finished)
            stored = [j for j in finished if is_result_file(j.result)]
            if stored:
                self._results.add_locked(stored)  # read off this thread, from our own folders
        for job in queued + finished:
            self._events.state(job)
            self._changed_locked(job, urgent=True)
        now_wall = self._wall()
        for job, root, message in broken:
            if job.in_queue:  # not already failed with another
                self._fail_dependent_locked(job, root, message, now_wall)
                problems.append(f"{job.label} ({job.id}) failed: {message}"[:400])
        self._evict_locked()
        if queued:
            self._work_cv.notify_all()
        if not documents and not moved and not skipped:
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
            skipped=tuple(skipped or ()),
        )
        level = "warning" if problems or counts["interrupted"] else "info"
        self._events.notice(recovery.summary, level=level)
        return recovery

    def _adopt_edges_locked(self, queued: list[JobRecord]) -> list[tuple[JobRecord, tuple[str, str], str]]:
        """Settle the unmet edges of adopted queued jobs against what is known now:
        a prerequisite that completed passes its result along; one that ended
        otherwise, is unknown, or lies in a cycle makes the job fail (returned, to be
        failed once everything is queued)."""
        broken: list[tuple[JobRecord, tuple[str, str], str]] = []
        for job in queued:
            waiting = job.waiting
            if not waiting:
                job.waiting = None
                continue
            for pid in list(waiting):
                pre = self._jobs.get(pid)
                if pre is None:
                    broken.append((job, (pid, "missing"), f"prerequisite job {pid} is not in this "
                                   "queue (it was not saved with it), so this job cannot run"))
                    break
                if pre.state is _S.COMPLETED:
                    del waiting[pid]
                    if job.inputs is None:
                        job.inputs = {}
                    job.inputs[pid] = pre.result
                elif pre.state.is_terminal:
                    root = pre.root_cause or (pid, pre.state.value)
                    broken.append((job, root, f"prerequisite job {pid} ({pre.label}) ended "
                                   f"{pre.state.value}, so this job did not run"))
                    break
            if not waiting:
                job.waiting = None
        for job in stuck(queued):
            broken.append((job, (job.id, "cycle"), "its prerequisites wait on each other "
                           "(a dependency cycle in the adopted queue), so it can never run"))
        return broken

    def _fail_dependent_locked(self, dep: JobRecord, root: tuple[str, str], message: str,
                               now_wall: float) -> None:
        """End a queued job ``failed`` because a prerequisite did not complete."""
        self._unqueue_locked(dep)
        dep.root_cause = root
        dep.errors = dep.errors + (JobError(DEPENDENCY_FAILED, message, "", "waiting", dep.attempt),)
        dep.message = f"{DEPENDENCY_FAILED}: {message}"
        self._cascaded.append(self._terminal_locked(dep, _S.FAILED, now_wall))

    def _make_room_for_locked(self, job: JobRecord, counts: collections.Counter) -> bool:
        """Settle an adopted job whose id is already known here. Returns False to skip it.

        The same job (same kind and creation time) is adopted only if the copy here
        is still queued and behind it (e.g. restored from a .blend while the
        sidecar saw it finish): the adopted one replaces it. A different job with
        the same id gets a new id (``id~2``).
        """
        existing = self._jobs.get(job.id)
        if existing is None:
            return True
        if existing.kind == job.kind and existing.created_at == job.created_at:
            counts["duplicates"] += 1
            if not (existing.in_queue and RANK[job.state] > RANK[existing.state]):
                return False
            self._unqueue_locked(existing)
            del self._jobs[existing.id]
            return True
        n = 2
        while f"{job.id}~{n}" in self._jobs:
            n += 1
        job.id = f"{job.id}~{n}"
        return True

    def export_state(self) -> dict:
        """The whole queue as a JSON-ready document (the sidecar's schema), e.g. to
        store it inside a .blend file."""
        with self._lock:
            captured = [_capture(job) for job in self._jobs.values()]
        owner = self._store.owner if self._store else Owner.current(self._id_prefix)
        return export_document(captured, owner, self.workdir_for, self.logger)

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
        self._announce(None)
        assert recovery is not None
        self.logger.info("imported queue", source=source, summary=recovery.summary)
        return recovery

    # ------------------------------------------------------------------ the state machine

    def _worker_should_exit_locked(self, pool: WorkerPool) -> bool:
        return self._closing or len(pool) > self._config.max_workers

    def _now(self) -> float:
        return self._clock()

    def _wake_idle_locked(self) -> None:
        """Wake one idle worker if one waits and something is ready to run."""
        if self._pool.idle and self._scheduler.ready_count():
            self._work_cv.notify()

    def _claim_locked(self) -> Optional[JobRecord]:
        if self._paused or not self._started or self._busy >= self._config.max_workers:
            return None
        while True:
            job = self._scheduler.next_ready(self._admission.kind_has_room, self._admission.head_has_room)
            if job is None:
                return None
            verdict = self._memory_admits_locked(job)
            if verdict is _SET_ASIDE:
                continue  # it can never fit: held with the reason, the next one may start
            if not verdict:
                return None
            break
        self._scheduler.remove(job)
        self.order_version += 1
        job.state = _S.DISPATCHED
        job.attempt += 1
        job.backoff_until = None
        self._running[job.id] = job
        self._busy += 1
        self._admission.take(job)
        self._events.state(job)
        self._mark_running_locked(job)
        return job

    def _memory_admits_locked(self, job: JobRecord) -> Any:
        """Admission's memory verdict for the next job in order, made visible: the job
        dispatch waits on says why in its message, and the watchdog re-checks.

        Returns True (it may start), False (it waits, and so does everything behind
        it) or ``_SET_ASIDE``: it can never fit (a .blend or an old sidecar asked for
        more than this machine has, or the limits changed), so it is held with the
        reason instead of blocking the queue forever; the user changes and retries it.
        """
        admission = self._admission
        reasons = admission.memory_shortfall(job)
        blocked = admission.blocked
        if reasons:
            never = admission.never_fits(job.memory_mb, admission.is_inside(job))
            if never:
                if blocked is job:
                    admission.blocked = None
                job.held = True
                self._scheduler.set_ready(job, False)
                job.message = f"held: {never}; retry it with a smaller memory_mb, or cancel it"
                self._events.progress(job)
                self._changed_locked(job, urgent=True)
                self.logger.warning("job can never fit in memory; held", job_id=job.id, reason=never)
                return _SET_ASIDE
        if reasons is None:
            if blocked is not None:  # the limits were lifted
                blocked.message = None
                self._events.progress(blocked)
                admission.blocked = None
            return True
        if reasons:
            if blocked is not job:
                admission.blocked = job
                job.message = "waiting for memory: " + "; ".join(reasons)
                self._events.progress(job)
                self.logger.info("dispatch waits for memory", job_id=job.id, reason=job.message)
                self._timer_cv.notify()
            return False
        if blocked is job:
            admission.blocked = None
            job.message = None
        return True

    def _mark_running_locked(self, job: JobRecord) -> None:
        job.state = _S.RUNNING
        job.started_at = self._wall()
        job.run_started = now = self._clock()
        job.progress = 0.0 if job.checkpoint is None else job.progress
        job.eta_seconds = None
        if job.timeout is not None:
            self._timers.add_deadline(job, now + job.timeout)
            self._timer_cv.notify()
        self._events.state(job)
        self._changed_locked(job, urgent=True)

    def _executor_for(self, job: JobRecord, spec: Optional[KindSpec]) -> Executor:
        """Where a job's work runs: on this worker thread, or, for ``remote_ok`` kinds
        while a cluster is configured, on the cluster (engine/cluster.py). A job that
        was running on a cluster before a crash is re-attached there, never run again
        here."""
        remote = (job.checkpoint or {}).get(REMOTE_KEY) == dask_key(job.id, job.attempt)
        cluster = self._cluster_executor()
        if cluster is None or spec is None or not (spec.remote_ok or remote):
            if remote:
                return Refuse(f"job {job.id} was running on a dask cluster, and none is configured "
                               "now; it is not run here (it may still run there)")
            return self._local_executor
        if not remote and self._config.cluster_fallback_local and not cluster.reachable():
            return self._local_executor
        return cluster

    def _cluster_executor(self) -> Optional[Any]:
        config = self._config
        wanted = (config.cluster, config.cluster_tls_ca_file, config.cluster_tls_cert,
                  config.cluster_tls_key, config.cluster_modules) if config.cluster else None
        with self._cluster_lock:
            if wanted != self._cluster_for:
                old, self._cluster, self._cluster_for = self._cluster, None, wanted
                if old is not None:
                    old.close()
                if wanted is not None:
                    from .cluster import ClusterExecutor, security_for

                    self._cluster = ClusterExecutor(self, config.cluster or "",
                                                    security=security_for(config),
                                                    modules=config.cluster_modules)
            return self._cluster

    def _run_claimed(self, job: JobRecord) -> Optional[JobRecord]:
        """Run a claimed job's work and record its outcome; returns the next job to run."""
        spec = self._spec_or_none(job.kind)
        outcome = self._executor_for(job, spec).execute(job, spec)
        return self._finish(job, spec, outcome)

    def _finish(self, job: JobRecord, spec: Optional[KindSpec], outcome: Outcome) -> Optional[JobRecord]:
        info = None
        nxt = None
        with self._worker_lock:
            if job.id not in self._running:
                return None  # recorded interrupted at shutdown; whatever it returned is moot
            del self._running[job.id]
            self._busy -= 1
            self._admission.give_back(job)
            job.deadline = None
            now_wall = self._wall()
            reason = job.cancel_reason if job.cancel_requested else None
            kind = outcome.kind
            if reason == "shutdown" and kind != "ok":
                if spec is not None and (spec.resumable or _on_cluster(job)) and kind == "cancelled":
                    self._requeue_locked(job, "stopped by shutdown; resumes from its checkpoint")
                else:
                    job.message = "stopped by shutdown"
                    info = self._terminal_locked(job, _S.INTERRUPTED, now_wall)
            elif kind == "interrupted":  # a cluster worker died: said, never silently re-run
                job.message = str(outcome.value)
                info = self._terminal_locked(job, _S.INTERRUPTED, now_wall)
            elif reason == "user" or (kind == "cancelled" and reason is None):
                if kind == "cancelled" and str(outcome.value):
                    job.message = str(outcome.value)  # the handler's word on what it stopped
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
                exc = outcome.value
                err = JobError(
                    type(exc).__name__,
                    str(exc) or type(exc).__name__,
                    outcome.traceback,
                    outcome.stage or job.stage,
                    job.attempt,
                )
                info = self._fail_or_retry_locked(job, err, now_wall)
            else:
                job.result = outcome.value
                job.progress = 1.0
                job.eta_seconds = 0.0
                info = self._terminal_locked(job, _S.COMPLETED, now_wall)
            if not self._closing and len(self._pool) <= self._config.max_workers:
                nxt = self._claim_locked()
            self._wake_idle_locked()  # a kind or memory slot may have freed up for another
            self._notify_done_locked()
        self._announce(info)
        return nxt

    def _fail_or_retry_locked(self, job: JobRecord, err: JobError, now_wall: float) -> Optional[JobInfo]:
        job.errors = job.errors + (err,)
        if job.attempt <= job.max_retries and not self._closing:
            delay = min(BACKOFF_CAP_S, 2.0 ** (job.attempt - 1))
            self._timers.add_backoff(job, self._clock() + delay)
            self._timer_cv.notify()
            self._requeue_locked(
                job,
                f"attempt {job.attempt} of {job.max_retries + 1} failed ({err.type}: "
                f"{first_line(err.message)}); retrying in {delay:g} s",
                ready=False,
            )
            self.logger.warning(
                "job attempt failed; retrying",
                job_id=job.id, kind=job.kind, attempt=job.attempt, error=err.type, delay_s=delay,
            )
            return None
        job.message = f"{err.type}: {first_line(err.message)}"
        return self._terminal_locked(job, _S.FAILED, now_wall)

    def _requeue_locked(self, job: JobRecord, message: str, *, ready: bool = True) -> None:
        job.state = _S.QUEUED
        job.message = message
        job.cancel_requested = False
        job.cancel_reason = None
        job.timed_out = False
        job.cancel_event = None
        job.ready = ready and job.may_run()
        self._scheduler.add(job, seq=job.key[1] if job.key else None)
        self.order_version += 1
        self._events.state(job)
        self._changed_locked(job, urgent=True)

    def _terminal_locked(self, job: JobRecord, state: JobState, now_wall: float) -> JobInfo:
        if job.id in self._running:  # interrupted by shutdown while its handler still runs
            del self._running[job.id]
            self._busy -= 1
            self._admission.give_back(job)
        job.state = state
        job.finished_at = now_wall
        if state is not _S.COMPLETED:
            job.eta_seconds = None
            job.result = None
        job.cancel_event = None
        self._history.record(job.id, state, self._clock())
        self.order_version += 1  # it moves from the running (or queued) part to history
        info = job.snapshot()
        self._events.state_info(info)
        if self._callbacks:
            self._callbacks.queue_main_locked(info)
        self._changed_locked(job, urgent=True)
        if len(self._history) > self._config.history_limit:
            self._evict_locked()
        if job.id in self._deps:
            self._settle_dependents_locked(job, now_wall)
        self._notify_done_locked()
        return info

    def _settle_dependents_locked(self, job: JobRecord, now_wall: float) -> None:
        """``job`` just ended: its dependents get its result (and may become ready),
        or, if it did not complete, fail with it (and theirs with them)."""
        if job.state is _S.COMPLETED:
            woke = 0
            events, store = self._events, self._store
            for dep in self._deps.take(job.id):
                waiting = dep.waiting
                assert waiting is not None
                del waiting[job.id]
                if dep.inputs is None:
                    dep.inputs = {}
                dep.inputs[job.id] = job.result
                if not waiting:
                    dep.waiting = None
                    if not (dep.held or dep.time_pending or dep.backoff_until is not None):
                        self._scheduler.set_ready(dep, True)
                        woke += 1
                events.progress(dep)  # "waiting for 2 jobs" -> "1 job" -> "queued"
                if store is not None:
                    self._dirty.add(dep)
            self.state_version += 1
            if store is not None:
                store.mark(True)
            if woke and self._pool.idle:  # wake as many idle workers as there is new work, no more
                self._work_cv.notify(min(woke, self._pool.idle))
            return
        root = job.root_cause or (job.id, job.state.value)
        origin = self._jobs.get(root[0])
        named = f"job {root[0]} ({origin.label})" if origin is not None else f"job {root[0]}"
        for dep, via in self._deps.take_closure(job.id):
            if via == root[0]:
                message = f"prerequisite {named} ended {root[1]}, so this job did not run"
            else:
                message = (f"prerequisite job {via} did not run because {named} ended {root[1]}, "
                           "so this job did not run either")
            self._fail_dependent_locked(dep, root, message, now_wall)

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
        """The per-job work folder (not created here).

        Raises:
            ValueError: ``job_id`` is not a valid job id (it would name a folder elsewhere).
        """
        problem = job_id_error(job_id)
        if problem:
            raise ValueError(problem)
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
        ended, timeouts of running jobs, start times (``not_before``, on the wall clock)
        that came, a memory re-check. Returns seconds until the
        next thing is due, or None. The watchdog thread calls this; tests with an
        injected clock call it directly."""
        with self._lock:
            return self._check_timers_locked(self._clock() if now is None else now)

    def _check_timers_locked(self, now: float) -> Optional[float]:
        wake = False
        for job in self._timers.backoffs_ended(now):
            if job.may_run():
                self._scheduler.set_ready(job, True)
                wake = True
        now_wall = self._wall()
        for job in self._timers.wakes_due(now_wall):
            if job.may_run():
                self._scheduler.set_ready(job, True)
                wake = True
            self._events.progress(job)
            self._changed_locked(job, urgent=False)
        for job in self._timers.deadlines_passed(now):
            job.timed_out = True
            job.message = f"timed out after {job.timeout:g} s; waiting for the job to stop"
            self._request_stop_locked(job, "timeout")
            self.logger.warning("job timed out", job_id=job.id, kind=job.kind, timeout_s=job.timeout)
        blocked = self._admission.blocked is not None
        if blocked:
            self._memory.invalidate()
            wake = True
        if wake:
            self._work_cv.notify_all()
        nxt = self._timers.next_due(now, now_wall)
        if blocked:
            nxt = MEMORY_RECHECK_S if nxt is None else min(nxt, MEMORY_RECHECK_S)
        return nxt

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

