"""Steering the queue: dispatch order, limits, cancel, retry, move, pause/resume,
configure, release of held jobs, and memory admission."""

from __future__ import annotations

import threading

import pydantic
import pytest

from blender_taskqueue.engine import (
    InvalidParams,
    InvalidStateError,
    JobNotFound,
    JobState,
    UnknownKind,
    job_kind,
)

from support import FakeClock, FakeProbe, wait_until

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0
S = JobState


def queue_view(engine) -> tuple:
    jobs = [(j.id, j.state, j.priority, j.held) for j in engine.jobs()]
    return jobs, engine.stats().queued


def assert_unchanged(engine, before) -> None:
    assert queue_view(engine) == before
    assert [e for e in engine.drain_events() if e.type != "progress"] == []


class Recorder:
    """Kind ``t.rec``: records the order of execution and the peak concurrency.

    params: {"name": str, "gate": bool}. With gate=True the job signals that it
    started and waits until the test opens its gate (``open(name)``).
    """

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.order: list[str] = []
        self.active = 0
        self.peak = 0
        self.active_by_kind: dict[str, int] = {}
        self.peak_by_kind: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {}
        self.cancelled_seen: dict[str, bool] = {}

    def gate(self, name: str) -> threading.Event:
        with self.cv:
            return self.gates.setdefault(name, threading.Event())

    def open(self, *names: str) -> None:
        for n in names:
            self.gate(n).set()

    def open_all(self) -> None:
        with self.cv:
            gates = list(self.gates.values())
        for g in gates:
            g.set()

    def wait_started(self, n: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.order) >= n, WAIT), (
                f"expected {n} started, got {self.order}"
            )

    def handler(self, ctx, params):
        name = params.get("name", ctx.job_id)
        gate = self.gate(name) if params.get("gate") else None
        with self.cv:
            self.order.append(name)
            self.active += 1
            self.peak = max(self.peak, self.active)
            k = ctx.kind
            self.active_by_kind[k] = self.active_by_kind.get(k, 0) + 1
            self.peak_by_kind[k] = max(self.peak_by_kind.get(k, 0), self.active_by_kind[k])
            self.cv.notify_all()
        try:
            if gate is not None:
                assert gate.wait(WAIT), f"gate {name} never opened"
            self.cancelled_seen[name] = ctx.cancelled
            return params.get("result", name)
        finally:
            with self.cv:
                self.active -= 1
                self.active_by_kind[ctx.kind] -= 1
                self.cv.notify_all()


@pytest.fixture
def rec(registry):
    r = Recorder()
    job_kind("t.rec", registry=registry)(r.handler)
    job_kind("t.other", registry=registry)(r.handler)
    job_kind("t.gpu", max_concurrency=2, registry=registry)(r.handler)
    job_kind("t.solo", max_concurrency=1, registry=registry)(r.handler)
    yield r
    r.open_all()


# ---------------------------------------------------------------- dispatch order


@pytest.mark.timeout(30)
def test_priority_then_fifo_exact_order(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.pause()
    plan = [
        ("a", "low"), ("b", "normal"), ("c", 9), ("d", "urgent"), ("e", 0), ("f", "high"),
        ("g", 5), ("h", 3), ("i", 4), ("j", "normal"), ("k", 8), ("l", 1), ("m", "urgent"),
    ]
    for name, prio in plan:
        engine.submit("t.rec", {"name": name}, priority=prio)
    expected = ["d", "e", "m", "l", "f", "h", "i", "b", "g", "j", "a", "k", "c"]
    assert [j.params["name"] for j in engine.jobs()] == expected  # dispatch order, before running
    engine.resume()
    assert engine.wait(timeout=WAIT)
    assert rec.order == expected


def test_fifo_within_one_priority(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.pause()
    names = [f"n{i:02d}" for i in range(30)]
    for n in names:
        engine.submit("t.rec", {"name": n}, priority="high")
    engine.resume()
    assert engine.wait(timeout=WAIT)
    assert rec.order == names


def test_fifo_across_kinds_within_one_priority(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.pause()
    names = []
    for i in range(12):
        kind = ("t.rec", "t.other", "t.gpu")[i % 3]
        names.append(f"{kind}-{i}")
        engine.submit(kind, {"name": names[-1]})
    engine.resume()
    assert engine.wait(timeout=WAIT)
    assert rec.order == names


def test_urgent_job_goes_ahead_of_queued_ones_but_does_not_preempt(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.submit("t.rec", {"name": "running", "gate": True})
    rec.wait_started(1)
    for n in ("n1", "n2"):
        engine.submit("t.rec", {"name": n})
    engine.submit("t.rec", {"name": "late-urgent"}, priority="urgent")
    assert engine.get(engine.jobs()[0].id).state is S.RUNNING
    rec.open("running")
    assert engine.wait(timeout=WAIT)
    assert rec.order == ["running", "late-urgent", "n1", "n2"]


def test_max_workers_is_never_exceeded(make_engine, rec):
    engine = make_engine(max_workers=3)
    ids = [engine.submit("t.rec", {"name": f"j{i}", "gate": True}) for i in range(7)]
    rec.wait_started(3)
    st = engine.stats()
    assert (st.running, st.busy_workers, st.queued) == (3, 3, 4)
    assert [engine.get(i).state for i in ids[3:]] == [S.QUEUED] * 4
    for i in range(7):
        rec.open(f"j{i}")
    assert engine.wait(ids, timeout=WAIT)
    assert rec.peak == 3
    assert sorted(rec.order) == sorted(f"j{i}" for i in range(7))


def test_max_concurrency_per_kind(make_engine, rec):
    engine = make_engine(max_workers=4)
    gpu = [engine.submit("t.gpu", {"name": f"g{i}", "gate": True}) for i in range(5)]
    rec.wait_started(2)
    # Workers are free: a lower-priority job of another kind overtakes the waiting gpu jobs.
    other = engine.submit("t.rec", {"name": "cpu"}, priority="low")
    assert engine.wait(other, timeout=WAIT)
    assert [engine.get(g).state for g in gpu].count(S.RUNNING) == 2
    assert [engine.get(g).state for g in gpu[2:]] == [S.QUEUED] * 3
    assert engine.stats().running == 2
    # Never more than two at once, however fast the others could go.
    for i in range(5):
        rec.open(f"g{i}")
    assert engine.wait(gpu, timeout=WAIT)
    assert rec.peak_by_kind["t.gpu"] == 2
    assert rec.order[:2] == ["g0", "g1"] and rec.order[2] == "cpu"


def test_max_concurrency_one_serialises_a_kind(make_engine, rec):
    engine = make_engine(max_workers=4)
    ids = [engine.submit("t.solo", {"name": f"s{i}"}) for i in range(8)]
    ids += [engine.submit("t.rec", {"name": f"r{i}"}) for i in range(8)]
    assert engine.wait(ids, timeout=WAIT)
    assert rec.peak_by_kind["t.solo"] == 1
    assert [n for n in rec.order if n.startswith("s")] == [f"s{i}" for i in range(8)]


# ---------------------------------------------------------------- pause / resume


def test_pause_starts_nothing_new_and_running_jobs_go_on(make_engine, rec):
    engine = make_engine(max_workers=2)
    running = engine.submit("t.rec", {"name": "r", "gate": True})
    rec.wait_started(1)
    engine.pause()
    assert engine.paused and engine.stats().paused
    queued = engine.submit("t.rec", {"name": "q"})
    rec.open("r")
    assert engine.wait(running, timeout=WAIT)  # the running job finished while paused
    assert engine.wait(queued, timeout=0.1) is False
    assert engine.get(queued).state is S.QUEUED
    assert rec.order == ["r"]
    engine.resume()
    assert not engine.paused
    assert engine.wait(queued, timeout=WAIT)
    assert rec.order == ["r", "q"]


# ---------------------------------------------------------------- cancel


def test_cancel_queued_job_at_once(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.pause()
    a = engine.submit("t.rec", {"name": "a"})
    b = engine.submit("t.rec", {"name": "b"})
    assert engine.cancel(a) is True
    info = engine.get(a)  # no waiting: it is cancelled now
    assert info.state is S.CANCELLED
    assert info.finished_at is not None
    assert info.message == "cancelled before it ran"
    assert [j.id for j in engine.jobs(states="queued")] == [b]
    engine.resume()
    assert engine.wait(b, timeout=WAIT)
    assert rec.order == ["b"]  # a never ran


def test_cancel_running_job_asks_it_to_stop_and_discards_its_result(make_engine, rec):
    engine = make_engine(max_workers=1)
    job_id = engine.submit("t.rec", {"name": "r", "gate": True, "result": "kept?"})
    rec.wait_started(1)
    queued = engine.submit("t.rec", {"name": "next"})
    assert engine.cancel(job_id) is True
    info = engine.get(job_id)
    # Until the handler returns it keeps its slot and shows the pending cancellation.
    assert info.state is S.RUNNING and info.cancel_pending is True
    assert engine.stats().busy_workers == 1
    assert engine.wait(queued, timeout=0.05) is False
    assert engine.cancel(job_id) is True  # asking again is harmless
    rec.open("r")
    assert engine.wait([job_id, queued], timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is S.CANCELLED
    assert info.result is None  # what it returned after the request is discarded
    assert info.cancel_pending is False
    assert rec.cancelled_seen["r"] is True  # ctx.cancelled told the handler
    assert rec.order == ["r", "next"]


def test_cancel_finished_job_returns_false(make_engine, rec, registry):
    job_kind("t.boom", registry=registry)(lambda ctx, p: 1 / 0)
    engine = make_engine(max_workers=1)
    ok = engine.submit("t.rec", {"name": "ok"})
    bad = engine.submit("t.boom")
    engine.pause()
    gone = engine.submit("t.rec")
    engine.cancel(gone)
    engine.resume()
    assert engine.wait([ok, bad], timeout=WAIT)
    before = {i: engine.get(i) for i in (ok, bad, gone)}
    for job_id in (ok, bad, gone):
        assert engine.cancel(job_id) is False
        assert engine.get(job_id) == before[job_id]


def test_cancel_unknown_or_bad_id(make_engine, rec):
    engine = make_engine()
    engine.pause()
    engine.submit("t.rec")
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(KeyError) as err:
        engine.cancel("nope-7")
    assert isinstance(err.value, JobNotFound) and "nope-7" in str(err.value)
    with pytest.raises(TypeError):
        engine.cancel(7)  # type: ignore[arg-type]
    assert_unchanged(engine, before)


# ---------------------------------------------------------------- retry


class Shot(pydantic.BaseModel):
    frames: int
    name: str = "shot"


def test_retry_makes_a_new_job_with_merged_params(make_engine, registry):
    calls = []

    def handler(ctx, params: Shot):
        calls.append(params)
        if params.frames < 0:
            raise ValueError("negative frames")
        return params.frames

    job_kind("t.shot", params=Shot, registry=registry)(handler)
    engine = make_engine()
    old = engine.submit(
        "t.shot", {"frames": -1, "name": "A"}, priority="high", label="lbl",
        timeout=30, max_retries=0, memory_mb=8,
    )
    assert engine.wait(old, timeout=WAIT)
    assert engine.get(old).state is S.FAILED
    new = engine.retry(old, {"frames": 5})
    assert new != old
    assert engine.wait(new, timeout=WAIT)
    info = engine.get(new)
    assert info.state is S.COMPLETED and info.result == 5
    assert dict(info.params) == {"frames": 5, "name": "A"}
    assert (info.priority, info.label, info.timeout, info.max_retries, info.memory_mb) == (
        3, "lbl", 30.0, 0, 8
    )
    assert info.attempt == 1 and info.errors == ()
    # The old job is untouched.
    assert engine.get(old).state is S.FAILED
    assert dict(engine.get(old).params) == {"frames": -1, "name": "A"}


def test_retry_completed_and_cancelled_jobs(make_engine, rec):
    engine = make_engine(max_workers=1)
    done = engine.submit("t.rec", {"name": "d"})
    assert engine.wait(done, timeout=WAIT)
    engine.pause()
    cancelled = engine.submit("t.rec", {"name": "c"})
    engine.cancel(cancelled)
    engine.resume()
    again = [engine.retry(done), engine.retry(cancelled, {})]
    assert engine.wait(again, timeout=WAIT)
    assert rec.order == ["d", "d", "c"]


def test_retry_without_params_keeps_them(make_engine, rec):
    engine = make_engine()
    first = engine.submit("t.rec", {"name": "x", "result": [1, 2]})
    assert engine.wait(first, timeout=WAIT)
    second = engine.retry(first)
    assert engine.wait(second, timeout=WAIT)
    assert dict(engine.get(second).params) == dict(engine.get(first).params)
    assert engine.get(second).result == [1, 2]


def test_retry_of_unfinished_jobs_is_refused(make_engine, rec):
    engine = make_engine(max_workers=1)
    running = engine.submit("t.rec", {"name": "r", "gate": True})
    rec.wait_started(1)
    queued = engine.submit("t.rec", {"name": "q"})
    engine.drain_events()
    before = queue_view(engine)
    for job_id, state in ((running, "running"), (queued, "queued")):
        with pytest.raises(InvalidStateError) as err:
            engine.retry(job_id)
        assert job_id in str(err.value) and state in str(err.value)
        assert "finished" in str(err.value)
    assert_unchanged(engine, before)
    rec.open("r")
    assert engine.wait([running, queued], timeout=WAIT)


def test_retry_with_bad_params_is_refused(make_engine, registry):
    job_kind("t.shot", params=Shot, registry=registry)(lambda ctx, p: p.frames)
    engine = make_engine()
    old = engine.submit("t.shot", {"frames": 1})
    assert engine.wait(old, timeout=WAIT)
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(InvalidParams, match="frames"):
        engine.retry(old, {"frames": "lots"})
    with pytest.raises(InvalidParams, match="dict"):
        engine.retry(old, [("frames", 2)])  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        engine.retry("nope-1")
    assert_unchanged(engine, before)


def test_retry_of_a_python_call_runs_the_callable_again(make_engine):
    engine = make_engine()
    calls = []
    first = engine.run(lambda x: calls.append(x) or len(calls), "arg")
    assert engine.wait(first, timeout=WAIT)
    second = engine.retry(first)
    assert engine.wait(second, timeout=WAIT)
    assert calls == ["arg", "arg"]
    assert engine.get(second).result == 2
    with pytest.raises(InvalidParams):
        engine.retry(first, {"x": 1})


# ---------------------------------------------------------------- move


@pytest.fixture
def band(make_engine, rec):
    """A paused single-worker engine: H(high), A, B, C, D (normal), L(low)."""
    engine = make_engine(max_workers=1)
    engine.pause()
    ids = {}
    ids["H"] = engine.submit("t.rec", {"name": "H"}, priority="high")
    for n in "ABCD":
        ids[n] = engine.submit("t.rec", {"name": n})
    ids["L"] = engine.submit("t.rec", {"name": "L"}, priority="low")
    engine.drain_events()
    return engine, ids


def names(engine) -> str:
    return "".join(j.params["name"] for j in engine.jobs(states="queued"))


def test_move_top_and_bottom_stay_within_the_band(band, rec):
    engine, ids = band
    assert engine.move(ids["C"], "top") is True
    assert names(engine) == "HCABDL"
    assert engine.move(ids["A"], "bottom") is True
    assert names(engine) == "HCBDAL"
    assert engine.get(ids["C"]).priority == 5 and engine.get(ids["A"]).priority == 5
    engine.resume()
    assert engine.wait(list(ids.values()), timeout=WAIT)
    assert "".join(rec.order) == "HCBDAL"


def test_move_returns_false_when_already_there(band):
    engine, ids = band
    before = queue_view(engine)
    assert engine.move(ids["A"], "top") is False  # first of its band (H is another band)
    assert engine.move(ids["D"], "bottom") is False  # last of its band (L is another band)
    assert engine.move(ids["H"], "top") is False
    assert engine.move(ids["H"], "bottom") is False  # alone in its band
    assert engine.move(ids["L"], "top") is False
    assert_unchanged(engine, before)


def test_move_up_and_down_swap_with_the_neighbour(band, rec):
    engine, ids = band
    assert engine.move(ids["B"], "up") is True
    assert names(engine) == "HBACDL"
    assert engine.move(ids["B"], "down") is True
    assert names(engine) == "HABCDL"
    assert engine.move(ids["D"], "up") is True
    assert names(engine) == "HABDCL"
    assert engine.get(ids["D"]).priority == 5
    engine.resume()
    assert engine.wait(list(ids.values()), timeout=WAIT)
    assert "".join(rec.order) == "HABDCL"


def test_move_up_or_down_at_the_band_edge_is_a_no_op(band):
    engine, ids = band
    before = queue_view(engine)
    assert engine.move(ids["A"], "up") is False  # H above is another band
    assert engine.move(ids["D"], "down") is False  # L below is another band
    assert engine.move(ids["H"], "up") is False
    assert engine.move(ids["L"], "down") is False
    assert_unchanged(engine, before)


def test_move_to_top_while_the_bands_first_job_runs(make_engine, rec):
    engine = make_engine(max_workers=1)
    a = engine.submit("t.rec", {"name": "A", "gate": True})
    rec.wait_started(1)
    b = engine.submit("t.rec", {"name": "B"})
    c = engine.submit("t.rec", {"name": "C"})
    assert engine.move(c, "top") is True
    assert names(engine) == "CB"
    rec.open("A")
    assert engine.wait([a, b, c], timeout=WAIT)
    assert rec.order == ["A", "C", "B"]


SEQ_REUSE = (
    "engine bug: Scheduler.move('top'/'bottom') takes the new seq from the band's edge "
    "(edge - 1 / edge + 1) without reserving it, so a later submit (which takes "
    "next(_seq)) or a retry re-queue (which reuses the job's old seq) gets the same "
    "(priority, seq) key: two jobs share one key and the queue loses one of them"
)


def test_move_to_bottom_then_submit_keeps_every_job(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.pause()
    a = engine.submit("t.rec", {"name": "A"})
    b = engine.submit("t.rec", {"name": "B"})
    assert engine.move(a, "bottom") is True
    c = engine.submit("t.rec", {"name": "C"})
    assert [j.id for j in engine.jobs(states="queued")] == [b, a, c]
    engine.resume()
    assert engine.wait([a, b, c], timeout=WAIT)
    assert rec.order == ["B", "A", "C"]


def test_move_then_a_retry_requeue_keeps_every_job(make_engine, registry, rec):
    clock = FakeClock()
    gate, started = threading.Event(), threading.Event()

    def flaky(ctx, params):
        if ctx.attempt == 1:
            started.set()
            assert gate.wait(WAIT)
            raise RuntimeError("first attempt fails")
        return "ok"

    job_kind("t.flaky", registry=registry)(flaky)
    engine = make_engine(max_workers=1, clock=clock)
    a = engine.submit("t.flaky", max_retries=1)
    assert started.wait(WAIT)
    b = engine.submit("t.rec", {"name": "B"})
    c = engine.submit("t.rec", {"name": "C"})
    engine.pause()
    # C takes seq B.seq - 1, which is the seq of the running job a.
    assert engine.move(c, "top") is True
    gate.set()
    wait_until(lambda: engine.get(a).state is S.QUEUED, what="a re-queued for its retry")
    assert sorted(j.id for j in engine.jobs(states="queued")) == sorted([a, b, c])
    clock.advance(1.0)
    engine.check_timers()
    engine.resume()
    wait_until(lambda: all(engine.get(i).is_terminal for i in (a, b, c)), what="all finished")
    assert sorted(rec.order) == ["B", "C"]


def test_move_keeps_priority_and_refuses_bad_where(band):
    engine, ids = band
    before = queue_view(engine)
    for where in ("first", "TOP", "", None, 1, "up "):
        with pytest.raises(ValueError) as err:
            engine.move(ids["B"], where)  # type: ignore[arg-type]
        assert "where" in str(err.value) and "'top'" in str(err.value)
    assert_unchanged(engine, before)


def test_move_of_running_or_finished_job_is_refused(make_engine, rec):
    engine = make_engine(max_workers=1)
    done = engine.submit("t.rec", {"name": "done"})
    assert engine.wait(done, timeout=WAIT)
    running = engine.submit("t.rec", {"name": "r", "gate": True})
    rec.wait_started(2)
    queued = engine.submit("t.rec", {"name": "q"})
    engine.drain_events()
    before = queue_view(engine)
    for job_id, state in ((running, "running"), (done, "completed")):
        for where in ("top", "down"):
            with pytest.raises(InvalidStateError) as err:
                engine.move(job_id, where)
            assert state in str(err.value) and "queued" in str(err.value)
    with pytest.raises(KeyError):
        engine.move("nope-1", "top")
    assert_unchanged(engine, before)
    rec.open("r")
    assert engine.wait([running, queued], timeout=WAIT)


# ---------------------------------------------------------------- held jobs, release


def test_held_job_is_not_dispatched_until_released(make_engine, rec):
    engine = make_engine(max_workers=1)
    held = engine.submit("t.rec", {"name": "held"}, held=True, priority="urgent")
    other = engine.submit("t.rec", {"name": "other"}, priority="low")
    assert engine.wait(other, timeout=WAIT)  # the lower-priority job ran past it
    info = engine.get(held)
    assert info.state is S.QUEUED and info.held is True
    assert engine.stats().held == 1
    assert rec.order == ["other"]
    assert engine.release(held) == 1
    assert engine.get(held).held is False
    assert engine.wait(held, timeout=WAIT)
    assert rec.order == ["other", "held"]
    assert engine.stats().held == 0


def test_release_all_and_release_of_non_held(make_engine, rec):
    engine = make_engine(max_workers=1)
    engine.pause()
    held = [engine.submit("t.rec", {"name": f"h{i}"}, held=True) for i in range(3)]
    free = engine.submit("t.rec", {"name": "free"})
    assert engine.release(free) == 0  # queued but not held: nothing to do
    assert engine.release([held[0]]) == 1
    assert engine.release(held[0]) == 0
    assert engine.release() == 2
    assert engine.release() == 0
    engine.resume()
    assert engine.wait(held + [free], timeout=WAIT)
    assert rec.order == ["h0", "h1", "h2", "free"]


def test_release_refusals_change_nothing(make_engine, rec):
    engine = make_engine(max_workers=1)
    running = engine.submit("t.rec", {"name": "r", "gate": True})
    rec.wait_started(1)
    held = engine.submit("t.rec", {"name": "h"}, held=True)
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(InvalidStateError, match="running"):
        engine.release([held, running])  # all or nothing: held stays held
    with pytest.raises(KeyError):
        engine.release([held, "nope-1"])
    with pytest.raises(TypeError):
        engine.release(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        engine.release([held, 5])  # type: ignore[list-item]
    assert engine.get(held).held is True
    assert_unchanged(engine, before)
    rec.open("r")
    engine.cancel(held)
    assert engine.wait(running, timeout=WAIT)


def test_release_of_a_job_whose_kind_is_gone(make_engine, registry, rec):
    engine = make_engine(max_workers=1)
    job_kind("t.temp", registry=registry)(rec.handler)
    held = engine.submit("t.temp", {"name": "tmp"}, held=True)
    registry.unregister("t.temp")
    with pytest.raises(UnknownKind, match="t.temp"):
        engine.release(held)
    assert engine.get(held).held is True
    assert engine.release() == 0  # release-all skips it
    assert engine.get(held).held is True
    job_kind("t.temp", registry=registry)(rec.handler)
    assert engine.release(held) == 1
    assert engine.wait(held, timeout=WAIT)


def test_cancel_held_job(make_engine, rec):
    engine = make_engine()
    held = engine.submit("t.rec", held=True)
    assert engine.cancel(held) is True
    assert engine.get(held).state is S.CANCELLED
    assert engine.stats().held == 0


# ---------------------------------------------------------------- configure


def worker_threads() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("taskqueue-worker")}


def test_configure_max_workers_live(make_engine, rec):
    before_threads = worker_threads()
    engine = make_engine(max_workers=1)
    ids = [engine.submit("t.rec", {"name": f"j{i}", "gate": True}) for i in range(3)]
    rec.wait_started(1)
    assert engine.stats().running == 1
    cfg = engine.configure(max_workers=3)
    assert cfg.max_workers == 3 and engine.config.max_workers == 3
    rec.wait_started(3)  # the other two start without anything else happening
    assert engine.stats().running == 3

    engine.configure(max_workers=1)
    assert engine.stats().max_workers == 1
    more = [engine.submit("t.rec", {"name": f"k{i}", "gate": True}) for i in range(3)]
    rec.open("j0", "j1", "j2")
    wait_until(lambda: all(engine.get(i).is_terminal for i in ids))
    with rec.cv:
        rec.peak = rec.active  # from here on, at most one at a time
    for i in range(3):
        rec.wait_started(4 + i)
        rec.open(f"k{i}")
    assert engine.wait(more, timeout=WAIT)
    assert rec.peak == 1
    assert rec.order[3:] == ["k0", "k1", "k2"]
    wait_until(lambda: len(worker_threads() - before_threads) == 1, what="surplus workers to exit")


def test_configure_refuses_bad_changes_and_changes_nothing(make_engine, rec):
    engine = make_engine(max_workers=2)
    config = engine.config
    for changes, word in [
        ({"max_workers": 0}, "max_workers"),
        ({"max_workers": 9}, "max_workers"),
        ({"max_workers": "many"}, "max_workers"),
        ({"max_queued": 0}, "max_queued"),
        ({"history_limit": -1}, "history_limit"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"bogus": 1}, "bogus"),
        ({"max_workers": 3, "bogus": 1}, "bogus"),  # one bad field spoils the whole change
    ]:
        with pytest.raises(ValueError) as err:
            engine.configure(**changes)
        assert isinstance(err.value, pydantic.ValidationError)
        assert word in str(err.value)
        assert engine.config is config
    ids = [engine.submit("t.rec", {"gate": True, "name": f"j{i}"}) for i in range(4)]
    rec.wait_started(2)
    assert engine.stats().running == 2 and engine.stats().max_workers == 2
    for i in range(4):
        rec.open(f"j{i}")
    assert engine.wait(ids, timeout=WAIT)
    assert rec.peak == 2


def test_configure_state_dir_while_running_is_refused(make_engine, tmp_path):
    engine = make_engine()
    config = engine.config
    with pytest.raises(ValueError, match="state_dir"):
        engine.configure(state_dir=tmp_path / "elsewhere")
    assert engine.config is config


def test_configure_max_queued_live(make_engine, rec):
    engine = make_engine()
    engine.pause()
    engine.submit("t.rec")
    engine.configure(max_queued=1)
    from blender_taskqueue.engine import QueueFull

    with pytest.raises(QueueFull):
        engine.submit("t.rec")
    engine.configure(max_queued=2)
    engine.submit("t.rec")


# ---------------------------------------------------------------- memory admission


def test_job_waits_visibly_for_free_memory(make_engine, rec):
    probe = FakeProbe(available=100)
    engine = make_engine(max_workers=2, min_free_memory_mb=500, memory_probe=probe)
    job_id = engine.submit("t.rec", {"name": "m"})
    wait_until(lambda: (engine.get(job_id).message or "").startswith("waiting for memory"))
    info = engine.get(job_id)
    assert info.state is S.QUEUED
    assert "min_free_memory_mb=500" in info.message
    assert engine.stats().waiting_for_memory == 1
    assert rec.order == []
    probe.available = 2000
    engine.check_timers()
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is S.COMPLETED
    assert not (info.message or "").startswith("waiting for memory")
    assert engine.stats().waiting_for_memory == 0


def test_job_waits_while_the_process_uses_too_much(make_engine, rec):
    probe = FakeProbe(available=10_000, process=900)
    engine = make_engine(max_memory_mb=1000, memory_probe=probe)
    job_id = engine.submit("t.rec", {"name": "m"}, memory_mb=200)
    wait_until(lambda: (engine.get(job_id).message or "").startswith("waiting for memory"))
    msg = engine.get(job_id).message
    assert "max_memory_mb=1000" in msg and "200 MB" in msg
    probe.process = 700  # 700 + 200 fits under 1000
    engine.check_timers()
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).state is S.COMPLETED


def test_per_job_memory_is_reserved_while_it_runs(make_engine, rec):
    probe = FakeProbe(available=1000)
    engine = make_engine(max_workers=2, memory_probe=probe)
    big1 = engine.submit("t.rec", {"name": "big1", "gate": True}, memory_mb=600)
    rec.wait_started(1)
    big2 = engine.submit("t.rec", {"name": "big2"}, memory_mb=600)
    wait_until(lambda: (engine.get(big2).message or "").startswith("waiting for memory"))
    assert "needs 600 MB" in engine.get(big2).message
    assert engine.get(big2).state is S.QUEUED
    rec.open("big1")  # its reservation is given back when it finishes
    engine.check_timers()
    assert engine.wait([big1, big2], timeout=WAIT)
    assert rec.order == ["big1", "big2"]
    assert rec.peak == 1


def test_out_of_process_memory_counts_against_free_memory_not_blenders_limit(make_engine, registry, rec):
    """A kind whose work runs in child processes (a background render) needs the
    machine's free memory, not room under Blender's own limit: a 3 GB render is
    accepted and runs under a 1 GB max_memory_mb, yet two of them never fit in 4 GB."""
    job_kind("t.child", out_of_process=True, registry=registry)(rec.handler)
    probe = FakeProbe(available=4000, process=900)
    engine = make_engine(max_workers=2, max_memory_mb=1000, memory_probe=probe)
    with pytest.raises(ValueError, match="exceeds max_memory_mb"):
        engine.submit("t.rec", {"name": "inside"}, memory_mb=3000)
    first = engine.submit("t.child", {"name": "child1", "gate": True}, memory_mb=3000)
    rec.wait_started(1)
    second = engine.submit("t.child", {"name": "child2"}, memory_mb=3000)
    wait_until(lambda: (engine.get(second).message or "").startswith("waiting for memory"))
    assert "needs 3000 MB" in engine.get(second).message
    assert "max_memory_mb" not in engine.get(second).message
    # An in-process job of 50 MB still fits under Blender's limit: the children's
    # 3 GB are not counted there (900 + 50 < 1000), only against free memory.
    small = engine.submit("t.rec", {"name": "small"}, memory_mb=50, priority="high")
    probe.available = 10_000
    engine.check_timers()
    assert engine.wait([small], timeout=WAIT)
    rec.open("child1")
    assert engine.wait([first, second], timeout=WAIT)
    assert [engine.get(j).state for j in (first, second, small)] == [S.COMPLETED] * 3
    admission = engine._admission
    assert admission.reserved_mb == admission.reserved_inside_mb == 0 and not admission.reservations


def test_cancel_a_job_waiting_for_memory(make_engine, rec):
    probe = FakeProbe(available=100)
    engine = make_engine(memory_probe=probe)
    job_id = engine.submit("t.rec", memory_mb=500)
    wait_until(lambda: engine.stats().waiting_for_memory == 1)
    assert engine.cancel(job_id) is True
    assert engine.stats().waiting_for_memory == 0
    small = engine.submit("t.rec", {"name": "small"})
    assert engine.wait(small, timeout=WAIT)


def test_cancelling_the_job_waiting_for_memory_lets_the_next_one_run(make_engine, rec):
    probe = FakeProbe(available=100)
    engine = make_engine(max_workers=1, memory_probe=probe)
    engine.pause()
    big = engine.submit("t.rec", {"name": "big"}, memory_mb=500)
    small = engine.submit("t.rec", {"name": "small"})  # fits, but queued behind big
    engine.resume()
    # The one worker found big blocked and went idle in the same lock hold.
    wait_until(lambda: engine.stats().waiting_for_memory == 1)
    assert engine.cancel(big) is True
    assert engine.wait(small, timeout=1.5) is True
    assert rec.order == ["small"]


def test_lifting_the_memory_limit_lets_the_job_run_and_clears_the_wait(make_engine, rec):
    probe = FakeProbe(available=100)
    engine = make_engine(min_free_memory_mb=500, memory_probe=probe)
    job_id = engine.submit("t.rec", {"name": "m"})
    wait_until(lambda: engine.stats().waiting_for_memory == 1)
    engine.configure(min_free_memory_mb=None)
    assert engine.wait(job_id, timeout=WAIT)
    assert rec.order == ["m"]
    assert not (engine.get(job_id).message or "").startswith("waiting for memory")
    assert engine.stats().waiting_for_memory == 0
    assert engine.check_timers() is None  # nothing left to re-check
