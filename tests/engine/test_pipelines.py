"""Pipelines: depends_on, results passed along in ctx.inputs, failures that
cascade, retry with dependents, batch references, not_before, and the graph
kept across export/import and restarts."""

from __future__ import annotations

import datetime
import threading
from typing import Any

import pytest

from blender_taskqueue.engine import InvalidParams, JobState, KindSpec
from blender_taskqueue.engine.models import parse_priority

from support import WAIT, wait_until

pytestmark = pytest.mark.timeout(60)

S = JobState


class WallClock:
    """The engine's wall clock, moved by the test."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def kinds(registry):
    """``t.step``: records its run and returns {"name", "got"} (its inputs);
    ``t.gate``: waits for the test's event; both fail when params say so."""
    ran: list[str] = []
    gates: dict[str, threading.Event] = {}

    def step(ctx, params):
        ran.append(params.get("name", ctx.job_id))
        if params.get("fail"):
            raise RuntimeError(f"step {params.get('name')} broke")
        return {"name": params.get("name"), "got": dict(ctx.inputs)}

    def gate(ctx, params):
        event = gates.setdefault(params["gate"], threading.Event())
        while not event.wait(0.01):
            ctx.check_cancelled()
        ran.append(params["gate"])
        if params.get("fail"):
            raise RuntimeError("gate failed")
        return params.get("value", params["gate"])

    def big(ctx, params):
        return {"blob": "x" * params["n"]}

    registry.register(KindSpec(name="t.step", handler=step))
    registry.register(KindSpec(name="t.gate", handler=gate))
    registry.register(KindSpec(name="t.big", handler=big))
    return ran, gates


def opened(gates: dict, name: str) -> None:
    gates.setdefault(name, threading.Event()).set()


# ---------------------------------------------------------------- running in order


def test_a_dependent_waits_visibly_and_gets_its_prerequisites_results(make_engine, kinds):
    ran, gates = kinds
    engine = make_engine(max_workers=4)
    a = engine.submit("t.gate", {"gate": "a", "value": {"frames": 3}})
    b = engine.submit("t.gate", {"gate": "b", "value": 7})
    c = engine.submit("t.step", {"name": "c"}, depends_on=[a, b])
    wait_until(lambda: engine.get(a).state is S.RUNNING and engine.get(b).state is S.RUNNING)
    info = engine.get(c)
    assert info.state is S.QUEUED and info.depends_on == (a, b) and info.waiting_for == (a, b)
    opened(gates, "b")
    wait_until(lambda: engine.get(b).state is S.COMPLETED)
    assert engine.get(c).waiting_for == (a,) and engine.get(c).state is S.QUEUED
    opened(gates, "a")
    assert engine.wait([c], timeout=WAIT)
    assert engine.get(c).result == {"name": "c", "got": {a: {"frames": 3}, b: 7}}
    assert ran == ["b", "a", "c"]


def test_a_prerequisite_that_already_completed_is_met_at_submit(make_engine, kinds):
    engine = make_engine()
    a = engine.submit("t.step", {"name": "a"})
    assert engine.wait([a], timeout=WAIT)
    b = engine.submit("t.step", {"name": "b"}, depends_on=a)
    assert engine.wait([b], timeout=WAIT)
    assert engine.get(b).result["got"] == {a: {"name": "a", "got": {}}}
    assert engine.get(b).waiting_for == ()


def test_submit_many_links_a_batch_by_name_atomically(make_engine, kinds):
    ran, _ = kinds
    engine = make_engine(max_workers=4)
    ids = engine.submit_many([
        {"kind": "t.step", "params": {"name": "merge"}, "depends_on": ["@left", "@right"]},
        {"kind": "t.step", "params": {"name": "left"}, "name": "left"},
        {"kind": "t.step", "params": {"name": "right"}, "name": "right", "depends_on": "@left"},
    ])
    assert engine.wait(ids, timeout=WAIT)
    merge, left, right = (engine.get(i) for i in ids)
    assert merge.depends_on == (left.id, right.id)
    assert ran.index("left") < ran.index("right") < ran.index("merge")
    assert merge.result["got"][right.id]["got"] == {left.id: {"name": "left", "got": {}}}


def test_pipeline_chains_steps_and_passes_each_result_on(make_engine, kinds):
    ran, _ = kinds
    engine = make_engine(max_workers=4)
    ids = engine.pipeline([("t.step", {"name": "render"}), ("t.step", {"name": "ai"}),
                           ("t.step", {"name": "load"}, {"label": "load it"})], priority="high")
    assert engine.wait(ids, timeout=WAIT)
    assert ran == ["render", "ai", "load"]
    infos = [engine.get(i) for i in ids]
    assert [i.depends_on for i in infos] == [(), (ids[0],), (ids[1],)]
    assert all(i.priority == parse_priority("high") for i in infos) and infos[2].label == "load it"
    assert infos[2].result["got"][ids[1]]["name"] == "ai"


# ---------------------------------------------------------------- failures cascade


def test_a_failed_prerequisite_fails_its_dependents_naming_it(make_engine, kinds):
    ran, _ = kinds
    engine = make_engine(max_workers=2)
    a, b, c = engine.pipeline([("t.step", {"name": "a", "fail": True}), ("t.step", {"name": "b"}),
                               ("t.step", {"name": "c"})])
    assert engine.wait([a, b, c], timeout=WAIT)
    assert ran == ["a"]
    b_info, c_info = engine.get(b), engine.get(c)
    assert b_info.state is S.FAILED and c_info.state is S.FAILED
    assert b_info.error.type == "DependencyFailed" and a in b_info.error.message
    assert "failed" in b_info.error.message
    assert c_info.error.type == "DependencyFailed" and a in c_info.error.message and b in c_info.error.message
    assert engine.dependents(a, failed_with=True) == [b, c]


def test_cancelling_a_prerequisite_fails_or_cancels_its_dependents(make_engine, kinds):
    _, gates = kinds
    engine = make_engine(max_workers=1)
    blocker = engine.submit("t.gate", {"gate": "x"})
    a, b, c = engine.pipeline(["t.step", "t.step", "t.step"])
    assert engine.dependents(a) == [b, c]
    engine.cancel(a)
    assert [engine.get(i).state for i in (a, b, c)] == [S.CANCELLED, S.FAILED, S.FAILED]
    d, e = engine.pipeline(["t.step", "t.step"])
    engine.cancel(d, with_dependents=True)
    assert [engine.get(i).state for i in (d, e)] == [S.CANCELLED, S.CANCELLED]
    assert d in engine.get(e).message
    opened(gates, "x")
    assert engine.wait([blocker], timeout=WAIT)


def test_a_running_prerequisite_cancelled_ends_its_dependents_when_it_stops(make_engine, kinds):
    engine = make_engine(max_workers=2)
    a = engine.submit("t.gate", {"gate": "never"})
    b = engine.submit("t.step", depends_on=[a])
    wait_until(lambda: engine.get(a).state is S.RUNNING)
    assert engine.cancel(a)
    assert engine.wait([a, b], timeout=WAIT)
    assert engine.get(a).state is S.CANCELLED
    assert engine.get(b).state is S.FAILED and "cancelled" in engine.get(b).error.message


def test_retry_with_dependents_requeues_the_chain_that_failed_with_it(make_engine, kinds):
    ran, _ = kinds
    engine = make_engine(max_workers=2)
    side = engine.submit("t.step", {"name": "side"})
    assert engine.wait([side], timeout=WAIT)
    a, b = engine.pipeline([("t.step", {"name": "a", "fail": True}), ("t.step", {"name": "b"})])
    c = engine.submit("t.step", {"name": "c"}, depends_on=[b, side])
    assert engine.wait([a, b, c], timeout=WAIT)
    with pytest.raises(InvalidParams, match=rf"{a}.*ended failed.*retry"):
        engine.retry(b)
    ran.clear()
    a2 = engine.retry(a, {"fail": False}, with_dependents=True)
    wait_until(lambda: len(ran) == 3, what="the retried chain ran")
    assert ran == ["a", "b", "c"]
    new = {engine.get(i).params.get("name"): engine.get(i) for i in
           [j.id for j in engine.jobs() if j.id not in (a, b, c, side)]}
    assert new["a"].id == a2
    assert new["b"].depends_on == (a2,)
    assert new["c"].depends_on == (new["b"].id, side)
    assert new["c"].result["got"][side] == {"name": "side", "got": {}}
    assert [engine.get(i).state for i in (a, b, c)] == [S.FAILED] * 3  # history is kept as it was


def test_a_retried_dependent_keeps_results_of_prerequisites_since_evicted(make_engine, kinds):
    engine = make_engine(history_limit=3)
    a = engine.submit("t.step", {"name": "a"})
    b = engine.submit("t.step", {"name": "b", "fail": True}, depends_on=a)
    assert engine.wait([a, b], timeout=WAIT)
    for n in range(2):  # push a (not b) out of history
        assert engine.wait([engine.submit("t.step", {"name": f"f{n}"})], timeout=WAIT)
    with pytest.raises(KeyError):
        engine.get(a)
    b2 = engine.retry(b, {"fail": False})
    assert engine.wait([b2], timeout=WAIT)
    assert engine.get(b2).result["got"] == {a: {"name": "a", "got": {}}}


# ---------------------------------------------------------------- refusals


def _unchanged(engine, before):
    assert [j.id for j in engine.jobs()] == before


@pytest.mark.parametrize(
    "depends_on, match",
    [
        (["nope-1"], r"unknown job id.*nope-1"),
        ("../etc", r"depends_on: .*job id"),
        ([7], r"entries must be job ids"),
        ({"a": 1}, r"a job id or a list of job ids"),
        (["@other"], r"reference to a job of a submit_many batch"),
        ([f"j-{n}" for n in range(1001)], r"at most 1000"),
    ],
)
def test_bad_depends_on_is_refused_naming_the_problem(make_engine, kinds, depends_on, match):
    engine = make_engine()
    before = [j.id for j in engine.jobs()]
    with pytest.raises(InvalidParams, match=match):
        engine.submit("t.step", depends_on=depends_on)
    _unchanged(engine, before)


def test_a_batch_with_a_cycle_or_a_bad_reference_queues_nothing(make_engine, kinds):
    engine = make_engine()
    with pytest.raises(InvalidParams, match=r"cycle: specs\[0\] -> specs\[1\] -> specs\[0\]"):
        engine.submit_many([
            {"kind": "t.step", "name": "a", "depends_on": "@b"},
            {"kind": "t.step", "name": "b", "depends_on": "@a"},
        ])
    with pytest.raises(InvalidParams, match=r"specs\[0\]: .*itself"):
        engine.submit_many([{"kind": "t.step", "name": "a", "depends_on": "@a"}])
    with pytest.raises(InvalidParams, match=r"specs\[1\]: depends_on: '@c' names no job.*@a"):
        engine.submit_many([{"kind": "t.step", "name": "a"}, {"kind": "t.step", "depends_on": "@c"}])
    with pytest.raises(InvalidParams, match=r"specs\[1\]: name 'a' is already used by specs\[0\]"):
        engine.submit_many([{"kind": "t.step", "name": "a"}, {"kind": "t.step", "name": "a"}])
    with pytest.raises(InvalidParams, match=r"specs\[0\]: name must be"):
        engine.submit_many([{"kind": "t.step", "name": "a b"}])
    assert engine.jobs() == [] and engine.drain_events() == []


def test_depending_on_a_job_that_ended_without_completing_is_refused(make_engine, kinds):
    engine = make_engine()
    a = engine.submit("t.step", {"fail": True})
    assert engine.wait([a], timeout=WAIT)
    with pytest.raises(InvalidParams, match=rf"job '{a}' ended failed, so this job could never run"):
        engine.submit("t.step", depends_on=[a])


# ---------------------------------------------------------------- not_before


def test_not_before_waits_for_its_wall_clock_time(make_engine, kinds):
    ran, _ = kinds
    wall = WallClock()
    engine = make_engine(wall_clock=wall)
    later = engine.submit("t.step", {"name": "later"}, not_before=3600)
    now = engine.submit("t.step", {"name": "now"},
                        not_before=datetime.datetime.fromtimestamp(wall.t - 60))
    assert engine.wait([now], timeout=WAIT)
    info = engine.get(later)
    assert info.state is S.QUEUED and info.not_before == wall.t + 3600
    engine.check_timers()
    assert engine.get(later).state is S.QUEUED and ran == ["now"]
    wall.t += 3600
    engine.check_timers()
    assert engine.wait([later], timeout=WAIT)
    assert ran == ["now", "later"]


def test_not_before_and_depends_on_both_hold(make_engine, kinds):
    ran, gates = kinds
    wall = WallClock()
    engine = make_engine(wall_clock=wall)
    a = engine.submit("t.gate", {"gate": "a"})
    b = engine.submit("t.step", {"name": "b"}, depends_on=a, not_before=10)
    wall.t += 20
    engine.check_timers()
    assert engine.get(b).state is S.QUEUED  # its time came, its prerequisite has not
    opened(gates, "a")
    assert engine.wait([b], timeout=WAIT)
    assert ran == ["a", "b"]


@pytest.mark.parametrize(
    "value, match",
    [
        (float("inf"), r"0 to .* from now"),
        (float("nan"), r"0 to .* from now"),
        (-5, r"0 to .* from now"),
        (2 * 366 * 86400, r"0 to .* from now"),
        ("tomorrow", r"datetime or a number of seconds"),
        (True, r"datetime or a number of seconds"),
        (datetime.datetime(3000, 1, 1), r"a year from now"),
    ],
)
def test_a_bad_not_before_is_refused_naming_it(make_engine, kinds, value, match):
    engine = make_engine()
    with pytest.raises((ValueError, TypeError), match=match):
        engine.submit("t.step", not_before=value)
    assert engine.jobs() == []


def test_a_cancelled_scheduled_job_leaves_no_timer_behind(make_engine, kinds):
    engine = make_engine()
    ids = [engine.submit("t.step", not_before=3600) for _ in range(200)]
    for job_id in ids:
        engine.cancel(job_id)
    assert len(engine._timers._wakes) < 100  # stale entries were dropped, not kept for an hour


# ---------------------------------------------------------------- persistence


def _document_roundtrip(make_engine, tmp_path, build):
    first = make_engine(state_dir=tmp_path / "state")
    build(first)
    document = first.export_state()
    first.shutdown()
    second = make_engine(state_dir=tmp_path / "state2", work_dir=tmp_path / "state" / "jobs")
    return first, second, document


def test_edges_results_and_times_survive_export_and_import(make_engine, kinds, tmp_path):
    ran, gates = kinds
    made: dict[str, Any] = {}

    def build(engine):
        made["a"] = engine.submit("t.step", {"name": "a"})
        assert engine.wait([made["a"]], timeout=WAIT)
        made["g"] = engine.submit("t.step", {"name": "g"}, held=True)
        made["b"] = engine.submit("t.step", {"name": "b"}, depends_on=[made["a"], made["g"]])
        made["t"] = engine.submit("t.step", {"name": "t"}, not_before=3600)

    _, second, document = _document_roundtrip(make_engine, tmp_path, build)
    entry = {j["id"]: j for j in document["jobs"]}[made["b"]]
    assert list(entry["depends_on"]) == [made["a"], made["g"]] and entry["waiting"] == [made["g"]]
    ran.clear()
    second.import_state(document, hold=False)
    b = second.get(made["b"])
    assert b.state is S.QUEUED and b.waiting_for == (made["g"],)
    t = second.get(made["t"])
    assert t.state is S.QUEUED and t.not_before is not None
    assert second.release([made["g"]]) == 1
    assert second.wait([made["b"]], timeout=WAIT)
    assert second.get(made["b"]).result["got"][made["a"]] == {"name": "a", "got": {}}
    assert "t" not in ran and "a" not in ran  # nothing finished ran again; t waits for its time


def test_a_big_result_passed_along_is_read_back_from_its_own_folder(make_engine, kinds, tmp_path):
    made: dict[str, Any] = {}

    def build(engine):
        made["a"] = engine.submit("t.big", {"n": 200_000})
        assert engine.wait([made["a"]], timeout=WAIT)
        made["b"] = engine.submit("t.step", {"name": "b"}, depends_on=[made["a"]], held=True)

    _, second, document = _document_roundtrip(make_engine, tmp_path, build)
    entry = {j["id"]: j for j in document["jobs"]}[made["b"]]
    assert set(entry["inputs"][made["a"]]) == {"$file", "bytes"}  # not inlined into the .blend
    second.import_state(document, hold=False)
    second.release([made["b"]])
    assert second.wait([made["b"]], timeout=WAIT)
    assert second.get(made["b"]).result["got"][made["a"]] == {"blob": "x" * 200_000}


def test_adopted_edges_to_failed_missing_or_cyclic_jobs_fail_visibly(make_engine, kinds, tmp_path):
    ran, _ = kinds
    engine = make_engine()
    base = {"app": "blender_taskqueue", "schema_version": 1, "closed": True, "written_at": 0,
            "owner": {"pid": 1, "host": "h", "started": 0, "token": "t"}}
    template = engine.export_state()
    base = {k: v for k, v in template.items() if k != "jobs"}

    def entry(job_id, state="queued", **extra):
        return {"id": job_id, "kind": "t.step", "params": {"name": job_id}, "priority": 5,
                "state": state, "created_at": 1.0, **extra}

    document = {**base, "jobs": [
        entry("p-bad", "failed"),
        entry("d-1", depends_on=["p-bad"], waiting=["p-bad"]),
        entry("d-2", depends_on=["gone-9"], waiting=["gone-9"]),
        entry("c-1", depends_on=["c-2"], waiting=["c-2"]),
        entry("c-2", depends_on=["c-1"], waiting=["c-1"]),
        entry("after-c", depends_on=["c-1"], waiting=["c-1"]),
        entry("ok", depends_on=["p-ok"], waiting=["p-ok"]),
        entry("p-ok", "completed", result={"v": 1}),
    ]}
    recovery = engine.import_state(document, hold=False)
    assert engine.wait(["ok"], timeout=WAIT)
    assert engine.get("ok").result["got"] == {"p-ok": {"v": 1}}
    for job_id, words in [("d-1", "p-bad"), ("d-2", "not in this queue"), ("c-1", "cycle"),
                          ("c-2", "cycle"), ("after-c", "c-1")]:
        info = engine.get(job_id)
        assert info.state is S.FAILED and info.error.type == "DependencyFailed", job_id
        assert words in info.error.message, (job_id, info.error.message)
    assert ran == ["ok"]
    assert any("d-2" in p for p in recovery.problems)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"depends_on": "a-1"}, "depends_on"),
        ({"depends_on": ["../x"]}, "depends_on"),
        ({"depends_on": ["e-1"]}, "the job itself"),
        ({"depends_on": ["a-1"], "waiting": ["b-1"]}, "not among depends_on"),
        ({"depends_on": ["a-1"], "inputs": {"z-1": 1}}, "inputs"),
        ({"not_before": 1e300}, "not_before"),
        ({"not_before": "soon"}, "not_before"),
        ({"root_cause": ["a-1"]}, "root_cause"),
    ],
)
def test_malformed_pipeline_fields_in_a_document_are_quarantined(make_engine, kinds, extra, match):
    engine = make_engine()
    base = {k: v for k, v in engine.export_state().items() if k != "jobs"}
    document = {**base, "jobs": [{"id": "e-1", "kind": "t.step", "params": {}, "priority": 5,
                                  "state": "queued", "created_at": 1.0, **extra}]}
    recovery = engine.import_state(document, hold=False)
    assert engine.jobs() == []
    assert any(match in p for p in recovery.problems), recovery.problems
