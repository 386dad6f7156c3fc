"""The module-level console API (``tq.submit`` ...) acting on the shared engine."""

from __future__ import annotations

import sys
import threading

import pytest

import blender_taskqueue as tq
from blender_taskqueue import api
from blender_taskqueue.engine import kinds as engine_kinds

from support import wait_until

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
S = tq.JobState


@pytest.fixture
def shared(make_engine, registry):
    """Installs a test engine as the shared one, and puts the previous one back."""
    gate = threading.Event()
    started = threading.Event()

    def echo(ctx, params):
        return dict(params)

    def block(ctx, params):
        started.set()
        assert gate.wait(WAIT)
        return "unblocked"

    def main(ctx, params):
        return ctx.call_on_main(lambda: threading.current_thread().name)

    tq.job_kind("t.echo", registry=registry)(echo)
    tq.job_kind("t.block", registry=registry)(block)
    tq.job_kind("t.main", registry=registry)(main)
    engine = make_engine(max_workers=2)
    previous = tq.set_engine(engine)
    engine.test_gate = gate  # type: ignore[attr-defined]
    engine.test_started = started  # type: ignore[attr-defined]
    try:
        yield engine
    finally:
        gate.set()
        assert tq.set_engine(previous) is engine


def test_set_engine_returns_the_previous_and_engine_returns_the_current(shared, make_engine):
    assert tq.engine() is shared
    other = make_engine()
    assert tq.set_engine(other) is shared
    assert tq.engine() is other
    assert tq.set_engine(shared) is other
    assert tq.engine() is shared


def test_set_engine_installs_the_pump_as_main_tick(shared, make_engine):
    assert shared.main_tick is tq.pump
    other = make_engine()
    mine = lambda: None  # noqa: E731
    other.main_tick = mine
    previous = tq.set_engine(other)
    try:
        assert other.main_tick is mine  # an engine's own tick is kept
    finally:
        tq.set_engine(previous)


def test_submit_get_wait_jobs_stats(shared):
    job_id = tq.submit("t.echo", {"a": 1}, priority="high", label="lbl")
    assert tq.wait(job_id, timeout=WAIT) is True
    info = tq.get(job_id)
    assert info == shared.get(job_id)
    assert (info.state, info.result, info.priority, info.label) == (S.COMPLETED, {"a": 1}, 3, "lbl")
    assert [j.id for j in tq.jobs()] == [job_id]
    assert [j.id for j in tq.jobs(states="completed")] == [job_id]
    assert tq.jobs(states=["queued"]) == []
    assert tq.stats().completed == 1 == shared.stats().completed
    with pytest.raises(KeyError):
        tq.get("nope-1")
    with pytest.raises(tq.UnknownKind):
        tq.submit("t.nope")
    with pytest.raises(ValueError, match="priority"):
        tq.submit("t.echo", priority="hgh")
    assert [j.id for j in shared.jobs()] == [job_id]  # refused submits queued nothing


def test_submit_many_and_run(shared):
    ids = tq.submit_many([{"kind": "t.echo", "params": {"n": i}} for i in range(3)])
    ran = tq.run(lambda a, b: a + b, 2, 3, label="sum", priority="urgent")
    assert tq.wait(ids + [ran], timeout=WAIT)
    assert [shared.get(i).result for i in ids] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert shared.get(ran).result == 5
    assert shared.get(ran).label == "sum" and shared.get(ran).priority == 0
    with pytest.raises(tq.UnknownKind, match=r"specs\[1\]"):
        tq.submit_many([{"kind": "t.echo"}, {"kind": "t.nope"}])
    assert len(shared.jobs()) == 4


def test_cancel_retry_move_release_clear(shared):
    tq.pause()
    assert shared.paused and tq.stats().paused
    a = tq.submit("t.echo", {"n": "a"})
    b = tq.submit("t.echo", {"n": "b"})
    held = tq.submit("t.echo", {"n": "h"}, held=True)
    assert tq.move(b, "top") is True
    assert [j.id for j in shared.jobs(states="queued")] == [b, a, held]
    assert tq.cancel(b) is True
    assert shared.get(b).state is S.CANCELLED
    assert tq.cancel(b) is False
    assert tq.release(held) == 1
    assert shared.get(held).held is False
    tq.resume()
    assert not shared.paused
    again = tq.retry(b, {"n": "b2"})
    assert tq.wait([a, held, again], timeout=WAIT)
    assert shared.get(again).result == {"n": "b2"}
    assert tq.clear_finished() == 4
    assert shared.jobs() == []


def test_configure(shared):
    cfg = tq.configure(max_workers=3)
    assert cfg.max_workers == 3 == shared.config.max_workers
    with pytest.raises(ValueError):
        tq.configure(max_workers=9)
    assert shared.config.max_workers == 3


def test_on_finished_drain_events_run_main_calls(shared):
    seen = []
    off = tq.on_finished(lambda info: seen.append((info.id, threading.current_thread())))
    job_id = tq.submit("t.echo")
    wait_until(lambda: shared.pending_main_calls == 1, what="the callback to be queued")
    assert tq.run_main_calls() == 1
    assert seen == [(job_id, threading.main_thread())]
    states = [e.info.state.value for e in tq.drain_events() if e.type == "state"]
    assert states == ["submitted", "queued", "dispatched", "running", "completed"]
    assert tq.drain_events() == []
    off()
    other = tq.submit("t.echo")
    assert tq.wait(other, timeout=WAIT)
    assert shared.pending_main_calls == 0 and len(seen) == 1


def test_pump_runs_main_thread_calls_and_reports_the_next_delay(shared):
    assert tq.pump() == api.IDLE_DELAY
    job_id = tq.submit("t.main")
    wait_until(lambda: shared.pending_main_calls == 1, what="the main-thread call")
    tq.pump()
    wait_until(lambda: shared.get(job_id).is_terminal)
    assert shared.get(job_id).result == threading.main_thread().name
    tq.pump()  # drains the events
    assert shared.drain_events() == []
    assert tq.pump() == api.IDLE_DELAY


def test_pump_reports_active_while_a_job_runs(shared):
    job_id = tq.submit("t.block")
    assert shared.test_started.wait(WAIT)
    assert tq.pump() == api.ACTIVE_DELAY
    shared.test_gate.set()
    assert tq.wait(job_id, timeout=WAIT)
    assert tq.pump() == api.IDLE_DELAY


def test_wait_on_the_main_thread_keeps_pumping(shared):
    assert threading.current_thread() is threading.main_thread()
    ids = [tq.submit("t.main") for _ in range(3)]
    assert tq.wait(ids, timeout=WAIT) is True  # only the pump can serve call_on_main
    assert {shared.get(i).result for i in ids} == {threading.main_thread().name}


def test_wait_on_an_engine_that_is_no_longer_shared_still_serves_its_calls(shared, make_engine):
    other = make_engine()
    assert tq.set_engine(other) is shared
    assert tq.set_engine(shared) is other  # other keeps main_tick = tq.pump
    job_id = other.submit("t.main")
    try:
        assert other.wait(job_id, timeout=1.0) is True
        assert other.get(job_id).result == threading.main_thread().name
    finally:
        other.run_main_calls(1.0)


def test_wait_timeout_and_flush(shared):
    job_id = tq.submit("t.block")
    assert shared.test_started.wait(WAIT)
    assert tq.wait(job_id, timeout=0.05) is False
    tq.flush()  # no state_dir: a no-op that must not fail
    shared.test_gate.set()
    assert tq.wait(job_id, timeout=WAIT) is True
    assert tq.get(job_id).result == "unblocked"


def test_job_kind_defaults_to_the_shared_registry():
    name = "t.api_shared_registry_probe"
    try:
        @tq.job_kind(name)
        def handler(ctx, params):
            return 1

        assert name in engine_kinds.registry
        assert engine_kinds.registry.get(name).handler is handler
    finally:
        engine_kinds.registry.unregister(name)
    assert name not in engine_kinds.registry


def test_public_names_are_exported():
    for name in ("submit", "submit_many", "run", "get", "jobs", "cancel", "retry", "move",
                 "release", "clear_finished", "pause", "resume", "configure", "stats", "wait",
                 "on_finished", "flush", "drain_events", "run_main_calls", "pump", "render_current_file",
                 "set_engine", "engine", "job_kind", "current_context", "Engine",
                 "EngineConfig", "JobState", "JobInfo", "JobError", "JobContext",
                 "JobCancelled", "QueueFull", "EngineClosed", "Event", "EngineStats"):
        assert hasattr(tq, name), name
    assert [s.value for s in tq.JobState] == [
        "submitted", "queued", "dispatched", "running",
        "completed", "failed", "cancelled", "interrupted",
    ]
    assert dict(tq.PRIORITY_NAMES) == {"urgent": 0, "high": 3, "normal": 5, "low": 8}
    assert {s for s in tq.JobState if s.is_terminal} == {
        S.COMPLETED, S.FAILED, S.CANCELLED, S.INTERRUPTED
    }
    assert S.RUNNING == "running" and str(S.QUEUED) == "queued"


def test_jobs_stays_callable_after_builtin_kinds_are_imported() -> None:
    """A subpackage named like a public function would replace it on import."""
    import blender_taskqueue as tq
    import blender_taskqueue.kinds.demo  # noqa: F401

    assert callable(tq.jobs) and callable(tq.get) and callable(tq.run)
    for name in tq.__all__:
        assert not isinstance(getattr(tq, name), type(tq)), f"tq.{name} is a module"


def test_render_current_file_outside_blender_says_what_to_do(monkeypatch):
    monkeypatch.delitem(sys.modules, "bpy", raising=False)
    with pytest.raises(RuntimeError, match="submit 'blender.render' with blend_file"):
        tq.render_current_file(frame=1)
