"""A hypothesis state machine for pipelines: depends_on and not_before.

Jobs are submitted with random prerequisites (among jobs still queued, running
or completed) and random start times on an injected wall clock; running jobs
are finished (ok or failing) and jobs are cancelled, with or without their
dependents, in any order. After every step the model predicts exactly which
jobs run once the engine settles (FIFO, at most ``max_workers``, skipping jobs
whose prerequisites have not all completed or whose time has not come) and the
check waits for their "started" events (never sleeps). Each handler checks, as
it starts, that every prerequisite completed and its time came. Teardown
opens every gate and checks that every job ended exactly once, as the model
says: a job whose prerequisite failed or was cancelled ends failed (or
cancelled, when its prerequisite was cancelled with its dependents), and none
was lost or ran twice.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry, KindSpec

SETTLE_S = 5.0
GATE_S = 30.0
MAX_WORKERS = 2


class Wall:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass(eq=False)
class MJob:
    tag: int
    id: str
    deps: list["MJob"]
    not_before: Optional[float]
    where: str = "queued"  # queued | running | done
    expected: Optional[str] = None
    outcome: str = "ok"
    dependents: list["MJob"] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<job {self.tag} {self.where} deps={[d.tag for d in self.deps]}>"


class PipelineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.wall = Wall()
        self.registry = KindRegistry()
        self.registry.register(KindSpec(name="pm.step", handler=self._handler))
        self.gates: dict[int, threading.Event] = {}
        self.started: dict[int, threading.Event] = {}
        self.starts: list[int] = []
        self.violations: list[str] = []
        self.finished: list[tuple[str, str]] = []
        self.tags = itertools.count()
        self.jobs: list[MJob] = []
        self.by_tag: dict[int, MJob] = {}
        self.log_dir = Path(tempfile.mkdtemp(prefix="tq-pipeline-sm-"))
        self.engine = Engine(
            EngineConfig(max_workers=MAX_WORKERS, log_dir=self.log_dir, console_log=False),
            registry=self.registry, wall_clock=self.wall,
        )
        self.engine.on_finished(lambda i: self.finished.append((i.id, i.state.value)), on_main=False)
        self.engine.start()

    def _handler(self, ctx, params):
        tag = params["tag"]
        job = self.by_tag[tag]
        with self.lock:
            self.starts.append(tag)
            for dep in job.deps:
                state = self.engine.get(dep.id).state.value
                if state != "completed":
                    self.violations.append(f"job {tag} started while prerequisite {dep.tag} was {state}")
            if job.not_before is not None and self.wall.t < job.not_before:
                self.violations.append(f"job {tag} started before its time")
            if set(ctx.inputs) != {d.id for d in job.deps}:
                self.violations.append(f"job {tag} got inputs {sorted(ctx.inputs)}")
        self.started[tag].set()
        self.gates[tag].wait(GATE_S)
        if self.by_tag[tag].outcome == "fail":
            raise RuntimeError(f"job {tag} fails on purpose")
        return {"tag": tag}

    # ---------------------------------------------------------------- the model

    def _eligible(self, job: MJob) -> bool:
        return (all(d.where == "done" and d.expected == "completed" for d in job.deps)
                and (job.not_before is None or job.not_before <= self.wall.t))

    def _dispatch(self) -> None:
        running = [j for j in self.jobs if j.where == "running"]
        for job in self.jobs:  # FIFO: submit order, one priority
            if len(running) >= MAX_WORKERS:
                return
            if job.where == "queued" and self._eligible(job):
                job.where = "running"
                running.append(job)

    def _end(self, job: MJob, state: str) -> None:
        """``job`` ended ``state``; its queued dependents fail with it (transitively)."""
        job.where, job.expected = "done", state
        if state != "completed":
            for dep in job.dependents:
                if dep.where == "queued":
                    self._end(dep, "failed")

    def _settle(self) -> None:
        self._dispatch()
        for job in self.jobs:
            if job.where == "running":
                assert self.started[job.tag].wait(SETTLE_S), f"{job} should have started"

    # ---------------------------------------------------------------- rules

    @rule(data=st.data(), delay=st.sampled_from([None, None, 0, 10, 60]))
    def submit(self, data, delay):
        candidates = [j for j in self.jobs if j.where != "done" or j.expected == "completed"]
        deps = data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True)) if candidates else []
        tag = next(self.tags)
        self.gates[tag] = threading.Event()
        self.started[tag] = threading.Event()
        with self.lock:  # the handler may start before submit returns: the model is ready first
            job = MJob(tag, "", deps, None if delay is None else self.wall.t + delay)
            self.by_tag[tag] = job
            job.id = self.engine.submit("pm.step", {"tag": tag}, depends_on=[d.id for d in deps],
                                        not_before=delay)
        for d in deps:
            d.dependents.append(job)
        self.jobs.append(job)
        self._settle()

    @precondition(lambda self: any(j.where == "running" for j in self.jobs))
    @rule(data=st.data(), fail=st.booleans())
    def finish(self, data, fail):
        job = data.draw(st.sampled_from([j for j in self.jobs if j.where == "running"]))
        job.outcome = "fail" if fail else "ok"
        self.gates[job.tag].set()
        assert self.engine.wait([job.id], timeout=SETTLE_S)
        self._end(job, "failed" if fail else "completed")
        self._settle()

    @precondition(lambda self: any(j.where == "queued" for j in self.jobs))
    @rule(data=st.data(), with_dependents=st.booleans())
    def cancel_queued(self, data, with_dependents):
        job = data.draw(st.sampled_from([j for j in self.jobs if j.where == "queued"]))
        self.engine.cancel(job.id, with_dependents=with_dependents)
        if with_dependents:
            stack = list(job.dependents)
            while stack:
                dep = stack.pop()
                if dep.where == "queued":
                    dep.where, dep.expected = "done", "cancelled"
                    stack.extend(dep.dependents)
        self._end(job, "cancelled")
        self._settle()

    @rule(dt=st.sampled_from([5, 30, 120]))
    def time_passes(self, dt):
        self.wall.t += dt
        self.engine.check_timers()
        self._settle()

    @invariant()
    def engine_agrees(self):
        assert not self.violations, self.violations
        for job in self.jobs:
            state = self.engine.get(job.id).state.value
            if job.where == "done":
                assert state == job.expected, (job, state)
            elif job.where == "queued":
                assert state == "queued", (job, state)
            else:
                assert state == "running", (job, state)

    def teardown(self):
        try:
            self.wall.t += 10_000
            self.engine.check_timers()
            for _ in range(len(self.jobs) + 1):  # open gates until everything has ended
                for gate in self.gates.values():
                    gate.set()
                if self.engine.wait([j.id for j in self.jobs], timeout=0.5):
                    break
            assert self.engine.wait([j.id for j in self.jobs], timeout=SETTLE_S)
            assert not self.violations, self.violations
            ids = [i for i, _ in self.finished]
            assert len(ids) == len(set(ids)) == len(self.jobs), "a job ended twice or was lost"
            assert len(self.starts) == len(set(self.starts)), "a job ran twice"
            for job in self.jobs:
                info = self.engine.get(job.id)
                if job.where == "done":
                    assert info.state.value == job.expected, (job, info.state, info.error)
                    if job.expected == "failed" and job.outcome == "ok":
                        assert info.error is not None and info.error.type == "DependencyFailed"
        finally:
            for gate in self.gates.values():
                gate.set()
            self.engine.shutdown(wait=True, timeout=5.0)


@pytest.mark.timeout(300)
def test_pipelines_state_machine():
    run_state_machine_as_test(
        PipelineMachine,
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
