"""Failure policy: what a failure records, timeouts, opt-in retries with backoff.

Time is a fake clock handed to the engine; ``engine.check_timers()`` runs what is
due, so no test sleeps through a backoff or a timeout.
"""

from __future__ import annotations

import threading

import pydantic
import pytest

from blender_taskqueue.engine import JobState, UnknownKind, job_kind

from support import FakeClock, wait_until

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
S = JobState


def finished(engine, *ids: str) -> None:
    """Wait (in real time, whatever the engine's clock) until the jobs are terminal."""
    wait_until(lambda: all(engine.get(i).is_terminal for i in ids), what=f"{ids} to finish")


def state_sequence(events, job_id: str) -> list[str]:
    return [e.info.state.value for e in events if e.type == "state" and e.job_id == job_id]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------- what a failure records


def test_failure_records_type_message_traceback_and_stage(make_engine, registry):
    def encode_frames(ctx, params):
        ctx.progress(0.3, stage="encode")
        ctx.checkpoint({"frames_done": 3})
        raise ValueError("bad frame 7")

    job_kind("t.encode", registry=registry)(encode_frames)
    engine = make_engine()
    job_id = engine.submit("t.encode")
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is S.FAILED
    err = info.error
    assert err.type == "ValueError"
    assert err.message == "bad frame 7"
    assert err.stage == "encode"
    assert err.attempt == 1
    assert "Traceback" in err.traceback
    assert "encode_frames" in err.traceback  # the handler's frame is in it
    assert err.traceback.rstrip().endswith("ValueError: bad frame 7")
    assert info.errors == (err,)
    assert info.message == "ValueError: bad frame 7"
    assert info.result is None
    assert info.partial_result == {"frames_done": 3}  # kept on failure
    assert info.progress == pytest.approx(0.3)
    assert info.finished_at is not None and info.attempt == 1


def test_failure_without_stage_or_message(make_engine, registry):
    class Oops(Exception):
        pass

    def fail(ctx, params):
        raise Oops()

    job_kind("t.oops", registry=registry)(fail)
    engine = make_engine()
    job_id = engine.submit("t.oops")
    assert engine.wait(job_id, timeout=WAIT)
    err = engine.get(job_id).error
    assert err.type == "Oops"
    assert err.message == "Oops"  # never an empty message
    assert err.stage is None


def test_multiline_message_is_kept_whole_and_summarised(make_engine, registry):
    def fail(ctx, params):
        raise RuntimeError("first line\nsecond line")

    job_kind("t.ml", registry=registry)(fail)
    engine = make_engine()
    job_id = engine.submit("t.ml")
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.error.message == "first line\nsecond line"
    assert info.message == "RuntimeError: first line"


def test_other_jobs_are_unaffected_by_a_failure(make_engine, registry):
    def maybe(ctx, params):
        if params["fail"]:
            raise RuntimeError(f"job {params['n']} broke")
        return params["n"]

    job_kind("t.maybe", registry=registry)(maybe)
    engine = make_engine(max_workers=2)
    ids = [engine.submit("t.maybe", {"n": n, "fail": n % 3 == 0}) for n in range(9)]
    assert engine.wait(ids, timeout=WAIT)
    for n, job_id in enumerate(ids):
        info = engine.get(job_id)
        if n % 3 == 0:
            assert info.state is S.FAILED and info.error.message == f"job {n} broke"
        else:
            assert info.state is S.COMPLETED and info.result == n and info.error is None
    st = engine.stats()
    assert (st.completed, st.failed) == (6, 3)


def test_system_exit_in_a_handler_fails_the_job_not_the_worker(make_engine, registry):
    def bail(ctx, params):
        raise SystemExit(3)

    job_kind("t.exit", registry=registry)(bail)
    job_kind("t.ok", registry=registry)(lambda ctx, p: "still here")
    engine = make_engine(max_workers=1)
    bad = engine.submit("t.exit")
    after = engine.submit("t.ok")
    assert engine.wait([bad, after], timeout=WAIT)
    assert engine.get(bad).state is S.FAILED
    assert engine.get(bad).error.type == "SystemExit"
    assert engine.get(after).result == "still here"


def test_kind_unregistered_before_the_job_runs_fails_at_the_params_stage(make_engine, registry):
    job_kind("t.gone", registry=registry)(lambda ctx, p: 1)
    engine = make_engine()
    engine.pause()
    job_id = engine.submit("t.gone")
    registry.unregister("t.gone")
    engine.resume()
    assert engine.wait(job_id, timeout=WAIT)
    err = engine.get(job_id).error
    assert err.type == UnknownKind.__name__
    assert "t.gone" in err.message
    assert err.stage == "params"


def test_params_that_no_longer_validate_fail_at_the_params_stage(make_engine, registry):
    class V1(pydantic.BaseModel):
        n: int

    class V2(pydantic.BaseModel):
        n: int
        required_now: str

    def handler(ctx, params):
        return params.n

    job_kind("t.versioned", params=V1, registry=registry)(handler)
    engine = make_engine()
    engine.pause()
    job_id = engine.submit("t.versioned", {"n": 1})
    # The add-on is reloaded with a newer params model before the job runs.
    job_kind("t.versioned", params=V2, registry=registry)(handler)
    engine.resume()
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is S.FAILED
    assert info.error.stage == "params"
    assert "required_now" in info.error.message


# ---------------------------------------------------------------- timeout


@pytest.fixture
def slow(registry):
    """Kind ``t.slow``: checkpoints, signals, then sleeps via ctx.sleep (wakes on stop)
    or, with params["ignore"], waits for ``gate`` and returns "late"."""

    class Slow:
        started = threading.Event()
        gate = threading.Event()
        calls: list[int] = []

        @staticmethod
        def handler(ctx, params):
            Slow.calls.append(ctx.attempt)
            ctx.progress(0.4, stage="working")
            ctx.checkpoint({"step": 4, "attempt": ctx.attempt})
            Slow.started.set()
            if params.get("ignore"):
                assert Slow.gate.wait(WAIT)
                return "late"
            if params.get("pass_on_attempt") == ctx.attempt:
                return "ok"
            ctx.sleep(WAIT)  # raises JobCancelled when the timeout asks it to stop
            raise AssertionError("the timeout never came")

    Slow.calls = []
    job_kind("t.slow", registry=registry)(Slow.handler)
    return Slow


def test_timeout_fails_with_type_timeout_and_keeps_partial_result(make_engine, clock, slow):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.slow", timeout=5)
    assert slow.started.wait(WAIT)
    clock.advance(4.75)  # binary-exact steps: the sums land exactly on the deadline
    engine.check_timers()
    assert engine.get(job_id).state is S.RUNNING
    assert engine.get(job_id).cancel_pending is False
    clock.advance(0.25)
    engine.check_timers()
    finished(engine, job_id)
    info = engine.get(job_id)
    assert info.state is S.FAILED
    assert info.error.type == "Timeout"
    assert "5 s" in info.error.message
    assert info.error.stage == "working"
    assert info.partial_result == {"step": 4, "attempt": 1}
    assert info.result is None
    assert info.attempt == 1 and len(info.errors) == 1  # not retried by default
    assert slow.calls == [1]
    assert state_sequence(engine.drain_events(), job_id)[-2:] == ["running", "failed"]


def test_timeout_is_measured_from_running_not_from_submit(make_engine, clock, registry, slow):
    gate, started = threading.Event(), threading.Event()

    def blocker(ctx, params):
        started.set()
        assert gate.wait(WAIT)

    job_kind("t.block", registry=registry)(blocker)
    engine = make_engine(max_workers=1, clock=clock)
    first = engine.submit("t.block")
    assert started.wait(WAIT)
    job_id = engine.submit("t.slow", timeout=5)
    clock.advance(100)  # far beyond the timeout, but the job is only queued
    engine.check_timers()
    assert engine.get(job_id).state is S.QUEUED
    gate.set()
    assert slow.started.wait(WAIT)
    clock.advance(4.75)
    engine.check_timers()
    assert engine.get(job_id).cancel_pending is False
    clock.advance(0.25)
    engine.check_timers()
    finished(engine, first, job_id)
    assert engine.get(job_id).error.type == "Timeout"


def test_timed_out_job_that_ignores_the_stop_keeps_its_slot_until_it_returns(
    make_engine, clock, registry, slow
):
    job_kind("t.next", registry=registry)(lambda ctx, p: "next")
    engine = make_engine(max_workers=1, clock=clock)
    job_id = engine.submit("t.slow", {"ignore": True}, timeout=2)
    assert slow.started.wait(WAIT)
    nxt = engine.submit("t.next")
    clock.advance(2)
    engine.check_timers()
    info = engine.get(job_id)
    assert info.state is S.RUNNING
    assert info.cancel_pending is True
    assert info.message.startswith("timed out after 2 s")
    assert engine.stats().busy_workers == 1
    assert engine.get(nxt).state is S.QUEUED
    slow.gate.set()
    finished(engine, job_id, nxt)
    info = engine.get(job_id)
    assert info.state is S.FAILED and info.error.type == "Timeout"
    assert info.result is None  # "late" is discarded
    assert info.partial_result == {"step": 4, "attempt": 1}
    assert engine.get(nxt).result == "next"


def test_timed_out_job_is_retried_when_max_retries_says_so(make_engine, clock, slow):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.slow", {"pass_on_attempt": 2}, timeout=5, max_retries=1)
    assert slow.started.wait(WAIT)
    clock.advance(5)
    engine.check_timers()
    wait_until(lambda: engine.get(job_id).state is S.QUEUED and engine.get(job_id).errors)
    info = engine.get(job_id)
    assert info.errors[0].type == "Timeout"
    assert "retrying in 1 s" in info.message
    clock.advance(1)
    engine.check_timers()
    finished(engine, job_id)
    info = engine.get(job_id)
    assert info.state is S.COMPLETED and info.result == "ok"
    assert info.attempt == 2
    assert [e.type for e in info.errors] == ["Timeout"]
    assert info.error is None  # a completed job shows no error, but keeps the history
    assert slow.calls == [1, 2]


def test_the_second_attempt_gets_a_fresh_timeout(make_engine, clock, slow):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.slow", timeout=3, max_retries=1)
    assert slow.started.wait(WAIT)
    slow.started.clear()
    clock.advance(3)
    engine.check_timers()
    wait_until(lambda: engine.get(job_id).state is S.QUEUED)
    clock.advance(1)  # backoff
    engine.check_timers()
    assert slow.started.wait(WAIT)
    wait_until(lambda: engine.get(job_id).state is S.RUNNING)
    clock.advance(2.75)
    engine.check_timers()
    assert engine.get(job_id).cancel_pending is False
    clock.advance(0.25)
    engine.check_timers()
    finished(engine, job_id)
    info = engine.get(job_id)
    assert info.state is S.FAILED
    assert [(e.type, e.attempt) for e in info.errors] == [("Timeout", 1), ("Timeout", 2)]


def test_cancel_wins_over_a_later_timeout(make_engine, clock, slow):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.slow", {"ignore": True}, timeout=1)
    assert slow.started.wait(WAIT)
    engine.cancel(job_id)
    clock.advance(10)
    engine.check_timers()
    slow.gate.set()
    finished(engine, job_id)
    info = engine.get(job_id)
    assert info.state is S.CANCELLED and info.errors == ()


# ---------------------------------------------------------------- retries and backoff


@pytest.fixture
def flaky(registry):
    """Kind ``t.flaky``: fails until attempt params["ok_on"] (default never)."""
    calls: list[int] = []

    def handler(ctx, params):
        calls.append(ctx.attempt)
        if ctx.attempt == params.get("ok_on"):
            return f"ok on {ctx.attempt}"
        raise RuntimeError(f"fail {ctx.attempt}")

    job_kind("t.flaky", registry=registry)(handler)
    job_kind("t.probe", registry=registry)(lambda ctx, p: "probe")
    return calls


def wait_attempt_failed(engine, job_id: str, n: int) -> None:
    wait_until(
        lambda: len(engine.get(job_id).errors) == n and engine.get(job_id).state is not S.RUNNING,
        what=f"attempt {n} to fail",
    )


def test_no_silent_retries_by_default(make_engine, flaky):
    engine = make_engine()
    job_id = engine.submit("t.flaky")
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is S.FAILED and info.max_retries == 0
    assert flaky == [1]


def test_max_retries_n_gives_n_plus_one_attempts_with_backoff(make_engine, clock, flaky):
    engine = make_engine(max_workers=1, clock=clock)
    job_id = engine.submit("t.flaky", max_retries=2)

    wait_attempt_failed(engine, job_id, 1)
    info = engine.get(job_id)
    assert info.state is S.QUEUED and info.attempt == 1
    assert info.message == "attempt 1 of 3 failed (RuntimeError: fail 1); retrying in 1 s"
    assert info.error.message == "fail 1"  # the last error shows while it waits
    # Not before the backoff: a probe job queued later runs first.
    clock.advance(0.5)
    assert engine.check_timers() == pytest.approx(0.5)
    probe = engine.submit("t.probe")
    finished(engine, probe)
    assert engine.get(job_id).state is S.QUEUED and flaky == [1]
    clock.advance(0.5)
    engine.check_timers()

    wait_attempt_failed(engine, job_id, 2)
    info = engine.get(job_id)
    assert info.attempt == 2
    assert info.message == "attempt 2 of 3 failed (RuntimeError: fail 2); retrying in 2 s"
    clock.advance(1.75)
    assert engine.check_timers() == pytest.approx(0.25)
    probe = engine.submit("t.probe")
    finished(engine, probe)
    assert flaky == [1, 2]
    clock.advance(0.25)
    engine.check_timers()

    finished(engine, job_id)
    info = engine.get(job_id)
    assert info.state is S.FAILED
    assert info.attempt == 3
    assert flaky == [1, 2, 3]
    assert [(e.attempt, e.message) for e in info.errors] == [
        (1, "fail 1"), (2, "fail 2"), (3, "fail 3")
    ]
    assert info.error == info.errors[-1]
    assert info.message == "RuntimeError: fail 3"
    assert engine.stats().failed == 1  # one job failed, not three


def test_backoff_doubles_and_is_capped_at_60_s(make_engine, clock, flaky):
    engine = make_engine(max_workers=1, clock=clock)
    job_id = engine.submit("t.flaky", max_retries=8)
    for attempt, delay in enumerate([1, 2, 4, 8, 16, 32, 60, 60], start=1):
        wait_attempt_failed(engine, job_id, attempt)
        info = engine.get(job_id)
        assert info.message.endswith(f"retrying in {delay} s"), info.message
        assert f"attempt {attempt} of 9" in info.message
        assert engine.check_timers() == pytest.approx(delay)
        clock.advance(delay)
        engine.check_timers()
    finished(engine, job_id)
    assert flaky == list(range(1, 10))
    assert engine.get(job_id).state is S.FAILED


def test_retry_succeeds_on_a_later_attempt(make_engine, clock, flaky):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.flaky", {"ok_on": 2}, max_retries=3)
    wait_attempt_failed(engine, job_id, 1)
    clock.advance(1)
    engine.check_timers()
    finished(engine, job_id)
    info = engine.get(job_id)
    assert info.state is S.COMPLETED and info.result == "ok on 2"
    assert info.attempt == 2 and info.max_retries == 3
    assert info.error is None and len(info.errors) == 1
    assert flaky == [1, 2]
    assert engine.stats().failed == 0


def test_the_attempt_counter_is_visible_while_running(make_engine, clock, registry):
    gates = {1: threading.Event(), 2: threading.Event()}
    started = {1: threading.Event(), 2: threading.Event()}
    seen = []

    def handler(ctx, params):
        seen.append(ctx.attempt)
        started[ctx.attempt].set()
        assert gates[ctx.attempt].wait(WAIT)
        if ctx.attempt == 1:
            raise RuntimeError("once")
        return "done"

    job_kind("t.twice", registry=registry)(handler)
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.twice", max_retries=1)
    assert started[1].wait(WAIT)
    assert engine.get(job_id).attempt == 1
    gates[1].set()
    wait_attempt_failed(engine, job_id, 1)
    clock.advance(1)
    engine.check_timers()
    assert started[2].wait(WAIT)
    info = engine.get(job_id)
    assert info.state is S.RUNNING and info.attempt == 2 and info.max_retries == 1
    assert len(info.errors) == 1
    gates[2].set()
    finished(engine, job_id)
    assert seen == [1, 2]


def test_cancel_during_backoff_cancels_at_once_and_keeps_the_errors(make_engine, clock, flaky):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.flaky", max_retries=5)
    wait_attempt_failed(engine, job_id, 1)
    assert engine.cancel(job_id) is True
    info = engine.get(job_id)
    assert info.state is S.CANCELLED
    assert len(info.errors) == 1
    clock.advance(100)
    engine.check_timers()
    probe = engine.submit("t.probe")
    finished(engine, probe)
    assert flaky == [1]  # never ran again


def test_a_backing_off_job_does_not_block_others(make_engine, clock, flaky):
    engine = make_engine(max_workers=1, clock=clock)
    job_id = engine.submit("t.flaky", max_retries=1, priority="urgent")
    wait_attempt_failed(engine, job_id, 1)
    probes = [engine.submit("t.probe", priority="low") for _ in range(3)]
    finished(engine, *probes)
    assert engine.get(job_id).state is S.QUEUED
    clock.advance(1)
    engine.check_timers()
    finished(engine, job_id)


def test_retry_of_a_failed_retrying_job_starts_a_fresh_count(make_engine, clock, flaky):
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.flaky", max_retries=1)
    wait_attempt_failed(engine, job_id, 1)
    clock.advance(1)
    engine.check_timers()
    finished(engine, job_id)
    again = engine.retry(job_id, {"ok_on": 1})
    finished(engine, again)
    info = engine.get(again)
    assert info.state is S.COMPLETED and info.attempt == 1 and info.errors == ()
    assert info.max_retries == 1


def test_a_job_back_from_backoff_runs_after_the_ready_heap_was_compacted(
    make_engine, clock, registry
):
    gate, started = threading.Event(), threading.Event()

    def handler(ctx, params):
        if params.get("x") and ctx.attempt == 1:
            started.set()
            assert gate.wait(WAIT)
            raise RuntimeError("x fails once")
        return "ok"

    job_kind("t.k", registry=registry)(handler)
    engine = make_engine(max_workers=1, clock=clock)
    x = engine.submit("t.k", {"x": True}, priority="low", max_retries=1)
    assert started.wait(WAIT)
    engine.pause()
    others = [engine.submit("t.k", priority="urgent") for _ in range(70)]
    gate.set()
    wait_attempt_failed(engine, x, 1)
    for job_id in others[:65]:
        engine.cancel(job_id)  # their heap entries go stale
    others.append(engine.submit("t.k", priority="urgent"))  # this push compacts the heap
    clock.advance(1)
    engine.check_timers()  # x's backoff is over
    engine.resume()
    finished(engine, *others[65:])
    # Same kind and band as x but queued after it: x must have run first.
    probe = engine.submit("t.k", priority="low")
    finished(engine, probe)
    assert engine.get(x).state is S.COMPLETED
