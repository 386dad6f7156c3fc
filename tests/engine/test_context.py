"""JobContext: what a handler sees and can do, and main-thread calls through the pump."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pydantic
import pytest

from blender_taskqueue.engine import JobCancelled, JobContext, JobState, current_context, job_kind

from support import FakeClock, wait_until

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
S = JobState


class Steps:
    """Lets a test drive a handler step by step: ``handler_step()`` parks the handler
    until the test calls ``go()``; ``wait_parked()`` waits until it is parked."""

    def __init__(self) -> None:
        self._parked = threading.Semaphore(0)
        self._go = threading.Semaphore(0)

    def handler_step(self) -> None:
        self._parked.release()
        assert self._go.acquire(timeout=WAIT), "the test never let the handler go on"

    def wait_parked(self) -> None:
        assert self._parked.acquire(timeout=WAIT), "the handler never reached its step"

    def go(self) -> None:
        self._go.release()


class Scene(pydantic.BaseModel):
    name: str
    frames: int = 10


# ---------------------------------------------------------------- attributes


def test_context_attributes(make_engine, registry, tmp_path):
    seen = {}

    def handler(ctx, params):
        seen.update(
            ctx=ctx, job_id=ctx.job_id, kind=ctx.kind, attempt=ctx.attempt, params=params,
            ctx_params=ctx.params, resume_from=ctx.resume_from, cancelled=ctx.cancelled,
            current=current_context(), thread=threading.current_thread(),
        )
        return "ok"

    job_kind("t.attrs", registry=registry)(handler)
    job_kind("t.scene", params=Scene, registry=registry)(handler)
    engine = make_engine(work_dir=tmp_path / "work")
    job_id = engine.submit("t.attrs", {"a": 1})
    assert engine.wait(job_id, timeout=WAIT)
    assert isinstance(seen["ctx"], JobContext)
    assert seen["job_id"] == job_id
    assert seen["kind"] == "t.attrs"
    assert seen["attempt"] == 1
    assert seen["params"] == {"a": 1} and type(seen["params"]) is dict
    assert seen["ctx_params"] == {"a": 1}
    assert seen["resume_from"] is None
    assert seen["cancelled"] is False
    assert seen["current"] is seen["ctx"]
    assert seen["thread"].name.startswith("taskqueue-worker")
    assert current_context() is None

    seen.clear()
    job_id = engine.submit("t.scene", {"name": "s"})
    assert engine.wait(job_id, timeout=WAIT)
    assert seen["params"] == Scene(name="s", frames=10)
    assert seen["ctx_params"] is seen["params"]


def test_resume_from_is_none_on_a_fresh_resumable_job(make_engine, registry):
    seen = []
    job_kind("t.res", resumable=True, registry=registry)(
        lambda ctx, p: seen.append(ctx.resume_from)
    )
    engine = make_engine()
    assert engine.wait(engine.submit("t.res"), timeout=WAIT)
    assert seen == [None]


def test_current_context_is_cleared_after_the_job(make_engine, registry):
    after = []
    job_kind("t.nop", registry=registry)(lambda ctx, p: current_context() is ctx)
    engine = make_engine(max_workers=1)
    done = threading.Event()

    def callback(info):  # runs on the worker right after the job
        after.append(current_context())
        done.set()

    engine.on_finished(callback, on_main=False)
    job_id = engine.submit("t.nop")
    assert done.wait(WAIT)
    assert engine.get(job_id).result is True
    assert after == [None]


def test_workdir_is_a_per_job_folder_under_work_dir(make_engine, registry, tmp_path):
    dirs = {}

    def handler(ctx, params):
        first = ctx.workdir
        (first / "out.txt").write_text(ctx.job_id)
        dirs[ctx.job_id] = (first, ctx.workdir)

    job_kind("t.files", registry=registry)(handler)
    root = tmp_path / "work"
    engine = make_engine(work_dir=root)
    a, b = engine.submit("t.files"), engine.submit("t.files")
    assert engine.wait([a, b], timeout=WAIT)
    for job_id in (a, b):
        first, second = dirs[job_id]
        assert first == second == root / job_id
        assert (first / "out.txt").read_text() == job_id
    assert dirs[a][0] != dirs[b][0]
    assert engine.workdir_for(a) == root / a


def test_workdir_defaults_under_state_dir(make_engine, registry, tmp_path):
    dirs = []
    job_kind("t.files", registry=registry)(lambda ctx, p: dirs.append(ctx.workdir))
    engine = make_engine(state_dir=tmp_path / "state")
    job_id = engine.submit("t.files")
    assert engine.wait(job_id, timeout=WAIT)
    assert dirs == [tmp_path / "state" / "jobs" / job_id]
    assert dirs[0].is_dir()


def test_log_is_bound_to_the_job(make_engine, registry):
    def handler(ctx, params):
        ctx.log.info("hello from the job", frame=12)
        assert ctx.log is ctx.log  # bound once

    job_kind("t.log", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.log")
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).state is S.COMPLETED
    assert engine.flush() is True  # writes out the log lines queued for the log thread
    path = Path(engine.log_path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mine = [r for r in records if r.get("event") == "hello from the job"]
    assert len(mine) == 1
    assert mine[0]["job_id"] == job_id
    assert mine[0]["kind"] == "t.log"
    assert mine[0]["attempt"] == 1
    assert mine[0]["frame"] == 12


# ---------------------------------------------------------------- progress


def test_progress_is_clamped_and_shown(make_engine, registry):
    steps = Steps()

    def handler(ctx, params):
        ctx.progress(0.25, stage="load", message="loading")
        steps.handler_step()
        ctx.progress(-3)
        steps.handler_step()
        ctx.progress(7.5)
        steps.handler_step()
        ctx.progress(None, stage="save")  # keeps the fraction
        steps.handler_step()
        ctx.progress(1, message=42)  # non-str message is shown as text
        steps.handler_step()

    job_kind("t.prog", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.prog")
    expected = [
        (0.25, "load", "loading"),
        (0.0, "load", "loading"),
        (1.0, "load", "loading"),
        (1.0, "save", "loading"),
        (1.0, "save", "42"),
    ]
    for want in expected:
        steps.wait_parked()
        info = engine.get(job_id)
        assert (info.progress, info.stage, info.message) == want
        assert info.state is S.RUNNING
        steps.go()
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).progress == 1.0


@pytest.mark.parametrize("bad, error", [("half", TypeError), (True, TypeError), ([0.5], TypeError),
                                        (math.nan, ValueError)])
def test_progress_refuses_non_numbers(make_engine, registry, bad, error):
    caught = []

    def handler(ctx, params):
        ctx.progress(0.5)
        try:
            ctx.progress(bad)
        except Exception as exc:
            caught.append(exc)

    job_kind("t.bad", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.bad")
    assert engine.wait(job_id, timeout=WAIT)
    assert len(caught) == 1 and isinstance(caught[0], error)
    assert "fraction" in str(caught[0])


def test_eta_from_progress_and_the_engine_clock(make_engine, registry):
    clock = FakeClock()
    steps = Steps()

    def handler(ctx, params):
        steps.handler_step()
        ctx.progress(0.25)
        steps.handler_step()
        ctx.progress(1.0)
        steps.handler_step()

    job_kind("t.eta", registry=registry)(handler)
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.eta")
    steps.wait_parked()
    assert engine.get(job_id).eta_seconds is None
    clock.advance(10)  # 10 s for the first quarter: 30 s to go
    steps.go()
    steps.wait_parked()
    assert engine.get(job_id).eta_seconds == pytest.approx(30.0)
    steps.go()
    steps.wait_parked()
    assert engine.get(job_id).eta_seconds == 0.0
    steps.go()
    wait_until(lambda: engine.get(job_id).is_terminal)
    info = engine.get(job_id)
    assert info.state is S.COMPLETED and info.eta_seconds == 0 and info.progress == 1.0


def test_completed_job_has_full_progress_even_if_never_reported(make_engine, registry):
    job_kind("t.quiet", registry=registry)(lambda ctx, p: None)
    engine = make_engine()
    job_id = engine.submit("t.quiet")
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert (info.progress, info.eta_seconds) == (1.0, 0.0)


# ---------------------------------------------------------------- cancellation seen from inside


def test_cancelled_and_raise_if_cancelled(make_engine, registry):
    steps = Steps()
    seen = []

    def handler(ctx, params):
        seen.append(ctx.cancelled)
        ctx.raise_if_cancelled()  # not cancelled yet: no-op
        steps.handler_step()
        seen.append(ctx.cancelled)
        try:
            ctx.raise_if_cancelled()
        except JobCancelled as exc:
            seen.append(str(exc))
            raise

    job_kind("t.c", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.c")
    steps.wait_parked()
    engine.cancel(job_id)
    steps.go()
    assert engine.wait(job_id, timeout=WAIT)
    assert seen[:2] == [False, True]
    assert job_id in seen[2] and "user" in seen[2]
    assert engine.get(job_id).state is S.CANCELLED
    assert engine.get(job_id).error is None


def test_sleep_returns_when_not_cancelled_and_wakes_on_cancel(make_engine, registry):
    started = threading.Event()
    outcome = []

    def handler(ctx, params):
        ctx.sleep(0)  # a zero sleep just checks
        ctx.sleep(0.001)
        started.set()
        try:
            ctx.sleep(WAIT * 3)
        except JobCancelled:
            outcome.append("woken")
            raise

    job_kind("t.sleep", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.sleep")
    assert started.wait(WAIT)
    t0 = time.monotonic()
    engine.cancel(job_id)
    assert engine.wait(job_id, timeout=WAIT)
    assert time.monotonic() - t0 < WAIT  # woke on the cancel, not at the end of the sleep
    assert outcome == ["woken"]


def test_a_handler_raising_job_cancelled_on_its_own_ends_cancelled(make_engine, registry):
    job_kind("t.giveup", registry=registry)(lambda ctx, p: (_ for _ in ()).throw(JobCancelled("no")))
    engine = make_engine()
    job_id = engine.submit("t.giveup")
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).state is S.CANCELLED


# ---------------------------------------------------------------- checkpoint


def test_checkpoint_is_the_partial_result(make_engine, registry):
    steps = Steps()

    def handler(ctx, params):
        data = {"done": [1, 2], "t": (3,)}
        ctx.checkpoint(data)
        data["done"].append(99)  # the engine kept a copy
        steps.handler_step()
        ctx.checkpoint({"done": [1, 2, 3]})
        steps.handler_step()
        return "all"

    job_kind("t.ckpt", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.ckpt")
    steps.wait_parked()
    assert engine.get(job_id).partial_result == {"done": [1, 2], "t": [3]}
    steps.go()
    steps.wait_parked()
    assert engine.get(job_id).partial_result == {"done": [1, 2, 3]}
    steps.go()
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.result == "all"
    assert info.partial_result == {"done": [1, 2, 3]}


@pytest.mark.parametrize("data", [[1, 2], "x", None, {"o": object()}, {"s": {1}}])
def test_checkpoint_refuses_non_json_dicts(make_engine, registry, data):
    caught = []

    def handler(ctx, params):
        try:
            ctx.checkpoint(data)
        except TypeError as exc:
            caught.append(str(exc))

    job_kind("t.badckpt", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.badckpt")
    assert engine.wait(job_id, timeout=WAIT)
    assert len(caught) == 1 and "checkpoint" in caught[0]
    assert engine.get(job_id).partial_result is None


# ---------------------------------------------------------------- call_on_main, run_main_calls


def test_call_on_main_returns_the_result(make_engine, registry):
    ran_on = []

    def on_main(a, b=0):
        ran_on.append(threading.current_thread())
        return a * 10 + b

    def handler(ctx, params):
        return ctx.call_on_main(on_main, 4, b=2)

    job_kind("t.main", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.main")
    wait_until(lambda: engine.pending_main_calls == 1, what="the main-thread call")
    assert engine.get(job_id).state is S.RUNNING  # the worker blocks on it
    assert engine.run_main_calls(1.0) == 1
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).result == 42
    assert ran_on == [threading.main_thread()]


def test_call_on_main_raises_fns_exception_in_the_worker(make_engine, registry):
    caught = []

    def on_main():
        raise KeyError("no such object")

    def handler(ctx, params):
        try:
            ctx.call_on_main(on_main)
        except KeyError as exc:
            caught.append(exc)
        ctx.call_on_main(on_main)  # uncaught: the job fails with it

    job_kind("t.mainerr", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.mainerr")
    assert engine.wait(job_id, timeout=WAIT)  # wait() on the main thread runs the calls
    assert len(caught) == 1 and caught[0].args == ("no such object",)
    err = engine.get(job_id).error
    assert err.type == "KeyError" and "no such object" in err.message


def test_call_on_main_is_served_by_wait_on_the_main_thread(make_engine, registry):
    def handler(ctx, params):
        return [ctx.call_on_main(lambda i=i: i * i) for i in range(5)]

    job_kind("t.many", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.many")
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).result == [0, 1, 4, 9, 16]


def test_cancel_while_waiting_for_the_main_thread(make_engine, registry):
    outcome = []
    fn_ran = []

    def handler(ctx, params):
        try:
            ctx.call_on_main(lambda: fn_ran.append(True))
        except JobCancelled as exc:
            outcome.append(str(exc))
            raise

    job_kind("t.cancelmain", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.cancelmain")
    wait_until(lambda: engine.pending_main_calls == 1, what="the main-thread call")
    engine.cancel(job_id)
    wait_until(lambda: engine.get(job_id).is_terminal, what="the worker to give up the call")
    assert engine.get(job_id).state is S.CANCELLED
    assert outcome and "main thread" in outcome[0]
    assert engine.run_main_calls(1.0) == 0  # withdrawn: it never runs
    assert fn_ran == []


def test_run_main_calls_runs_at_least_one_and_keeps_to_the_budget(make_engine, registry):
    order = []
    job_kind("t.one", registry=registry)(
        lambda ctx, p: ctx.call_on_main(order.append, p["n"])
    )
    engine = make_engine(max_workers=3)
    assert engine.run_main_calls(0.0) == 0  # nothing queued
    ids = []
    for n in range(3):
        ids.append(engine.submit("t.one", {"n": n}))
        wait_until(lambda n=n: engine.pending_main_calls == n + 1)
    assert engine.run_main_calls(0.0) == 1  # budget spent: still one runs
    assert order == [0]
    assert engine.pending_main_calls == 2
    assert engine.run_main_calls(5.0) == 2
    assert order == [0, 1, 2]  # first in, first out
    assert engine.pending_main_calls == 0
    assert engine.wait(ids, timeout=WAIT)


def test_run_main_calls_stops_when_the_budget_is_spent(make_engine, registry):
    job_kind("t.slowmain", registry=registry)(
        lambda ctx, p: ctx.call_on_main(time.sleep, 0.02)  # the main-thread work itself is slow
    )
    engine = make_engine(max_workers=3)
    ids = [engine.submit("t.slowmain") for _ in range(3)]
    wait_until(lambda: engine.pending_main_calls == 3)
    assert engine.run_main_calls(0.01) == 1  # the first call used up the budget
    assert engine.pending_main_calls == 2
    assert engine.run_main_calls(5.0) == 2
    assert engine.wait(ids, timeout=WAIT)


def test_main_call_base_exceptions_reach_the_pump_and_the_worker(make_engine, registry):
    caught = []

    def handler(ctx, params):
        try:
            ctx.call_on_main(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
        except KeyboardInterrupt:
            caught.append("worker")
        return "survived"

    job_kind("t.kbd", registry=registry)(handler)
    engine = make_engine()
    job_id = engine.submit("t.kbd")
    wait_until(lambda: engine.pending_main_calls == 1)
    with pytest.raises(KeyboardInterrupt):
        engine.run_main_calls(1.0)  # the main thread's own interrupt is not swallowed
    assert engine.wait(job_id, timeout=WAIT)
    assert caught == ["worker"]
    assert engine.get(job_id).result == "survived"
