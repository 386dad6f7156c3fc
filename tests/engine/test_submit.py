"""Engine.submit, submit_many and run: what goes in, and every bad input refused cleanly.

Every refusal test checks two things: the error names the problem, and nothing
changed (same queue, same counts, no event emitted).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pydantic
import pytest

from blender_taskqueue.engine import (
    PYTHON_CALL,
    EngineClosed,
    EngineConfig,
    InvalidParams,
    JobState,
    KindSpec,
    QueueFull,
    UnknownKind,
    current_context,
    job_kind,
)


pytestmark = pytest.mark.timeout(30)

WAIT = 10.0


def queue_view(engine) -> tuple:
    """Everything a refused call must leave untouched."""
    jobs = [(j.id, j.state, j.priority, j.held, dict(j.params)) for j in engine.jobs()]
    return jobs, engine.stats().queued


def assert_unchanged(engine, before) -> None:
    assert queue_view(engine) == before
    assert engine.drain_events() == [], "a refused call must not emit events"


class Render(pydantic.BaseModel):
    frames: int
    quality: str = "draft"


@pytest.fixture
def kinds(registry):
    """A plain kind ``t.echo`` (returns its params) and a model kind ``t.render``."""
    seen: list[Any] = []

    def echo(ctx, params):
        seen.append(params)
        return dict(params)

    def render(ctx, params: Render):
        seen.append(params)
        return {"frames": params.frames, "quality": params.quality}

    job_kind("t.echo", registry=registry)(echo)
    job_kind("t.render", params=Render, registry=registry)(render)
    return seen


@pytest.fixture
def paused(make_engine, kinds):
    """A paused engine with two queued jobs, so refusals have a queue to leave alone."""
    engine = make_engine(max_workers=1)
    engine.pause()
    engine.submit("t.echo", {"n": 1})
    engine.submit("t.render", {"frames": 3}, priority="high")
    engine.drain_events()
    return engine


# ---------------------------------------------------------------- submit: the good path


def test_submit_returns_id_at_once_and_job_completes(make_engine, kinds):
    engine = make_engine(max_workers=2)
    job_id = engine.submit("t.echo", {"a": 1, "b": [1, 2]})
    assert isinstance(job_id, str) and job_id
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.id == job_id
    assert info.kind == "t.echo"
    assert info.label == "t.echo"  # the label defaults to the kind name
    assert info.state is JobState.COMPLETED
    assert info.result == {"a": 1, "b": [1, 2]}
    assert info.progress == 1.0
    assert info.eta_seconds == 0
    assert info.attempt == 1
    assert info.max_retries == 0
    assert info.error is None and info.errors == ()
    assert info.held is False
    assert info.created_at <= info.started_at <= info.finished_at
    assert info.is_terminal


def test_submit_ids_are_unique(make_engine, kinds):
    engine = make_engine()
    engine.pause()
    ids = [engine.submit("t.echo") for _ in range(50)]
    assert len(set(ids)) == 50


def test_handler_without_model_gets_plain_dict_and_info_params_is_json(make_engine, kinds):
    engine = make_engine()
    job_id = engine.submit("t.echo", {"x": (1, 2), "y": None}, label="my echo")
    assert engine.wait(job_id, timeout=WAIT)
    assert kinds == [{"x": [1, 2], "y": None}]  # a tuple is stored as the JSON list
    assert type(kinds[0]) is dict
    info = engine.get(job_id)
    assert info.label == "my echo"
    assert dict(info.params) == {"x": [1, 2], "y": None}
    with pytest.raises(TypeError):
        info.params["x"] = 5  # type: ignore[index]  # snapshots are immutable


def test_submit_copies_params(make_engine, kinds):
    engine = make_engine()
    engine.pause()
    params = {"items": [1, 2]}
    job_id = engine.submit("t.echo", params)
    params["items"].append(3)
    params["new"] = True
    assert dict(engine.get(job_id).params) == {"items": [1, 2]}


def test_params_none_means_empty_dict(make_engine, kinds):
    engine = make_engine()
    job_id = engine.submit("t.echo")
    assert engine.wait(job_id, timeout=WAIT)
    assert kinds == [{}]
    assert dict(engine.get(job_id).params) == {}


def test_model_kind_validates_and_handler_gets_model(make_engine, kinds):
    engine = make_engine()
    a = engine.submit("t.render", {"frames": "12"})  # lax pydantic coercion
    b = engine.submit("t.render", Render(frames=4, quality="final"))
    assert engine.wait([a, b], timeout=WAIT)
    assert all(isinstance(p, Render) for p in kinds)
    # JobInfo.params is always the JSON dict, defaults filled in.
    assert dict(engine.get(a).params) == {"frames": 12, "quality": "draft"}
    assert dict(engine.get(b).params) == {"frames": 4, "quality": "final"}
    assert engine.get(a).result == {"frames": 12, "quality": "draft"}


@pytest.mark.parametrize(
    "name, value", [("urgent", 0), ("high", 3), ("normal", 5), ("low", 8)]
)
def test_priority_names(paused, name, value):
    job_id = paused.submit("t.echo", priority=name)
    assert paused.get(job_id).priority == value


@pytest.mark.parametrize("value", list(range(10)))
def test_priority_ints(paused, value):
    assert paused.get(paused.submit("t.echo", priority=value)).priority == value


def test_default_priority_is_normal(paused):
    assert paused.get(paused.submit("t.echo")).priority == 5


def test_submit_options_are_recorded(paused):
    job_id = paused.submit("t.echo", timeout=2.5, max_retries=3, memory_mb=64, label="L")
    info = paused.get(job_id)
    assert (info.timeout, info.max_retries, info.memory_mb, info.label) == (2.5, 3, 64, "L")


def test_submit_before_start_waits_for_start(make_engine, kinds):
    engine = make_engine(start=False)
    job_id = engine.submit("t.echo", {"n": 1})
    assert engine.get(job_id).state is JobState.QUEUED
    assert kinds == []
    engine.start()
    assert engine.start() is engine  # idempotent
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).state is JobState.COMPLETED


# ---------------------------------------------------------------- submit: refusals


def test_unknown_kind(paused):
    before = queue_view(paused)
    with pytest.raises(UnknownKind) as err:
        paused.submit("t.nope", {"a": 1})
    assert isinstance(err.value, LookupError)
    msg = str(err.value)
    assert "t.nope" in msg
    assert "t.echo" in msg and "t.render" in msg  # lists what is registered
    assert_unchanged(paused, before)


@pytest.mark.parametrize("kind", [None, 5, b"t.echo", ["t.echo"]])
def test_kind_must_be_str(paused, kind):
    before = queue_view(paused)
    with pytest.raises(TypeError, match="kind"):
        paused.submit(kind)
    assert_unchanged(paused, before)


def test_python_call_cannot_be_submitted(paused):
    before = queue_view(paused)
    with pytest.raises(InvalidParams, match="run"):
        paused.submit(PYTHON_CALL, {})
    assert_unchanged(paused, before)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"frames": "many"}, "frames"),
        ({}, "frames"),
        ({"frames": None}, "frames"),
        ({"frames": 1, "quality": 5}, "quality"),
    ],
)
def test_invalid_params_for_model(paused, params, field):
    before = queue_view(paused)
    with pytest.raises(InvalidParams) as err:
        paused.submit("t.render", params)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "t.render" in msg and field in msg
    assert_unchanged(paused, before)


@pytest.mark.parametrize("kind", ["t.echo", "t.render"])
@pytest.mark.parametrize("params", [[1, 2], "frames=3", 5, ("a", 1)])
def test_non_dict_params(paused, kind, params):
    before = queue_view(paused)
    with pytest.raises(InvalidParams, match="dict") as err:
        paused.submit(kind, params)
    assert type(params).__name__ in str(err.value)
    assert_unchanged(paused, before)


def test_params_of_another_model_are_refused(paused):
    class Other(pydantic.BaseModel):
        frames: int

    before = queue_view(paused)
    with pytest.raises(InvalidParams, match="Other"):
        paused.submit("t.render", Other(frames=1))
    assert_unchanged(paused, before)


@pytest.mark.parametrize(
    "params",
    [
        {"obj": object()},
        {"s": {1, 2}},
        {"nested": {"fn": print}},
        {"b": b"bytes"},
    ],
)
def test_non_json_params(paused, params):
    before = queue_view(paused)
    with pytest.raises(InvalidParams, match="JSON"):
        paused.submit("t.echo", params)
    assert_unchanged(paused, before)


def test_non_json_value_in_a_model_kind_is_invalid_params(paused, registry):
    class Loose(pydantic.BaseModel):
        anything: Any = None

    job_kind("t.loose", params=Loose, registry=registry)(lambda ctx, p: None)
    before = queue_view(paused)
    with pytest.raises(InvalidParams, match="t.loose"):
        paused.submit("t.loose", {"anything": object()})
    assert_unchanged(paused, before)


@pytest.mark.parametrize("priority", ["hgh", 10, -1, True, False, 2.5, None, "", "5", [5]])
def test_bad_priority(paused, priority):
    before = queue_view(paused)
    with pytest.raises(ValueError) as err:
        paused.submit("t.echo", priority=priority)
    msg = str(err.value)
    assert "priority" in msg and repr(priority) in msg
    assert "urgent" in msg and "0..9" in msg  # says what would be valid
    assert_unchanged(paused, before)


@pytest.mark.parametrize("timeout", [0, -1, -0.5, "5", True, math.nan, [1]])
def test_bad_timeout(paused, timeout):
    before = queue_view(paused)
    with pytest.raises(ValueError, match="timeout"):
        paused.submit("t.echo", timeout=timeout)
    assert_unchanged(paused, before)


@pytest.mark.parametrize("max_retries", [-1, 1.5, True, "2", None])
def test_bad_max_retries(paused, max_retries):
    before = queue_view(paused)
    with pytest.raises(ValueError, match="max_retries"):
        paused.submit("t.echo", max_retries=max_retries)
    assert_unchanged(paused, before)


@pytest.mark.parametrize("memory_mb", [0, -5, 1.5, True, "100"])
def test_bad_memory_mb(paused, memory_mb):
    before = queue_view(paused)
    with pytest.raises(ValueError, match="memory_mb"):
        paused.submit("t.echo", memory_mb=memory_mb)
    assert_unchanged(paused, before)


def test_memory_mb_above_max_memory_is_refused(make_engine, kinds):
    engine = make_engine(max_memory_mb=1000)
    engine.pause()
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(ValueError, match="max_memory_mb=1000"):
        engine.submit("t.echo", memory_mb=1001)
    assert_unchanged(engine, before)


@pytest.mark.parametrize("label", [5, b"x", ["x"]])
def test_bad_label(paused, label):
    before = queue_view(paused)
    with pytest.raises(TypeError, match="label"):
        paused.submit("t.echo", label=label)
    assert_unchanged(paused, before)


def test_bad_held(paused):
    before = queue_view(paused)
    with pytest.raises(TypeError, match="held"):
        paused.submit("t.echo", held=1)
    assert_unchanged(paused, before)


# ---------------------------------------------------------------- QueueFull


def test_queue_full_at_max_queued(make_engine, kinds):
    engine = make_engine(max_workers=1, max_queued=2)
    engine.pause()
    a = engine.submit("t.echo", {"n": 1})
    b = engine.submit("t.echo", {"n": 2})
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(QueueFull) as err:
        engine.submit("t.echo", {"n": 3})
    assert "max_queued=2" in str(err.value)
    assert_unchanged(engine, before)
    with pytest.raises(QueueFull):
        engine.run(print)
    assert_unchanged(engine, before)
    with pytest.raises(QueueFull):
        engine.submit_many([{"kind": "t.echo"}])
    assert_unchanged(engine, before)
    # Once the queue drains, there is room again.
    engine.resume()
    assert engine.wait([a, b], timeout=WAIT)
    c = engine.submit("t.echo", {"n": 3})
    assert engine.wait(c, timeout=WAIT)


def test_submit_many_that_would_overflow_enqueues_nothing(make_engine, kinds):
    engine = make_engine(max_queued=3)
    engine.pause()
    engine.submit("t.echo")
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(QueueFull, match="max_queued=3"):
        engine.submit_many([{"kind": "t.echo"}] * 3)
    assert_unchanged(engine, before)
    assert len(engine.submit_many([{"kind": "t.echo"}] * 2)) == 2


def test_running_jobs_do_not_count_against_max_queued(make_engine, registry):
    gate = threading.Event()
    started = threading.Event()

    def block(ctx, params):
        started.set()
        assert gate.wait(WAIT)

    job_kind("t.block", registry=registry)(block)
    engine = make_engine(max_workers=1, max_queued=1)
    running = engine.submit("t.block")
    assert started.wait(WAIT)
    queued = engine.submit("t.block")  # the queue holds one; the running job is not queued
    with pytest.raises(QueueFull):
        engine.submit("t.block")
    gate.set()
    assert engine.wait([running, queued], timeout=WAIT)


def test_retry_respects_max_queued(make_engine, kinds):
    engine = make_engine(max_queued=1)
    done = engine.submit("t.echo")
    assert engine.wait(done, timeout=WAIT)
    engine.pause()
    engine.submit("t.echo")
    engine.drain_events()
    before = queue_view(engine)
    with pytest.raises(QueueFull):
        engine.retry(done)
    assert_unchanged(engine, before)


# ---------------------------------------------------------------- submit_many


def test_submit_many_queues_in_order_with_each_specs_options(make_engine, kinds):
    engine = make_engine()
    engine.pause()
    ids = engine.submit_many(
        [
            {"kind": "t.echo", "params": {"n": 0}},
            {"kind": "t.render", "params": {"frames": 2}, "priority": "urgent", "label": "R"},
            {"kind": "t.echo", "params": {"n": 2}, "priority": 7, "max_retries": 2,
             "timeout": 3, "memory_mb": 10, "held": True},
        ]
    )
    assert len(ids) == 3 and len(set(ids)) == 3
    infos = [engine.get(i) for i in ids]
    assert [i.kind for i in infos] == ["t.echo", "t.render", "t.echo"]
    assert [i.priority for i in infos] == [5, 0, 7]
    assert infos[1].label == "R"
    assert dict(infos[1].params) == {"frames": 2, "quality": "draft"}
    assert (infos[2].max_retries, infos[2].timeout, infos[2].memory_mb, infos[2].held) == (
        2, 3.0, 10, True
    )
    assert all(i.state is JobState.QUEUED for i in infos)
    engine.resume()
    assert engine.wait(ids[:2], timeout=WAIT)


def test_submit_many_empty(paused):
    before = queue_view(paused)
    assert paused.submit_many([]) == []
    assert_unchanged(paused, before)


@pytest.mark.parametrize("specs", [{"kind": "t.echo"}, "t.echo", None, 5])
def test_submit_many_needs_a_list(paused, specs):
    before = queue_view(paused)
    with pytest.raises(TypeError, match="list"):
        paused.submit_many(specs)
    assert_unchanged(paused, before)


GOOD = {"kind": "t.echo", "params": {"ok": True}}


@pytest.mark.parametrize(
    "bad, error, words",
    [
        ({"kind": "t.nope"}, UnknownKind, ["t.nope"]),
        ({"kind": "t.render", "params": {"frames": "x"}}, InvalidParams, ["frames"]),
        ({"kind": "t.echo", "params": [1]}, InvalidParams, ["dict"]),
        ({"kind": "t.echo", "params": {"o": object()}}, InvalidParams, ["JSON"]),
        ({"kind": "t.echo", "priority": "hgh"}, ValueError, ["priority", "'hgh'"]),
        ({"kind": "t.echo", "timeout": -1}, ValueError, ["timeout"]),
        ({"kind": "t.echo", "max_retries": -1}, ValueError, ["max_retries"]),
        ({"kind": "t.echo", "memory_mb": 0}, ValueError, ["memory_mb"]),
        ({"kind": "t.echo", "prio": 1}, TypeError, ["prio"]),
        ({"params": {}}, TypeError, ["kind"]),
        ("t.echo", TypeError, ["dict"]),
        ({"kind": PYTHON_CALL}, InvalidParams, ["run"]),
    ],
)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_submit_many_is_all_or_nothing_and_names_the_index(paused, bad, error, words, index):
    specs = [GOOD, GOOD, GOOD]
    specs[index] = bad
    before = queue_view(paused)
    with pytest.raises(error) as err:
        paused.submit_many(specs)
    msg = str(err.value)
    assert msg.startswith(f"specs[{index}]: ")
    for word in words:
        assert word in msg
    assert_unchanged(paused, before)


# ---------------------------------------------------------------- run (python.call)


def test_run_calls_fn_with_args_and_keeps_result(make_engine):
    engine = make_engine()
    seen = {}

    def add(a, b, *, scale=1):
        ctx = current_context()
        seen["ctx"] = ctx
        seen["thread"] = threading.current_thread()
        ctx.progress(0.5, stage="adding")
        return (a + b) * scale

    job_id = engine.run(add, 2, 3, scale=10)
    assert engine.wait(job_id, timeout=WAIT)
    info = engine.get(job_id)
    assert info.state is JobState.COMPLETED
    assert info.result == 50
    assert info.kind == PYTHON_CALL == "python.call"
    assert info.label == f"{add.__module__}:{add.__qualname__}"
    assert dict(info.params) == {"callable": f"{add.__module__}:{add.__qualname__}"}
    assert info.stage == "adding"
    assert seen["ctx"].job_id == job_id
    assert seen["thread"] is not threading.main_thread()
    assert current_context() is None  # outside a job


def test_run_label_and_priority(make_engine):
    engine = make_engine()
    engine.pause()
    job_id = engine.run(lambda: 1, label="lam", priority="urgent")
    info = engine.get(job_id)
    assert (info.label, info.priority, info.state) == ("lam", 0, JobState.QUEUED)
    engine.resume()
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).result == 1


def test_run_takes_callables_that_are_not_json(make_engine):
    engine = make_engine()
    marker = object()
    job_id = engine.run(lambda o: o is marker, marker)
    assert engine.wait(job_id, timeout=WAIT)
    assert engine.get(job_id).result is True


@pytest.mark.parametrize("fn", [None, 5, "print"])
def test_run_needs_a_callable(paused, fn):
    before = queue_view(paused)
    with pytest.raises(TypeError, match="callable"):
        paused.run(fn)
    assert_unchanged(paused, before)


def test_run_bad_priority(paused):
    before = queue_view(paused)
    with pytest.raises(ValueError, match="priority"):
        paused.run(print, priority="hgh")
    assert_unchanged(paused, before)


# ---------------------------------------------------------------- a closed engine


def test_everything_that_queues_raises_engine_closed_after_shutdown(make_engine, kinds):
    engine = make_engine()
    done = engine.submit("t.echo")
    assert engine.wait(done, timeout=WAIT)
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit("t.echo")
    with pytest.raises(EngineClosed):
        engine.submit_many([{"kind": "t.echo"}])
    with pytest.raises(EngineClosed):
        engine.run(print)
    with pytest.raises(EngineClosed):
        engine.retry(done)
    with pytest.raises(EngineClosed):
        engine.start()
    assert [j.id for j in engine.jobs()] == [done]  # nothing slipped in


# ---------------------------------------------------------------- kinds registration


@pytest.mark.parametrize(
    "name",
    ["", "Demo.render", "demo-render", "1demo", "demo..render", "demo.", ".demo", "demo render",
     "démo", None, 5],
)
def test_bad_kind_names_are_refused(registry, name):
    with pytest.raises(ValueError, match="kind name"):
        registry.register(KindSpec(name=name, handler=print))
    with pytest.raises(ValueError, match="kind name"):
        job_kind(name, registry=registry)(print)
    assert registry.names() == []


@pytest.mark.parametrize("name", ["demo", "demo.render", "a.b_c.d9", "x1.y_2"])
def test_good_kind_names(registry, name):
    job_kind(name, registry=registry)(print)
    assert name in registry and registry.names() == [name]


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "2"])
def test_bad_max_concurrency_is_refused(registry, limit):
    with pytest.raises(ValueError, match="max_concurrency"):
        job_kind("t.x", max_concurrency=limit, registry=registry)(print)
    assert "t.x" not in registry


@pytest.mark.parametrize("params", [dict, Render(frames=1), "Render", int])
def test_params_must_be_a_pydantic_model_class(registry, params):
    with pytest.raises(TypeError, match="pydantic"):
        job_kind("t.x", params=params, registry=registry)(print)
    assert "t.x" not in registry


def test_name_clash_from_other_code_is_refused(registry):
    def first(ctx, params):
        return 1

    def second(ctx, params):
        return 2

    job_kind("t.clash", registry=registry)(first)
    with pytest.raises(ValueError, match="already registered"):
        job_kind("t.clash", registry=registry)(second)
    assert registry.get("t.clash").handler is first
    registry.register(KindSpec("t.clash", second), replace=True)
    assert registry.get("t.clash").handler is second


def test_reregistering_the_same_handler_replaces_it(registry):
    def handler(ctx, params):
        """Does a thing.

        More text."""

    job_kind("t.same", registry=registry)(handler)
    job_kind("t.same", max_concurrency=2, registry=registry)(handler)  # an add-on reload
    spec = registry.get("t.same")
    assert spec.max_concurrency == 2
    assert spec.description == "Does a thing."


def test_job_kind_returns_the_handler_unchanged(registry):
    def handler(ctx, params):
        return 1

    assert job_kind("t.h", registry=registry)(handler) is handler


def test_unregister(registry):
    job_kind("t.gone", registry=registry)(print)
    assert registry.unregister("t.gone") is True
    assert registry.unregister("t.gone") is False
    with pytest.raises(UnknownKind, match="t.gone"):
        registry.get("t.gone")


# ---------------------------------------------------------------- EngineConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_workers", 0),
        ("max_workers", 9),
        ("max_workers", -1),
        ("max_queued", 0),
        ("history_limit", -1),
        ("min_free_memory_mb", -1),
        ("max_memory_mb", 0),
        ("log_level", "LOUD"),
        ("bogus", 1),
    ],
)
def test_engine_config_out_of_range(field, value):
    with pytest.raises(pydantic.ValidationError) as err:
        EngineConfig(**{field: value})
    assert isinstance(err.value, ValueError)
    assert field in str(err.value)


@pytest.mark.parametrize("n", range(1, 9))
def test_engine_config_max_workers_in_range(n):
    assert EngineConfig(max_workers=n).max_workers == n


def test_engine_config_defaults():
    cfg = EngineConfig()
    assert (cfg.max_workers, cfg.max_queued, cfg.history_limit) == (4, 10_000, 500)
    assert cfg.state_dir is None and cfg.auto_resume is True
    assert cfg.min_free_memory_mb is None and cfg.max_memory_mb is None


def test_engine_needs_an_engine_config(registry):
    from blender_taskqueue.engine import Engine

    with pytest.raises(TypeError, match="EngineConfig"):
        Engine({"max_workers": 2}, registry=registry)  # type: ignore[arg-type]


def test_stored_params_are_what_json_would_hold(make_engine, kinds):
    engine = make_engine()
    engine.pause()
    job_id = engine.submit("t.echo", {"t": (1, (2, 3)), "f": 1.5, "s": "ü"})
    stored = dict(engine.get(job_id).params)
    assert stored == json.loads(json.dumps(stored))
    assert stored == {"t": [1, [2, 3]], "f": 1.5, "s": "ü"}
