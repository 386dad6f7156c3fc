"""Job lifecycle: state sequences seen through drain_events, get/jobs snapshots, wait,
on_finished, history eviction, stats and shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from blender_taskqueue.engine import (
    EngineClosed,
    JobCancelled,
    JobInfo,
    JobNotFound,
    JobState,
    job_kind,
)

from support import FakeClock, FakeProbe, wait_until

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
S = JobState

HAPPY = ["submitted", "queued", "dispatched", "running"]


def state_sequences(events) -> dict[str, list[str]]:
    """job id -> the states its "state" events carried, in drain order."""
    out: dict[str, list[str]] = {}
    for ev in events:
        if ev.type == "state":
            assert ev.info is not None and ev.info.id == ev.job_id
            out.setdefault(ev.job_id, []).append(ev.info.state.value)
    return out


def join_engine_threads(timeout: float = WAIT) -> None:
    """Wait for worker threads that a test let run past shutdown (a stuck handler it released)."""
    for t in threading.enumerate():
        if t.name.startswith("taskqueue-") and t is not threading.current_thread():
            t.join(timeout)
            assert not t.is_alive(), f"{t.name} did not stop"


@pytest.fixture
def gated(registry):
    """Kind ``t.gate``: signals ``started[name]`` then waits for ``gates[name]``.

    params: {"name": str, "result": any, "ignore_stop": bool}. Unless ignore_stop,
    it raises JobCancelled when asked to stop while waiting.
    """

    class Gated:
        def __init__(self) -> None:
            self.started: dict[str, threading.Event] = {}
            self.gates: dict[str, threading.Event] = {}
            self.lock = threading.Lock()

        def _ev(self, table, name):
            with self.lock:
                return table.setdefault(name, threading.Event())

        def started_ev(self, name):
            return self._ev(self.started, name)

        def gate(self, name):
            return self._ev(self.gates, name)

        def wait_started(self, name) -> None:
            assert self.started_ev(name).wait(WAIT), f"job {name} did not start"

        def open(self, *names) -> None:
            for n in names:
                self.gate(n).set()

        def handler(self, ctx, params):
            name = params["name"]
            self.started_ev(name).set()
            gate = self.gate(name)
            deadline = time.monotonic() + WAIT
            while not gate.wait(0.005):
                if ctx.cancelled and not params.get("ignore_stop"):
                    ctx.raise_if_cancelled()
                if time.monotonic() > deadline:
                    raise AssertionError(f"gate {name} never opened")
            return params.get("result", name)

    g = Gated()
    job_kind("t.gate", registry=registry)(g.handler)
    job_kind("t.gate_resumable", resumable=True, registry=registry)(g.handler)
    return g


@pytest.fixture
def quick(registry):
    """Kind ``t.quick``: returns params.get("value"); ``t.fail`` raises RuntimeError(msg)."""

    def quick(ctx, params):
        return params.get("value")

    def fail(ctx, params):
        raise RuntimeError(params.get("msg", "boom"))

    job_kind("t.quick", registry=registry)(quick)
    job_kind("t.fail", registry=registry)(fail)


# ---------------------------------------------------------------- state sequences


def test_completed_job_state_sequence(make_engine, quick):
    engine = make_engine()
    job_id = engine.submit("t.quick", {"value": 1})
    assert engine.wait(job_id, timeout=WAIT)
    events = engine.drain_events()
    assert state_sequences(events) == {job_id: HAPPY + ["completed"]}
    final = [e for e in events if e.type == "state"][-1].info
    assert final.result == 1 and final.progress == 1.0


def test_state_events_carry_the_info_after_the_change(make_engine, quick):
    engine = make_engine()
    job_id = engine.submit("t.quick", {"value": 7})
    assert engine.wait(job_id, timeout=WAIT)
    infos = [e.info for e in engine.drain_events() if e.type == "state"]
    assert [i.attempt for i in infos] == [0, 0, 1, 1, 1]
    assert infos[0].started_at is None and infos[3].started_at is not None
    assert infos[3].finished_at is None and infos[4].finished_at is not None
    assert all(isinstance(i, JobInfo) for i in infos)


def test_failed_job_state_sequence(make_engine, quick):
    engine = make_engine()
    job_id = engine.submit("t.fail")
    assert engine.wait(job_id, timeout=WAIT)
    assert state_sequences(engine.drain_events()) == {job_id: HAPPY + ["failed"]}


def test_cancelled_queued_job_state_sequence(make_engine, quick):
    engine = make_engine()
    engine.pause()
    job_id = engine.submit("t.quick")
    assert engine.cancel(job_id) is True
    assert state_sequences(engine.drain_events()) == {
        job_id: ["submitted", "queued", "cancelled"]
    }


def test_cancelled_running_job_state_sequence(make_engine, gated):
    engine = make_engine()
    job_id = engine.submit("t.gate", {"name": "a"})
    gated.wait_started("a")
    assert engine.cancel(job_id) is True
    assert engine.wait(job_id, timeout=WAIT)
    assert state_sequences(engine.drain_events()) == {job_id: HAPPY + ["cancelled"]}


def test_retried_job_state_sequence(make_engine, registry):
    clock = FakeClock()
    calls = []

    def flaky(ctx, params):
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return "ok"

    job_kind("t.flaky", registry=registry)(flaky)
    engine = make_engine(clock=clock)
    job_id = engine.submit("t.flaky", max_retries=1)
    wait_until(lambda: engine.get(job_id).errors, what="first attempt failed")
    clock.advance(1.0)
    engine.check_timers()
    wait_until(lambda: engine.get(job_id).is_terminal, what="second attempt")
    assert calls == [1, 2]
    assert state_sequences(engine.drain_events()) == {
        job_id: HAPPY + ["queued", "dispatched", "running", "completed"]
    }


def test_held_then_released_state_sequence(make_engine, quick):
    engine = make_engine()
    job_id = engine.submit("t.quick", held=True)
    assert state_sequences(engine.drain_events()) == {job_id: ["submitted", "queued"]}
    assert engine.release(job_id) == 1
    assert engine.wait(job_id, timeout=WAIT)
    assert state_sequences(engine.drain_events()) == {
        job_id: ["dispatched", "running", "completed"]
    }


def test_state_events_of_several_jobs_keep_their_global_order(make_engine, gated, quick):
    engine = make_engine(max_workers=1)
    a = engine.submit("t.gate", {"name": "a"})
    gated.wait_started("a")
    b = engine.submit("t.quick")  # queued behind a
    gated.open("a")
    assert engine.wait([a, b], timeout=WAIT)
    order = [(e.job_id, e.info.state.value) for e in engine.drain_events() if e.type == "state"]
    assert order == [
        (a, "submitted"), (a, "queued"), (a, "dispatched"), (a, "running"),
        (b, "submitted"), (b, "queued"),
        (a, "completed"),
        (b, "dispatched"), (b, "running"), (b, "completed"),
    ]


def test_drain_empties_the_queue(make_engine, quick):
    engine = make_engine()
    job_id = engine.submit("t.quick")
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.drain_events()
    assert engine.drain_events() == []


def test_progress_is_coalesced_to_the_latest_per_job(make_engine, registry):
    first, finish = threading.Event(), threading.Event()
    reported_first, reported_second = threading.Event(), threading.Event()

    def worker(ctx, params):
        for i in range(1, 8):
            ctx.progress(i / 10, stage=f"s{i}")
        reported_first.set()
        assert first.wait(WAIT)
        ctx.progress(0.8)
        ctx.progress(0.9, message="almost")
        reported_second.set()
        assert finish.wait(WAIT)

    job_kind("t.steps", registry=registry)(worker)
    engine = make_engine(max_workers=2)
    job_id = engine.submit("t.steps")
    assert reported_first.wait(WAIT)
    events = engine.drain_events()
    progress = [e for e in events if e.type == "progress"]
    assert len(progress) == 1
    assert progress[0].job_id == job_id
    assert progress[0].info.progress == pytest.approx(0.7)
    assert progress[0].info.stage == "s7"
    assert state_sequences(events) == {job_id: HAPPY}

    first.set()
    assert reported_second.wait(WAIT)
    events = engine.drain_events()
    assert [e.type for e in events] == ["progress"]
    assert events[0].info.progress == pytest.approx(0.9)
    assert events[0].info.message == "almost"
    assert events[0].info.stage == "s7"

    finish.set()
    assert engine.wait(job_id, timeout=WAIT)
    events = engine.drain_events()
    assert [e.type for e in events] == ["state"]
    assert events[0].info.state is S.COMPLETED


def test_progress_of_two_jobs_gives_one_event_each(make_engine, registry):
    both = threading.Barrier(2, timeout=WAIT)
    done = threading.Event()

    def worker(ctx, params):
        for i in range(20):
            ctx.progress(i / 20)
        both.wait()
        assert done.wait(WAIT)

    job_kind("t.p", registry=registry)(worker)
    engine = make_engine(max_workers=2)
    a, b = engine.submit("t.p"), engine.submit("t.p")
    wait_until(lambda: all(engine.get(i).progress == pytest.approx(0.95) for i in (a, b)))
    progress = [e for e in engine.drain_events() if e.type == "progress"]
    assert sorted(e.job_id for e in progress) == sorted([a, b])
    assert all(e.info.progress == pytest.approx(0.95) for e in progress)
    done.set()
    assert engine.wait([a, b], timeout=WAIT)


def test_pause_and_resume_emit_engine_notices(make_engine):
    engine = make_engine()
    engine.drain_events()
    engine.pause()
    engine.pause()  # already paused: no second notice
    engine.resume()
    notices = [(e.type, e.job_id, e.message) for e in engine.drain_events()]
    assert notices == [("notice", None, "queue paused"), ("notice", None, "queue resumed")]


# ---------------------------------------------------------------- get / jobs


def test_get_unknown_id_raises_key_error(make_engine):
    engine = make_engine()
    with pytest.raises(KeyError) as err:
        engine.get("nope-1")
    assert isinstance(err.value, JobNotFound)
    assert "nope-1" in str(err.value)
    with pytest.raises(TypeError):
        engine.get(123)  # type: ignore[arg-type]


def test_get_returns_an_immutable_snapshot(make_engine, gated):
    engine = make_engine()
    job_id = engine.submit("t.gate", {"name": "a"})
    gated.wait_started("a")
    before = engine.get(job_id)
    gated.open("a")
    assert engine.wait(job_id, timeout=WAIT)
    assert before.state is S.RUNNING  # the old snapshot did not change
    assert engine.get(job_id).state is S.COMPLETED
    with pytest.raises(AttributeError):
        before.state = S.FAILED  # type: ignore[misc]


def test_jobs_order_running_then_queued_in_dispatch_order_then_finished_newest_first(
    make_engine, gated, quick
):
    engine = make_engine(max_workers=1)
    finished = []
    for i in range(3):
        finished.append(engine.submit("t.quick", {"value": i}))
        assert engine.wait(finished[-1], timeout=WAIT)
    running = engine.submit("t.gate", {"name": "r"})
    gated.wait_started("r")
    low = engine.submit("t.quick", priority="low")
    n1 = engine.submit("t.quick")
    urgent = engine.submit("t.quick", priority="urgent")
    n2 = engine.submit("t.quick", priority=5)
    held = engine.submit("t.quick", held=True)
    nine = engine.submit("t.quick", priority=9)
    high = engine.submit("t.quick", priority="high")

    queued = [urgent, high, n1, n2, held, low, nine]
    assert [j.id for j in engine.jobs()] == [running] + queued + finished[::-1]

    assert [j.id for j in engine.jobs(states="queued")] == queued
    assert [j.id for j in engine.jobs(states=S.QUEUED)] == queued
    assert [j.id for j in engine.jobs(states=["running", S.COMPLETED])] == (
        [running] + finished[::-1]
    )
    assert [j.id for j in engine.jobs(states=())] == []
    assert engine.jobs(states={"failed"}) == []
    for bad in ("bogus", ["queued", "nope"], 5):
        with pytest.raises(ValueError, match="states"):
            engine.jobs(states=bad)

    gated.open("r")
    engine.cancel(held)
    assert engine.wait(queued, timeout=WAIT)


def test_jobs_lists_several_running_jobs_first(make_engine, gated, quick):
    engine = make_engine(max_workers=2)
    a = engine.submit("t.gate", {"name": "a"})
    gated.wait_started("a")
    b = engine.submit("t.gate", {"name": "b"})
    gated.wait_started("b")
    q = engine.submit("t.quick")
    listed = [j.id for j in engine.jobs()]
    assert sorted(listed[:2]) == sorted([a, b]) and listed[2] == q
    gated.open("a", "b")
    assert engine.wait([a, b, q], timeout=WAIT)


# ---------------------------------------------------------------- wait


def test_wait_timeout_returns_false_then_true(make_engine, gated):
    engine = make_engine()
    job_id = engine.submit("t.gate", {"name": "a"})
    gated.wait_started("a")
    assert engine.wait(job_id, timeout=0.05) is False
    assert engine.wait([job_id], timeout=0) is False
    assert engine.get(job_id).state is S.RUNNING
    gated.open("a")
    assert engine.wait(job_id, timeout=WAIT) is True


def test_wait_unknown_id_raises_key_error(make_engine, quick):
    engine = make_engine()
    ok = engine.submit("t.quick")
    with pytest.raises(KeyError) as err:
        engine.wait([ok, "never-1"], timeout=1)
    assert "never-1" in str(err.value)
    with pytest.raises(TypeError):
        engine.wait([ok, 5], timeout=1)  # type: ignore[list-item]


def test_wait_treats_evicted_ids_as_finished(make_engine, quick):
    engine = make_engine(history_limit=0)
    job_id = engine.submit("t.quick")
    wait_until(lambda: engine.stats().completed == 1)
    with pytest.raises(KeyError, match="evicted"):
        engine.get(job_id)
    assert engine.wait(job_id, timeout=1) is True
    assert engine.wait([job_id, job_id], timeout=0) is True


def test_wait_none_waits_for_every_unfinished_job(make_engine, gated):
    engine = make_engine(max_workers=2)
    a = engine.submit("t.gate", {"name": "a"})
    b = engine.submit("t.gate", {"name": "b"})
    gated.wait_started("a")
    gated.wait_started("b")
    gated.open("a")
    assert engine.wait(timeout=0.05) is False  # b still runs
    gated.open("b")
    assert engine.wait(timeout=WAIT) is True
    assert {engine.get(a).state, engine.get(b).state} == {S.COMPLETED}


def test_wait_on_empty_list_or_finished_jobs_returns_at_once(make_engine, quick):
    engine = make_engine()
    assert engine.wait([], timeout=0) is True
    assert engine.wait(timeout=0) is True
    job_id = engine.submit("t.quick")
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.wait(job_id, timeout=0) is True


def test_wait_from_another_thread(make_engine, gated):
    engine = make_engine()
    job_id = engine.submit("t.gate", {"name": "a"})
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("r", engine.wait(job_id, WAIT)))
    waiter.start()
    gated.wait_started("a")
    gated.open("a")
    waiter.join(WAIT)
    assert result == {"r": True}


# ---------------------------------------------------------------- on_finished


def test_on_finished_on_main_runs_from_run_main_calls(make_engine, quick):
    engine = make_engine()
    calls = []
    engine.on_finished(lambda info: calls.append((info.id, info.state, threading.current_thread())))
    job_id = engine.submit("t.quick", {"value": 3})
    wait_until(lambda: engine.pending_main_calls == 1, what="callback queued for the main thread")
    assert calls == []  # not run on the worker
    assert engine.run_main_calls(1.0) == 1
    assert calls == [(job_id, S.COMPLETED, threading.main_thread())]
    assert engine.run_main_calls(1.0) == 0


def test_on_finished_on_main_runs_from_wait_on_the_main_thread(make_engine, registry, quick):
    """Job b can only finish if a's callback ran, and only wait() on the main thread runs it."""
    gate = threading.Event()
    calls = []

    def blocked(ctx, params):
        assert gate.wait(WAIT)

    job_kind("t.blocked", registry=registry)(blocked)
    engine = make_engine(max_workers=2)

    def callback(info):
        calls.append((info.id, threading.current_thread()))
        if info.kind == "t.quick":
            gate.set()

    engine.on_finished(callback)
    b = engine.submit("t.blocked")
    a = engine.submit("t.quick")
    assert threading.current_thread() is threading.main_thread()
    assert engine.wait(b, timeout=WAIT) is True
    assert (a, threading.main_thread()) in calls


def test_wait_on_main_thread_runs_the_callbacks_of_the_jobs_it_waited_for(make_engine, quick):
    engine = make_engine()
    returned = threading.Event()
    seen = []
    # A slow worker-thread callback (registered first) delays the queueing of the
    # main-thread one; wait() must still not return without running it.
    engine.on_finished(lambda info: returned.wait(WAIT), on_main=False)
    engine.on_finished(lambda info: seen.append(info.id))
    job_id = engine.submit("t.quick")
    try:
        assert engine.wait(job_id, timeout=WAIT)
        assert seen == [job_id]
    finally:
        returned.set()


def test_on_finished_off_main_runs_on_the_worker(make_engine, quick):
    engine = make_engine()
    done = threading.Event()
    calls = []

    def callback(info):
        calls.append((info.id, info.state, threading.current_thread().name))
        done.set()

    engine.on_finished(callback, on_main=False)
    job_id = engine.submit("t.fail")
    assert done.wait(WAIT)
    assert calls[0][:2] == (job_id, S.FAILED)
    assert calls[0][2].startswith("taskqueue-worker")
    assert engine.pending_main_calls == 0


def test_on_finished_sees_every_terminal_state_once(make_engine, gated, quick):
    engine = make_engine(max_workers=1)
    seen = []
    lock = threading.Lock()

    def callback(info):
        with lock:
            seen.append((info.id, info.state))

    engine.on_finished(callback, on_main=False)
    ok = engine.submit("t.quick")
    bad = engine.submit("t.fail")
    run = engine.submit("t.gate", {"name": "r"})
    gated.wait_started("r")
    queued = engine.submit("t.quick")
    engine.cancel(queued)
    engine.cancel(run)
    assert engine.wait([ok, bad, run, queued], timeout=WAIT)
    wait_until(lambda: len(seen) == 4)
    assert sorted(seen) == sorted(
        [(ok, S.COMPLETED), (bad, S.FAILED), (run, S.CANCELLED), (queued, S.CANCELLED)]
    )


def test_on_finished_unsubscribe(make_engine, quick):
    engine = make_engine(max_workers=1)
    seen, sentinel = [], []
    unsubscribe = engine.on_finished(lambda info: seen.append(info.id), on_main=False)
    # Registered later, so for any one job it runs after the first callback.
    engine.on_finished(lambda info: sentinel.append(info.id), on_main=False)
    a = engine.submit("t.quick")
    wait_until(lambda: sentinel == [a])
    assert seen == [a]
    unsubscribe()
    unsubscribe()  # twice is harmless
    b = engine.submit("t.quick")
    c = engine.submit("t.quick")
    wait_until(lambda: sentinel == [a, b, c])
    assert seen == [a]


def test_a_failing_callback_does_not_break_the_engine(make_engine, quick):
    engine = make_engine(max_workers=1)
    seen = []

    def bad(info):
        raise RuntimeError("callback bug")

    engine.on_finished(bad, on_main=False)
    engine.on_finished(lambda info: seen.append(info.id), on_main=False)
    engine.on_finished(bad)  # on main
    a = engine.submit("t.quick")
    b = engine.submit("t.quick")
    wait_until(lambda: len(seen) == 2 and engine.pending_main_calls == 2)
    assert seen == [a, b]
    assert engine.run_main_calls(1.0) == 2  # the failing main-thread callback is swallowed
    assert engine.get(b).state is S.COMPLETED


def test_on_finished_needs_a_callable(make_engine):
    engine = make_engine()
    with pytest.raises(TypeError, match="callable"):
        engine.on_finished(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- history, clear_finished


def test_history_limit_evicts_the_oldest_finished(make_engine, quick):
    engine = make_engine(max_workers=1, history_limit=2)
    ids = []
    for i in range(4):
        ids.append(engine.submit("t.quick", {"value": i}))
        assert engine.wait(ids[-1], timeout=WAIT)
    for gone in ids[:2]:
        with pytest.raises(KeyError) as err:
            engine.get(gone)
        assert isinstance(err.value, JobNotFound)
        assert "evicted" in str(err.value) and "history_limit=2" in str(err.value)
        with pytest.raises(KeyError):
            engine.retry(gone)
        with pytest.raises(KeyError):
            engine.cancel(gone)
    assert [j.id for j in engine.jobs()] == [ids[3], ids[2]]
    assert engine.stats().finished_kept == 2
    assert engine.stats().completed == 4  # counts are not forgotten


def test_history_limit_never_evicts_unfinished_jobs(make_engine, gated):
    engine = make_engine(max_workers=1, history_limit=0)
    run = engine.submit("t.gate", {"name": "r"})
    gated.wait_started("r")
    queued = engine.submit("t.gate", {"name": "q"})
    assert engine.get(run).state is S.RUNNING
    assert engine.get(queued).state is S.QUEUED
    gated.open("r", "q")
    assert engine.wait([run, queued], timeout=WAIT)
    assert engine.jobs() == []


def test_lowering_history_limit_evicts_at_once(make_engine, quick):
    engine = make_engine(max_workers=1)
    ids = [engine.submit("t.quick") for _ in range(3)]
    assert engine.wait(ids, timeout=WAIT)
    engine.configure(history_limit=1)
    assert [j.id for j in engine.jobs()] == [ids[2]]
    with pytest.raises(KeyError):
        engine.get(ids[0])


def test_clear_finished(make_engine, gated, quick):
    engine = make_engine(max_workers=1)
    done = [engine.submit("t.quick"), engine.submit("t.fail")]
    assert engine.wait(done, timeout=WAIT)
    run = engine.submit("t.gate", {"name": "r"})
    gated.wait_started("r")
    queued = engine.submit("t.quick")
    assert engine.clear_finished() == 2
    assert engine.clear_finished() == 0
    assert [j.id for j in engine.jobs()] == [run, queued]
    for gone in done:
        with pytest.raises(KeyError):
            engine.get(gone)
    assert engine.wait(done, timeout=0) is True  # cleared ids count as finished
    assert engine.stats().finished_kept == 0
    gated.open("r")
    assert engine.wait([run, queued], timeout=WAIT)


# ---------------------------------------------------------------- stats


def test_stats_counts(make_engine, gated, quick):
    clock = FakeClock()
    probe = FakeProbe(available=3000.25, process=512.04)
    engine = make_engine(max_workers=1, clock=clock, memory_probe=probe)
    ok = engine.submit("t.quick")
    bad = engine.submit("t.fail")
    wait_until(lambda: engine.get(ok).is_terminal and engine.get(bad).is_terminal)
    run = engine.submit("t.gate", {"name": "r"})
    gated.wait_started("r")
    q1 = engine.submit("t.quick")
    engine.submit("t.quick")
    engine.submit("t.quick", held=True)
    engine.cancel(q1)
    st = engine.stats()
    assert st.queued == 2  # a held job is a queued job
    assert st.held == 1
    assert (st.running, st.busy_workers, st.max_workers) == (1, 1, 1)
    assert (st.completed, st.failed, st.cancelled, st.interrupted) == (1, 1, 1, 0)
    assert st.finished_kept == 3
    assert st.throughput_per_min == 3.0
    assert st.waiting_for_memory == 0
    assert st.paused is False
    assert st.process_memory_mb == pytest.approx(512.0)
    assert st.available_memory_mb == pytest.approx(3000.2, abs=0.06)
    engine.pause()
    assert engine.stats().paused is True
    clock.advance(61)
    assert engine.stats().throughput_per_min == 0.0
    engine.resume()
    gated.open("r")
    wait_until(lambda: engine.get(run).is_terminal)
    wait_until(lambda: engine.stats().queued == 1)  # only the held one is left
    engine.release()
    wait_until(lambda: engine.stats().queued == 0 and engine.stats().running == 0)
    st = engine.stats()
    assert (st.completed, st.held, st.busy_workers) == (4, 0, 0)


# ---------------------------------------------------------------- shutdown


def test_shutdown_keeps_queued_jobs_queued(make_engine, gated):
    engine = make_engine(max_workers=1)
    run = engine.submit("t.gate", {"name": "r"})  # honours the stop request
    gated.wait_started("r")
    queued = [engine.submit("t.gate", {"name": f"q{i}"}) for i in range(3)]
    engine.shutdown(timeout=WAIT)
    info = engine.get(run)
    assert info.state is S.INTERRUPTED
    assert "shutdown" in info.message
    assert [engine.get(q).state for q in queued] == [S.QUEUED] * 3
    assert not any(gated.started_ev(f"q{i}").is_set() for i in range(3))
    assert engine.stats().interrupted == 1
    assert engine.is_running is False


def test_shutdown_interrupts_a_running_job_that_ignores_the_stop(make_engine, gated):
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.gate", {"name": "r", "ignore_stop": True})
    gated.wait_started("r")
    try:
        engine.shutdown(timeout=0.2)
        info = engine.get(job_id)
        assert info.state is S.INTERRUPTED
        assert "did not stop within 0.2 s" in info.message
        assert info.result is None
        assert engine.stats().running == 0
    finally:
        gated.open("r")
        join_engine_threads()
    # What it returned later is moot.
    info = engine.get(job_id)
    assert info.state is S.INTERRUPTED and info.result is None
    events = state_sequences(engine.drain_events())
    assert events[job_id] == HAPPY + ["interrupted"]


def test_shutdown_without_wait_interrupts_at_once(make_engine, gated):
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.gate", {"name": "r", "ignore_stop": True})
    gated.wait_started("r")
    try:
        engine.shutdown(wait=False)
        assert engine.get(job_id).state is S.INTERRUPTED
    finally:
        gated.open("r")
        join_engine_threads()


def test_shutdown_lets_a_job_that_finishes_in_time_complete(make_engine, gated):
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.gate", {"name": "r", "ignore_stop": True, "result": 42})
    gated.wait_started("r")
    closer = threading.Thread(target=engine.shutdown, kwargs={"timeout": WAIT})
    closer.start()
    wait_until(lambda: engine.get(job_id).cancel_pending, what="stop requested")
    gated.open("r")
    closer.join(WAIT)
    assert not closer.is_alive()
    info = engine.get(job_id)
    assert info.state is S.COMPLETED and info.result == 42


def test_shutdown_leaves_a_resumable_running_job_to_resume(make_engine, gated):
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.gate_resumable", {"name": "r", "ignore_stop": True})
    gated.wait_started("r")
    try:
        engine.shutdown(timeout=0.1)
        # Left as it was: the next start adopts and re-queues it from its checkpoint.
        assert engine.get(job_id).state is S.RUNNING
        assert engine.stats().interrupted == 0
    finally:
        gated.open("r")
        join_engine_threads()


def test_shutdown_requeues_a_resumable_job_that_stops(make_engine, gated):
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.gate_resumable", {"name": "r"})  # raises JobCancelled on stop
    gated.wait_started("r")
    engine.shutdown(timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is S.QUEUED
    assert "checkpoint" in info.message


def test_on_finished_hears_of_a_job_that_stopped_at_shutdown(make_engine, gated):
    engine = make_engine(max_workers=1)
    seen = []
    engine.on_finished(lambda info: seen.append((info.id, info.state)), on_main=False)
    job_id = engine.submit("t.gate", {"name": "r"})  # stops when asked
    gated.wait_started("r")
    engine.shutdown(timeout=WAIT)
    wait_until(lambda: seen, what="the callback")
    assert seen == [(job_id, S.INTERRUPTED)]


def test_on_finished_hears_of_a_job_interrupted_by_shutdown(make_engine, gated):
    engine = make_engine(max_workers=1)
    seen = []
    engine.on_finished(lambda info: seen.append((info.id, info.state)), on_main=False)
    job_id = engine.submit("t.gate", {"name": "r", "ignore_stop": True})
    gated.wait_started("r")
    try:
        engine.shutdown(timeout=0.1)
        assert seen == [(job_id, S.INTERRUPTED)]
    finally:
        gated.open("r")
        join_engine_threads()


def test_shutdown_of_a_never_started_engine(make_engine, quick):
    engine = make_engine(start=False)
    job_id = engine.submit("t.quick")
    engine.shutdown()
    assert engine.get(job_id).state is S.QUEUED
    with pytest.raises(EngineClosed):
        engine.start()


def test_shutdown_twice_and_submit_after(make_engine, quick):
    engine = make_engine()
    engine.shutdown()
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit("t.quick")


def test_engine_as_context_manager(make_engine, quick):
    engine = make_engine(start=False)
    with engine as e:
        assert e is engine and engine.is_running
        job_id = engine.submit("t.quick", {"value": 5})
        assert engine.wait(job_id, timeout=WAIT)
    assert engine.is_running is False
    assert engine.get(job_id).result == 5
    with pytest.raises(EngineClosed):
        engine.submit("t.quick")


def test_jobs_cancelled_while_waiting_raise_job_cancelled_inside(make_engine, registry):
    seen = []
    started = threading.Event()

    def worker(ctx, params):
        started.set()
        try:
            ctx.sleep(WAIT)
        except JobCancelled as exc:
            seen.append(str(exc))
            raise

    job_kind("t.sleep", registry=registry)(worker)
    engine = make_engine()
    job_id = engine.submit("t.sleep")
    assert started.wait(WAIT)
    engine.cancel(job_id)
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).state is S.CANCELLED
    assert seen and job_id in seen[0]


def test_order_version_moves_when_a_job_finishes(make_engine, registry) -> None:
    """A finished job leaves the running part of jobs() for history: a UI mirror that
    re-reads the order only when order_version moves must see that."""
    job_kind("t.order_version", registry=registry)(lambda ctx, p: None)
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.order_version")
    assert engine.wait([job_id], timeout=10)
    before = engine.order_version
    running = engine.submit("t.order_version")
    assert engine.wait([running], timeout=10)
    # submit, dispatch and finish each move it: the finish alone would be enough
    assert engine.order_version >= before + 3
    assert [i.id for i in engine.jobs()][:2] == [running, job_id]
