"""Workers: the threads that run jobs and the watchdog thread that keeps time.

Owns: the worker threads (how many, starting them, the loop each one runs) and
the single watchdog thread (it sleeps until the next timer is due), and the
polite way workers take the engine lock (``WorkerLock``).

Must not touch: job records or the queue. A worker asks its host to claim the
next job and to run-and-finish it; the watchdog asks its host to check the
timers. The host is the ``Engine``, through the small ``PoolHost`` interface
below; threads are daemon threads (a ``concurrent.futures`` pool joins its
threads at interpreter exit, so one handler that ignores cancellation would
hang Blender's quit).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Optional, Protocol

from .record import JobRecord

LOCK_YIELDS = 10  # GIL yields granted to a holder of the engine lock (see WorkerLock)
MAX_TIMER_WAIT_S = 3600.0  # the watchdog wakes at least this often (and never overflows a wait)
RESPAWNS = 3  # workers replaced after an engine error killed one, before the pool stops trying
_sleep = time.sleep


class WorkerLock:
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


class PoolHost(Protocol):
    """What the pool needs from the engine. ``*_locked`` methods run under its lock."""

    _lock: Any

    def _claim_locked(self) -> Optional[JobRecord]:
        """The next job, claimed and marked running, or None if nothing may start."""
        ...

    def _run_claimed(self, job: JobRecord) -> Optional[JobRecord]:
        """Run ``job`` and record its outcome (lock released); returns the next
        job, claimed in the same lock hold that recorded the outcome, or None."""
        ...

    def _worker_should_exit_locked(self, pool: "WorkerPool") -> bool:
        ...

    def _check_timers_locked(self, now: float) -> Optional[float]:
        ...

    def _now(self) -> float:
        ...


class WorkerPool:
    """Worker threads and the watchdog. All ``*_locked`` methods run under the engine lock."""

    def __init__(self, host: PoolHost, lock: Any) -> None:
        self._host = host
        self.work_cv = threading.Condition(lock)  # workers wait here for a job
        self.timer_cv = threading.Condition(lock)  # the watchdog waits here for the next timer
        self.threads: set[threading.Thread] = set()
        self.idle = 0  # workers waiting for work
        self._watchdog: Optional[threading.Thread] = None
        self._names = itertools.count()
        self.stopped = False  # set (under the lock) when the watchdog must exit
        self.error: Optional[str] = None  # the last error that hit a pool thread (an engine bug)
        self._respawns = 0

    def __len__(self) -> int:
        return len(self.threads)

    def grow_locked(self, n: int) -> None:
        """Start workers until there are ``n``. (Fewer: the extra ones exit when next
        idle, since ``_worker_should_exit_locked`` sees the pool over its size.)"""
        while len(self.threads) < n:
            thread = threading.Thread(
                target=self._worker_main, name=f"taskqueue-worker-{next(self._names)}", daemon=True
            )
            self.threads.add(thread)
            thread.start()

    def start_watchdog_locked(self) -> None:
        self._watchdog = threading.Thread(
            target=self._watchdog_main, name="taskqueue-watchdog", daemon=True
        )
        self._watchdog.start()

    def wake_one_locked(self) -> None:
        if self.idle:
            self.work_cv.notify()

    def wake_all_locked(self) -> None:
        self.work_cv.notify_all()
        self.timer_cv.notify_all()

    def others_locked(self) -> list[threading.Thread]:
        """The workers but this thread (a worker may be the one shutting down)."""
        me = threading.current_thread()
        return [w for w in self.threads if w is not me]

    def join(self, workers: list[threading.Thread], deadline: float) -> int:
        """Join ``workers`` and the watchdog until ``deadline`` (time.monotonic()); returns
        how many workers are still alive (stuck in a handler)."""
        others = [self._watchdog] if self._watchdog is not None else []
        for thread in workers + others:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in workers)

    def _worker_main(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # an engine bug: say so, and keep the pool at strength
            with self.work_cv:
                self.threads.discard(threading.current_thread())
                self._thread_died("worker", exc)
                if self._respawns < RESPAWNS and not self.stopped:
                    self._respawns += 1
                    self.grow_locked(len(self.threads) + 1)

    def _thread_died(self, what: str, exc: BaseException) -> None:
        self.error = f"a {what} thread hit {type(exc).__name__}: {exc}"[:300]
        logger = getattr(self._host, "logger", None)
        if logger is not None:
            logger.error("engine thread error", thread=what, error=self.error)

    def _work(self) -> None:
        host = self._host
        me = threading.current_thread()
        cv = self.work_cv
        job: Optional[JobRecord] = None
        while True:
            if job is None:
                with cv:
                    while True:
                        if host._worker_should_exit_locked(self):
                            self.threads.discard(me)
                            return
                        job = host._claim_locked()
                        if job is not None:
                            break
                        self.idle += 1
                        try:
                            cv.wait()
                        finally:
                            self.idle -= 1
            # The host finishes the job and, in the same lock hold, claims the next one.
            job = host._run_claimed(job)

    def _watchdog_main(self) -> None:
        # The watchdog must never die: without it no timeout or retry backoff fires
        # for the rest of the session. An error is reported and the loop goes on.
        host = self._host
        with self.timer_cv:
            while not self.stopped:
                try:
                    delay = host._check_timers_locked(host._now())
                    if delay is None or delay > MAX_TIMER_WAIT_S:
                        delay = MAX_TIMER_WAIT_S
                except Exception as exc:
                    self._thread_died("watchdog", exc)
                    delay = 1.0
                self.timer_cv.wait(delay)
