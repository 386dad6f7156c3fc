"""Model-based tests of the queue: a hypothesis state machine against a tiny model.

The machine submits, cancels, moves, holds/releases, pauses/resumes and resizes
the pool of a real Engine whose handlers block on a per-job gate. After every
step the model predicts exactly which jobs must be running once the engine
settles (greedy dispatch: priority 0..9, FIFO within a band, skipping held jobs
and saturated kinds, at most ``max_workers``). The check waits for those jobs'
"started" events (never sleeps), then compares the engine's running set and
queued order with the model. Teardown opens every gate and checks that every
job ended in exactly one terminal state, once, with the expected outcome.

Below the machine: deterministic regression tests for the scheduler bugs it
found, and a large held-queue move test that crosses the scheduler's block
boundaries.
"""

from __future__ import annotations

import collections
import itertools
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blender_taskqueue.engine import (
    Engine,
    EngineConfig,
    InvalidStateError,
    KindRegistry,
    KindSpec,
    parse_priority,
)

SETTLE_S = 5.0  # how long a job the model says must run may take to start
GATE_S = 30.0  # a handler never blocks longer than this, even if a test forgets it
FINISH_S = 10.0

KIND_LIMITS = {"sm.free": None, "sm.solo": 1, "sm.pair": 2}
PRIORITIES = st.sampled_from(["urgent", 3, "normal", 5, "low", 9])
HELD = st.sampled_from([False, False, False, True])
_log_root: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _module_log_dir(tmp_path_factory):
    """The state machines make their own engines (no fixtures inside hypothesis):
    give them one pytest-managed log folder."""
    _log_root[:] = [tmp_path_factory.mktemp("stateful-logs")]
    yield
    _log_root.clear()


def _log_dir() -> Path:
    if not _log_root:  # run outside pytest (e.g. from a REPL)
        _log_root.append(Path(tempfile.mkdtemp(prefix="tq-stateful-logs-")))
    return _log_root[0]


def _taskqueue_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("taskqueue-")}


@dataclass(eq=False)
class MJob:
    """The model's view of one job."""

    tag: int
    id: str
    kind: str
    priority: int
    held: bool
    where: str = "queued"  # queued | running | done
    cancel_requested: bool = False
    outcome: str = "ok"  # ok | fail | raise_cancel: what the handler does once its gate opens
    expected: Optional[str] = None  # terminal state the model expects
    ran: bool = False  # the model dispatched it (its handler must start exactly once)

    def __repr__(self) -> str:
        return f"<job {self.tag} {self.kind} p{self.priority}{' held' if self.held else ''} {self.where}>"


class QueueMachine(RuleBasedStateMachine):
    """Submit / cancel / release / pause / resume / configure / finish, without move()."""

    def __init__(self) -> None:
        super().__init__()
        self.threads_before = _taskqueue_threads()
        self.healthy = False  # set True at the end of each rule; teardown checks only a healthy run
        self.registry = KindRegistry()
        self.lock = threading.Lock()
        self.gates: dict[int, threading.Event] = {}
        self.started: dict[int, threading.Event] = {}
        self.start_log: list[int] = []
        self.outcomes: dict[int, str] = {}
        self.active: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        self.gate_timeouts: list[int] = []
        self.finished_calls: list[tuple[str, str]] = []
        self.state_events: dict[str, list[str]] = collections.defaultdict(list)
        self.tags = itertools.count()
        for kind, limit in KIND_LIMITS.items():
            self.registry.register(
                KindSpec(name=kind, handler=self._handler, max_concurrency=limit)
            )
        self.max_workers = 2
        self.worker_cap = self.max_workers  # what handlers check the live count against
        self.paused = False
        self.engine = Engine(
            EngineConfig(max_workers=self.max_workers, log_dir=_log_dir(), console_log=False),
            registry=self.registry,
        )
        self.engine.on_finished(self._on_finished, on_main=False)
        self.engine.start()
        self.jobs: list[MJob] = []
        self.by_id: dict[str, MJob] = {}
        self.queue: list[MJob] = []  # dispatch order, held jobs included
        self.running: list[MJob] = []
        self.healthy = True

    # ------------------------------------------------------------------ harness

    def _handler(self, ctx, params: dict):
        tag = params["tag"]
        with self.lock:
            self.start_log.append(tag)
            self.active[ctx.kind] += 1
            total = sum(self.active.values())
            if total > self.worker_cap:
                self.violations.append(
                    f"job {tag}: {total} jobs running, max_workers={self.worker_cap}"
                )
            limit = KIND_LIMITS[ctx.kind]
            if limit is not None and self.active[ctx.kind] > limit:
                self.violations.append(
                    f"job {tag}: {self.active[ctx.kind]} {ctx.kind} jobs running, max_concurrency={limit}"
                )
        self.started[tag].set()
        try:
            if not self.gates[tag].wait(GATE_S):
                with self.lock:
                    self.gate_timeouts.append(tag)
            outcome = self.outcomes.get(tag, "ok")
            if outcome == "fail":
                raise RuntimeError(f"job {tag} fails on purpose")
            if outcome == "raise_cancel":
                ctx.raise_if_cancelled()
            return {"tag": tag}
        finally:
            with self.lock:
                self.active[ctx.kind] -= 1

    def _on_finished(self, info) -> None:
        with self.lock:
            self.finished_calls.append((info.id, info.state.value))

    def _drain(self) -> None:
        for event in self.engine.drain_events():
            if event.type == "state" and event.job_id is not None and event.info is not None:
                self.state_events[event.job_id].append(event.info.state.value)

    def _new_tag(self) -> int:
        tag = next(self.tags)
        self.gates[tag] = threading.Event()
        self.started[tag] = threading.Event()
        return tag

    def _model_insert(self, job: MJob) -> None:
        """Queue ``job`` at the end of its priority band."""
        at = len(self.queue)
        while at > 0 and self.queue[at - 1].priority > job.priority:
            at -= 1
        self.queue.insert(at, job)

    def _model_dispatch(self) -> None:
        """Greedy dispatch, as the contract describes it."""
        if self.paused:
            return
        while len(self.running) < self.max_workers:
            running_kinds = collections.Counter(j.kind for j in self.running)
            for job in self.queue:
                limit = KIND_LIMITS[job.kind]
                if job.held or (limit is not None and running_kinds[job.kind] >= limit):
                    continue
                break
            else:
                return
            self.queue.remove(job)
            job.where = "running"
            job.ran = True
            self.running.append(job)

    def _finish_model(self, job: MJob, state: str) -> None:
        job.where = "done"
        job.expected = state

    # ------------------------------------------------------------------ submit

    @rule(kind=st.sampled_from(sorted(KIND_LIMITS)), priority=PRIORITIES, held=HELD)
    def submit(self, kind: str, priority, held: bool) -> None:
        self.healthy = False
        tag = self._new_tag()
        job_id = self.engine.submit(kind, {"tag": tag}, priority=priority, held=held)
        job = MJob(tag, job_id, kind, parse_priority(priority), held)
        assert job_id not in self.by_id, f"submit returned a reused id {job_id}"
        self.jobs.append(job)
        self.by_id[job_id] = job
        self._model_insert(job)
        self.healthy = True

    @rule(
        specs=st.lists(
            st.tuples(st.sampled_from(sorted(KIND_LIMITS)), PRIORITIES, HELD),
            min_size=2,
            max_size=4,
        )
    )
    def submit_many(self, specs) -> None:
        self.healthy = False
        tags = [self._new_tag() for _ in specs]
        ids = self.engine.submit_many(
            [
                {"kind": kind, "params": {"tag": tag}, "priority": prio, "held": held}
                for tag, (kind, prio, held) in zip(tags, specs, strict=True)
            ]
        )
        assert len(ids) == len(specs) and len(set(ids)) == len(ids)
        for tag, job_id, (kind, prio, held) in zip(tags, ids, specs, strict=True):
            assert job_id not in self.by_id
            job = MJob(tag, job_id, kind, parse_priority(prio), held)
            self.jobs.append(job)
            self.by_id[job_id] = job
            self._model_insert(job)
        self.healthy = True

    # ------------------------------------------------------------------ finish running jobs

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50), outcome=st.sampled_from(["ok", "ok", "fail", "raise_cancel"]))
    def finish(self, i: int, outcome: str) -> None:
        self.healthy = False
        job = self.running[i % len(self.running)]
        self.outcomes[job.tag] = outcome
        self.gates[job.tag].set()
        assert self.engine.wait([job.id], timeout=FINISH_S), (
            f"{job} did not finish after its gate opened"
        )
        self.running.remove(job)
        if job.cancel_requested:
            expected = "cancelled"  # whatever the handler did, a cancelled job ends cancelled
        elif outcome == "fail":
            expected = "failed"
        else:
            expected = "completed"  # raise_if_cancelled() does nothing when no stop was asked
        self._finish_model(job, expected)
        info = self.engine.get(job.id)
        assert info.state.value == expected, (
            f"{job}: engine says {info.state.value}, model {expected}"
        )
        if expected == "completed":
            assert info.result == {"tag": job.tag} and info.progress == 1.0
        else:
            assert info.result is None, f"{job} ended {expected} but kept a result"
        if expected == "failed":
            assert info.error is not None and info.error.type == "RuntimeError"
        self.healthy = True

    # ------------------------------------------------------------------ cancel

    @precondition(lambda self: self.queue)
    @rule(i=st.integers(0, 50))
    def cancel_queued(self, i: int) -> None:
        self.healthy = False
        job = self.queue[i % len(self.queue)]
        assert self.engine.cancel(job.id) is True
        self.queue.remove(job)
        self._finish_model(job, "cancelled")
        assert self.engine.get(job.id).state.value == "cancelled", (
            "a queued job is cancelled at once"
        )
        self.healthy = True

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 50))
    def cancel_running(self, i: int) -> None:
        self.healthy = False
        job = self.running[i % len(self.running)]
        assert self.engine.cancel(job.id) is True
        job.cancel_requested = True
        info = self.engine.get(job.id)
        # It keeps its slot until its handler returns, and shows the pending stop.
        assert info.state.value == "running", info
        assert info.cancel_pending, info
        self.healthy = True

    @precondition(lambda self: any(j.where == "done" for j in self.jobs))
    @rule(i=st.integers(0, 50))
    def cancel_finished(self, i: int) -> None:
        self.healthy = False
        done = [j for j in self.jobs if j.where == "done"]
        job = done[i % len(done)]
        assert self.engine.cancel(job.id) is False
        assert self.engine.get(job.id).state.value == job.expected
        self.healthy = True

    # ------------------------------------------------------------------ hold, pause, resize

    @precondition(lambda self: any(j.held for j in self.queue))
    @rule(i=st.integers(0, 50), all_of_them=st.booleans())
    def release(self, i: int, all_of_them: bool) -> None:
        self.healthy = False
        held = [j for j in self.queue if j.held]
        if all_of_them:
            assert self.engine.release() == len(held)
        else:
            held = [held[i % len(held)]]
            assert self.engine.release([held[0].id]) == 1
        for job in held:
            job.held = False
        self.healthy = True

    @rule(paused=st.booleans())
    def set_paused(self, paused: bool) -> None:
        # One rule for both, so an example never spends its steps paused because
        # hypothesis happened to switch off a separate resume rule.
        self.healthy = False
        if paused:
            self.engine.pause()
        else:
            self.engine.resume()
        self.paused = paused
        assert self.engine.paused is paused
        self.healthy = True

    @rule(n=st.integers(1, 3))
    def configure_workers(self, n: int) -> None:
        self.healthy = False
        if n > self.worker_cap:
            self.worker_cap = n  # new workers may start jobs before configure() returns
        self.engine.configure(max_workers=n)
        self.worker_cap = n
        self.max_workers = n
        assert self.engine.config.max_workers == n
        self.healthy = True

    # ------------------------------------------------------------------ the check after every step

    def _wait_for_model_running(self, model_running: set[str]) -> None:
        """Wait until every job the model says runs has started, or fail.

        From a settled state only one change happened, so the engine's running
        set only grows towards the model's. Once it is as large as the model's
        but different, a wrong job was dispatched: stop waiting (fail fast, so
        shrinking a failure does not wait out every timeout).
        """
        deadline = time.monotonic() + SETTLE_S
        for job in self.running:
            while not self.started[job.tag].wait(0.02):
                engine_running = {j.id for j in self.engine.jobs(states=["dispatched", "running"])}
                if len(engine_running) >= len(model_running) and engine_running != model_running:
                    return  # the comparison that follows reports it
                assert time.monotonic() < deadline, (
                    f"{job} should be running; engine running: "
                    f"{sorted(self.by_id[i].tag for i in engine_running)}"
                )

    @invariant()
    def engine_matches_model(self) -> None:
        self.healthy = False
        self._model_dispatch()
        model_running = {j.id for j in self.running}
        self._wait_for_model_running(model_running)
        engine_running = {j.id for j in self.engine.jobs(states=["dispatched", "running"])}
        assert engine_running == model_running, (
            f"running: engine {sorted(self.by_id[i].tag for i in engine_running)}, "
            f"model {sorted(j.tag for j in self.running)}"
        )
        engine_queue = [j.id for j in self.engine.jobs(states=["queued"])]
        assert engine_queue == [j.id for j in self.queue], (
            f"queued order: engine {[self.by_id[i] for i in engine_queue]}, model {self.queue}"
        )
        for info in self.engine.jobs(states=["queued"]):
            assert info.held == self.by_id[info.id].held, info
        with self.lock:
            starts = list(self.start_log)
            violations = list(self.violations)
        counts = collections.Counter(starts)
        twice = [tag for tag, n in counts.items() if n > 1]
        assert not twice, f"jobs started twice: {twice}"
        should_have_started = {j.tag for j in self.jobs if j.ran}
        assert set(counts) == should_have_started, (
            f"started: {sorted(counts)}, model: {sorted(should_have_started)}"
        )
        assert not violations, violations
        stats = self.engine.stats()
        assert (stats.running, stats.queued, stats.busy_workers) == (
            len(self.running),
            len(self.queue),
            len(self.running),
        ), stats
        assert stats.held == sum(j.held for j in self.queue), stats
        self._drain()
        self.healthy = True

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        engine = getattr(self, "engine", None)
        try:
            if engine is None:
                return
            if not self.healthy:
                return  # a check already failed: just clean up (finally) and let that failure show
            for gate in self.gates.values():
                gate.set()
            engine.release()
            engine.resume()
            ids = [j.id for j in self.jobs]
            assert engine.wait(ids, timeout=20), "jobs still unfinished after every gate opened"
            for job in self.jobs:
                if job.where == "queued":
                    job.expected = "completed"
                    job.ran = True
                elif job.where == "running":
                    job.expected = "cancelled" if job.cancel_requested else "completed"
                info = engine.get(job.id)
                assert info.state.value == job.expected, (
                    f"{job}: {info.state.value} != {job.expected}"
                )
            engine.shutdown(wait=True, timeout=5.0)
            self._drain()
            # Every job ends in exactly one terminal state, reported once.
            calls = collections.Counter(job_id for job_id, _ in self.finished_calls)
            assert set(calls) == set(ids), "on_finished must fire for every job"
            assert all(n == 1 for n in calls.values()), f"on_finished fired twice: {calls}"
            assert {(j.id, j.expected) for j in self.jobs} == set(self.finished_calls)
            starts = collections.Counter(self.start_log)
            for job in self.jobs:
                assert starts[job.tag] == int(job.ran), f"{job} started {starts[job.tag]} times"
                seq = self.state_events[job.id]
                tail = ["dispatched", "running"] if job.ran else []
                assert seq == ["submitted", "queued", *tail, job.expected], (job, seq)
            assert not self.gate_timeouts, f"handlers timed out on their gate: {self.gate_timeouts}"
        finally:
            if engine is not None:
                for gate in self.gates.values():
                    gate.set()
                engine.shutdown(wait=True, timeout=5.0)
                leaked = _taskqueue_threads() - self.threads_before
                for thread in leaked:
                    thread.join(5.0)
                if self.healthy:
                    alive = [t for t in leaked if t.is_alive()]
                    assert not alive, f"threads left behind: {alive}"


class QueueMachineWithMoves(QueueMachine):
    """The same machine, plus move() of queued jobs (top / up / down / bottom)."""

    MOVES: tuple[str, ...] = ("top", "up", "down", "bottom")

    def _model_move(self, job: MJob, where: str) -> bool:
        band = [j for j in self.queue if j.priority == job.priority]
        start = self.queue.index(band[0])
        pos = band.index(job)
        new = {
            "top": 0,
            "bottom": len(band) - 1,
            "up": max(pos - 1, 0),
            "down": min(pos + 1, len(band) - 1),
        }[where]
        if new == pos:
            return False
        band.insert(new, band.pop(pos))
        self.queue[start : start + len(band)] = band
        return True

    @precondition(lambda self: self.queue)
    @rule(i=st.integers(0, 50), w=st.integers(0, 3))
    def move(self, i: int, w: int) -> None:
        self.healthy = False
        job = self.queue[i % len(self.queue)]
        where = self.MOVES[w % len(self.MOVES)]
        expected = self._model_move(job, where)
        moved = self.engine.move(job.id, where)
        assert moved is expected, f"move({job}, {where!r}) returned {moved}, model says {expected}"
        assert self.engine.get(job.id).priority == job.priority, "move must never change priority"
        self.healthy = True

    @precondition(lambda self: self.running or any(j.where == "done" for j in self.jobs))
    @rule(i=st.integers(0, 50), w=st.integers(0, 3))
    def move_not_queued(self, i: int, w: int) -> None:
        self.healthy = False
        others = [j for j in self.jobs if j.where != "queued"]
        job = others[i % len(others)]
        with pytest.raises(InvalidStateError):
            self.engine.move(job.id, self.MOVES[w % len(self.MOVES)])
        self.healthy = True


class QueueMachineWithMovesButBottom(QueueMachineWithMoves):
    """Every move but "bottom": more swaps and tops per example."""

    MOVES = ("top", "up", "down")


MACHINE_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_queue_matches_model_without_moves() -> None:
    run_state_machine_as_test(QueueMachine, settings=MACHINE_SETTINGS)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_queue_matches_model_with_moves_but_bottom() -> None:
    run_state_machine_as_test(QueueMachineWithMovesButBottom, settings=MACHINE_SETTINGS)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_queue_matches_model_with_all_moves() -> None:
    run_state_machine_as_test(QueueMachineWithMoves, settings=MACHINE_SETTINGS)


# ---------------------------------------------------------------------- regression tests


class Gated:
    """A kind whose jobs may block on a gate; records the order they start in."""

    def __init__(self, registry: KindRegistry, name: str = "rt.gated") -> None:
        self.name = name
        self.order: list[str] = []
        self.runs: collections.Counter[str] = collections.Counter()
        self.gates: collections.defaultdict[str, threading.Event] = collections.defaultdict(
            threading.Event
        )
        self.started: collections.defaultdict[str, threading.Event] = collections.defaultdict(
            threading.Event
        )
        self.lock = threading.Lock()
        registry.register(KindSpec(name=name, handler=self.handle))

    def handle(self, ctx, params: dict):
        name = params["name"]
        with self.lock:
            self.order.append(name)
            self.runs[name] += 1
            gate = self.gates[name]
            started = self.started[name]
        started.set()
        if params.get("block"):
            gate.wait(GATE_S)
        if params.get("fail") and ctx.attempt == 1:
            raise RuntimeError(f"{name} fails its first attempt")
        return name

    def open_all(self) -> None:
        with self.lock:
            for gate in self.gates.values():
                gate.set()


@pytest.fixture
def gated(make_engine, registry):
    """Request it after ``make_engine``: its teardown opens every gate before the
    engines are shut down, so a failing test never leaves a blocked handler."""
    g = Gated(registry)
    yield g
    g.open_all()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _eventually(predicate, timeout: float = SETTLE_S) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` real seconds pass.

    For states no public event announces (a retry going back to "queued"). With an
    injected clock ``Engine.wait(timeout=...)`` measures the fake clock, so it
    cannot serve as the bound here.
    """
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def _queued_names(engine: Engine) -> list[str]:
    return [j.params["name"] for j in engine.jobs(states=["queued"])]


@pytest.mark.timeout(30)
def test_move_up_and_down_swap_two_ready_jobs(make_engine, gated) -> None:
    """Regression: swapping two ready jobs once made heapq compare JobRecords (TypeError)."""
    engine = make_engine(max_workers=1)
    engine.pause()
    ids = {n: engine.submit(gated.name, {"name": n}) for n in "abcd"}
    assert engine.move(ids["b"], "up") is True
    assert _queued_names(engine) == ["b", "a", "c", "d"]
    assert engine.move(ids["c"], "down") is True
    assert _queued_names(engine) == ["b", "a", "d", "c"]
    assert engine.move(ids["b"], "up") is False  # already first
    engine.resume()
    assert engine.wait(list(ids.values()), timeout=10)
    assert gated.order == ["b", "a", "d", "c"]


@pytest.mark.timeout(30)
def test_move_bottom_then_submit_keeps_every_job(make_engine, gated) -> None:
    """Regression: 'bottom' took seq = last + 1, which the next submit in the band also
    got; the keys collided and a job was lost (found by the state machine)."""
    engine = make_engine(max_workers=1, start=False)
    a = engine.submit(gated.name, {"name": "a"})
    b = engine.submit(gated.name, {"name": "b"})
    assert engine.move(a, "bottom") is True
    c = engine.submit(gated.name, {"name": "c"})
    assert _queued_names(engine) == ["b", "a", "c"]
    engine.start()
    assert engine.wait([a, b, c], timeout=10)
    assert gated.order == ["b", "a", "c"]
    assert [engine.get(i).state.value for i in (a, b, c)] == ["completed"] * 3


@pytest.mark.timeout(30)
def test_move_top_after_the_band_head_was_dispatched(make_engine, gated) -> None:
    """Regression: 'top' takes seq = first - 1, the seq of the job just dispatched from
    the band, whose stale entry is still in the ready heap."""
    engine = make_engine(max_workers=1)
    a = engine.submit(gated.name, {"name": "a", "block": True})
    assert gated.started["a"].wait(SETTLE_S)
    b = engine.submit(gated.name, {"name": "b"})
    c = engine.submit(gated.name, {"name": "c"})
    assert engine.move(c, "top") is True
    assert _queued_names(engine) == ["c", "b"]
    gated.gates["a"].set()
    assert engine.wait([a, b, c], timeout=10)
    assert gated.order == ["a", "c", "b"]


@pytest.mark.timeout(30)
def test_retry_requeue_does_not_collide_with_a_moved_job(make_engine, gated) -> None:
    """Regression: a retry is re-queued at its old (priority, seq); 'top' took
    seq = first - 1, which could be that very key."""
    clock = FakeClock()
    engine = make_engine(max_workers=1, clock=clock)
    j = engine.submit(gated.name, {"name": "j", "block": True, "fail": True}, max_retries=1)
    assert gated.started["j"].wait(SETTLE_S)
    engine.pause()
    l_ = engine.submit(gated.name, {"name": "l"})
    k = engine.submit(gated.name, {"name": "k"})
    assert engine.move(k, "top") is True
    gated.gates["j"].set()
    assert _eventually(lambda: engine.get(j).state.value == "queued")
    queued = engine.jobs(states=["queued"])
    assert sorted(i.id for i in queued) == sorted([j, k, l_]), queued
    clock.now += 5  # past the 1 s backoff
    engine.check_timers()
    engine.resume()
    assert _eventually(lambda: all(engine.get(i).is_terminal for i in (j, k, l_)))
    assert gated.runs == {"j": 2, "k": 1, "l": 1}


@pytest.mark.timeout(30)
def test_retry_still_runs_after_the_ready_heap_was_compacted(make_engine, gated) -> None:
    """Regression: compacting a ready heap left heap_key set on dropped entries, so a
    retry back from its backoff was never pushed again and never ran."""
    clock = FakeClock()
    engine = make_engine(max_workers=1, clock=clock)
    j = engine.submit(gated.name, {"name": "j", "block": True, "fail": True}, max_retries=1)
    assert gated.started["j"].wait(SETTLE_S)
    # 100 queued-then-cancelled jobs leave stale heap entries; the next push compacts.
    for n in range(100):
        assert engine.cancel(engine.submit(gated.name, {"name": f"x{n}"}))
    gated.gates["j"].set()
    assert _eventually(
        lambda: engine.get(j).state.value == "queued" and engine.stats().running == 0
    )
    y = engine.submit(gated.name, {"name": "y"})
    assert _eventually(lambda: engine.get(y).is_terminal)
    clock.now += 5  # past the 1 s backoff
    engine.check_timers()
    assert _eventually(lambda: engine.get(j).is_terminal), engine.get(j)
    info = engine.get(j)
    assert (info.state.value, info.attempt) == ("completed", 2)
    assert gated.runs["j"] == 2 and gated.runs["y"] == 1


@pytest.mark.timeout(30)
def test_retry_keeps_its_place_and_runs_again(make_engine, gated) -> None:
    """The same retry path without the compaction (a baseline for the test above)."""
    clock = FakeClock()
    engine = make_engine(max_workers=1, clock=clock)
    j = engine.submit(gated.name, {"name": "j", "block": True, "fail": True}, max_retries=1)
    assert gated.started["j"].wait(SETTLE_S)
    gated.gates["j"].set()
    assert _eventually(
        lambda: engine.get(j).state.value == "queued" and engine.stats().running == 0
    )
    clock.now += 5
    engine.check_timers()
    assert _eventually(lambda: engine.get(j).is_terminal), engine.get(j)
    info = engine.get(j)
    assert (info.state.value, info.attempt, len(info.errors)) == ("completed", 2, 1)


# ---------------------------------------------------------------------- the order structure at scale

N_LARGE = 1200  # > 2 * 512: the scheduler's sorted blocks split
_large_n = itertools.count()


@pytest.mark.timeout(180)
@settings(
    max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    priorities=st.lists(st.sampled_from([1, 5, 5, 5, 8]), min_size=N_LARGE, max_size=N_LARGE),
    moves=st.lists(
        st.tuples(
            st.one_of(st.integers(0, N_LARGE - 1), st.integers(500, 530), st.integers(1010, 1040)),
            st.sampled_from(["up", "down", "up", "down", "top"]),
        ),
        max_size=60,
    ),
    cancels=st.lists(st.integers(0, N_LARGE - 1), max_size=20),
)
def test_large_held_queue_moves_and_cancels_match_model(priorities, moves, cancels) -> None:
    """Held jobs are not in the ready heaps, so this isolates the sorted-blocks order:
    swaps and 'top' across block boundaries with cancels in between; then one worker
    runs them in exactly the model's order."""
    registry = KindRegistry()
    gated = Gated(registry)
    engine = Engine(
        EngineConfig(
            max_workers=1,
            max_queued=N_LARGE,
            history_limit=N_LARGE,
            log_dir=_log_dir(),
            console_log=False,
        ),
        registry=registry,
    )
    try:
        ids = engine.submit_many(
            [
                {"kind": gated.name, "params": {"name": str(n)}, "priority": p, "held": True}
                for n, p in enumerate(priorities)
            ]
        )
        model = sorted(ids, key=lambda i: (priorities[ids.index(i)], ids.index(i)))
        prio = dict(zip(ids, priorities, strict=True))
        cancelled: set[str] = set()
        for step in itertools.zip_longest(moves, cancels):
            move, c = step
            if c is not None and ids[c] not in cancelled:
                assert engine.cancel(ids[c]) is True
                cancelled.add(ids[c])
                model.remove(ids[c])
            if move is None or ids[move[0]] in cancelled:
                continue
            job, where = ids[move[0]], move[1]
            band = [i for i in model if prio[i] == prio[job]]
            start = model.index(band[0])
            pos = band.index(job)
            new = {"top": 0, "up": max(pos - 1, 0), "down": min(pos + 1, len(band) - 1)}[where]
            if new != pos:
                band.insert(new, band.pop(pos))
                model[start : start + len(band)] = band
            assert engine.move(job, where) is (new != pos), (job, where)
        assert [j.id for j in engine.jobs(states=["queued"])] == model
        assert engine.release() == len(model)
        engine.start()
        assert engine.wait(model, timeout=60)
        names = {i: str(n) for n, i in enumerate(ids)}
        assert gated.order == [names[i] for i in model]
    finally:
        engine.shutdown(wait=True, timeout=5.0)
