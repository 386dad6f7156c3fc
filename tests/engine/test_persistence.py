"""Persistence: the sidecar file, adoption on start, damaged files, write failures.

In-process tests (the real-crash tests, with SIGKILLed child processes, are in
test_crash.py). A "dead" sidecar here is one whose owner is this process's pid
with a wrong start time (what a reused pid looks like), so adoption treats its
owner as gone; a "crashed copy" is a live engine's flushed sidecar rewritten
with such an owner, i.e. exactly the file a killed process would have left.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from blender_taskqueue.engine import (
    Engine,
    EngineConfig,
    InvalidStateError,
    JobState,
    KindRegistry,
    KindSpec,
    UnknownKind,
)
from blender_taskqueue.engine.store import (
    APP,
    CLAIM_MARK,
    INLINE_RESULT_MAX,
    SCHEMA_VERSION,
    SidecarError,
    job_from_dict,
    read_sidecar,
    write_atomic,
)

pytestmark = pytest.mark.timeout(60)

TERMINAL = {"completed", "failed", "cancelled", "interrupted"}
MOVED_NAME = re.compile(r"^(?P<orig>queue-.*\.json)\.(corrupt|unreadable)-\d{8}-\d{6}(-\d+)?$")


# ----------------------------------------------------------------------------- helpers


def dead_owner(token: str = "dead") -> dict:
    """An owner whose process is gone: our pid, but a start time it never had."""
    return {"pid": os.getpid(), "started": 1.0, "host": socket.gethostname(), "token": token}


def sidecar_doc(jobs: list, *, owner: Optional[dict] = None, closed: bool = False, **extra: Any) -> dict:
    doc = {"app": APP, "schema_version": SCHEMA_VERSION, "owner": owner or dead_owner(),
           "closed": closed, "written_at": time.time(), "jobs": jobs}
    doc.update(extra)
    return doc


def write_file(state_dir: Path, content: Any, name: str = "queue-1-dead.json") -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def entry(job_id: str, kind: str, state: str, **fields: Any) -> dict:
    """A sidecar job entry as the engine writes it (only the fields that matter)."""
    base = {"id": job_id, "kind": kind, "label": kind, "params": {}, "priority": 5, "state": state,
            "progress": 0.0, "attempt": 0, "max_retries": 0, "errors": [], "result": None,
            "partial_result": None, "checkpoint": None, "held": False, "created_at": 1000.0,
            "started_at": None, "finished_at": None, "timeout": None, "memory_mb": None,
            "seq": 1, "recovered_from": None}
    base.update(fields)
    return base


def on_disk(engine: Engine) -> dict[str, dict]:
    """The jobs of the engine's own sidecar, by id."""
    return {j["id"]: j for j in read_sidecar(engine.sidecar_path)["jobs"]}


def on_disk_now(engine: Engine) -> dict[str, dict]:
    """Like on_disk, but {} while the file does not exist yet (for polling)."""
    try:
        return on_disk(engine)
    except FileNotFoundError:
        return {}


def crashed_copy(engine: Engine, dest_dir: Path, name: str = "queue-7-crashed.json") -> Path:
    """Flush ``engine`` and copy its sidecar into ``dest_dir`` as a dead process's file."""
    assert engine.flush()
    data = json.loads(engine.sidecar_path.read_bytes())
    data["owner"] = dead_owner("crashed")
    data["closed"] = False
    return write_file(dest_dir, data, name)


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (a file or stats read) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def ok_handler(ctx, params):
    return {"ok": True, "params": dict(params)}


def quick_registry(registry: KindRegistry, *names: str) -> None:
    for name in names or ("t.quick",):
        registry.register(KindSpec(name=name, handler=ok_handler))


class Gate:
    """A handler that checkpoints, then blocks until opened (or asked to stop)."""

    def __init__(self, checkpoint: Optional[dict] = None) -> None:
        self.open = threading.Event()
        self.started = threading.Event()
        self.checkpointed = threading.Event()
        self.resumes: list[Any] = []
        self.checkpoint = checkpoint

    def __call__(self, ctx, params):
        self.resumes.append(ctx.resume_from)
        self.started.set()
        if self.checkpoint is not None:
            ctx.checkpoint(self.checkpoint)
            self.checkpointed.set()
        while not self.open.wait(0.01):
            ctx.raise_if_cancelled()
        return {"gate": "done", "resumed_from": ctx.resume_from}


@contextlib.contextmanager
def fresh_engine(state_dir: Path, registry: KindRegistry, *, paused: bool = False,
                 **kwargs: Any) -> Iterator[Engine]:
    """An engine for hypothesis examples (function fixtures cannot be used there)."""
    engine_kwargs = {k: kwargs.pop(k) for k in ("wall_clock", "sidecar_writer") if k in kwargs}
    kwargs.setdefault("log_dir", state_dir.parent / "logs")
    kwargs.setdefault("console_log", False)
    kwargs.setdefault("max_workers", 1)
    engine = Engine(EngineConfig(state_dir=state_dir, **kwargs), registry=registry, **engine_kwargs)
    if paused:
        engine.pause()
    try:
        engine.start()
        yield engine
    finally:
        engine.shutdown(wait=True, timeout=5.0)


def closed_sidecar_bytes(tmp: Path) -> bytes:
    """A real sidecar left by a cleanly shut-down engine with three queued jobs."""
    reg = KindRegistry()
    quick_registry(reg)
    state = tmp / "make-valid"
    with fresh_engine(state, reg, paused=True) as engine:
        for i in range(3):
            engine.submit("t.quick", {"i": i, "text": "x" * 40}, priority=i * 3)
        path = engine.sidecar_path
    data = path.read_bytes()
    shutil.rmtree(state)
    return data


# ----------------------------------------------------------------------------- format and durability


def test_sidecar_is_versioned_json_naming_its_owner(make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state")
    engine.pause()
    job_id = engine.submit("t.quick", {"a": 1}, priority="high", label="first")
    assert engine.flush()
    path = engine.sidecar_path
    assert path.parent == tmp_path / "state" and path.name.endswith(".json")
    data = json.loads(path.read_bytes())
    assert data["app"] == APP and data["schema_version"] == SCHEMA_VERSION
    owner = data["owner"]
    assert owner["pid"] == os.getpid()
    assert abs(owner["started"] - psutil.Process().create_time()) < 1.0
    assert owner["host"] == socket.gethostname()
    assert data["closed"] is False
    (job,) = data["jobs"]
    assert (job["id"], job["kind"], job["params"], job["priority"], job["label"], job["state"]) == (
        job_id, "t.quick", {"a": 1}, 3, "first", "queued")
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temp file left"


@pytest.mark.timeout(30)
def test_submit_is_durable_within_half_a_second_without_flush(make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state")
    engine.pause()
    first = engine.submit("t.quick", {"n": 0})
    assert engine.flush()
    for n in range(1, 4):
        t0 = time.monotonic()
        job_id = engine.submit("t.quick", {"n": n}, priority=n)
        poll(lambda job_id=job_id: job_id in on_disk_now(engine), t0 + 0.5 - time.monotonic(),
             f"submit {n} to reach the sidecar within 0.5 s")
    assert first in on_disk(engine)


def test_flush_makes_every_change_durable_at_once(make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state")
    engine.pause()
    a, b, c = (engine.submit("t.quick", {"n": n}) for n in range(3))
    assert engine.flush()
    assert set(on_disk(engine)) == {a, b, c}
    engine.cancel(b)
    engine.move(c, "top")
    d = engine.submit("t.quick", {"n": 3}, held=True)
    assert engine.flush()  # no polling: the file holds it when flush returns
    disk = on_disk(engine)
    assert disk[b]["state"] == "cancelled"
    assert disk[c]["seq"] < disk[a]["seq"]
    assert disk[d]["held"] is True and disk[d]["state"] == "queued"


@pytest.mark.timeout(30)
def test_checkpoint_and_progress_are_durable_without_flush(make_engine, registry, tmp_path):
    go, reported, finish = threading.Event(), threading.Event(), threading.Event()

    def handler(ctx, params):
        assert go.wait(10)
        ctx.checkpoint({"step": 7})
        ctx.progress(0.5, stage="half way")
        reported.set()
        assert finish.wait(10)
        return "done"

    registry.register(KindSpec(name="t.ckpt", handler=handler, resumable=True))
    engine = make_engine(state_dir=tmp_path / "state")
    job_id = engine.submit("t.ckpt")
    poll(lambda: on_disk_now(engine).get(job_id, {}).get("state") == "running", 10, "running on disk")
    assert engine.flush()  # nothing pending: what follows is only progress and a checkpoint
    go.set()
    assert reported.wait(10)
    t0 = time.monotonic()

    def durable():
        disk = on_disk_now(engine).get(job_id, {})
        return (disk.get("checkpoint") == {"step": 7} and disk.get("progress") == 0.5
                and disk.get("stage") == "half way")

    # Coalesced writes: durable within 0.5 s (plus the write itself; 1 s allowed here).
    poll(durable, t0 + 1.0 - time.monotonic(), "the checkpoint and progress to reach the sidecar")
    disk = on_disk(engine)[job_id]
    assert disk["state"] == "running"
    assert disk.get("partial_is_checkpoint") or disk["partial_result"] == {"step": 7}
    finish.set()
    assert engine.wait([job_id], timeout=10)


def test_writes_happen_on_the_writer_thread(make_engine, registry, tmp_path):
    threads: list[str] = []

    def recording_writer(path, payload):
        threads.append(threading.current_thread().name)
        write_atomic(path, payload)

    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state", sidecar_writer=recording_writer)
    ids = [engine.submit("t.quick", {"n": n}) for n in range(5)]
    assert engine.wait(ids, timeout=10)
    assert engine.flush()
    assert threads, "nothing was written"
    assert set(threads) == {"taskqueue-writer"}, threads
    assert threading.current_thread().name not in threads


def test_writes_in_flight_group_later_changes(make_engine, registry, tmp_path):
    """Group commit: changes made while a write is in flight go into the next write."""
    entered, release = threading.Event(), threading.Event()
    payloads: list[bytes] = []

    def slow_writer(path, payload):
        payloads.append(payload)
        if len(payloads) == 1:
            entered.set()
            assert release.wait(20)
        write_atomic(path, payload)

    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state", sidecar_writer=slow_writer)
    engine.pause()
    first = engine.submit("t.quick", {"n": -1})
    assert entered.wait(10)
    later = [engine.submit("t.quick", {"n": n}) for n in range(50)]  # while the write hangs
    release.set()
    assert engine.flush()
    assert set(on_disk(engine)) == {first, *later}
    assert len(payloads) <= 3, f"{len(payloads)} writes for 51 submits: not grouped"


# ----------------------------------------------------------------------------- clean shutdown and restart


def test_clean_shutdown_leaves_the_queue_for_the_next_start(make_engine, registry, tmp_path):
    quick_registry(registry)
    state = tmp_path / "state"
    first = make_engine(state_dir=state)
    first.pause()
    done = first.submit("t.quick", {"n": 0})
    first.resume()
    assert first.wait([done], timeout=10)
    first.pause()
    queued = [first.submit("t.quick", {"n": n}, priority=p) for n, p in [(1, "low"), (2, "urgent"), (3, 5)]]
    held = first.submit("t.quick", {"n": 4}, held=True)
    order = [j.id for j in first.jobs(states="queued")]
    first.shutdown()
    data = read_sidecar(first.sidecar_path)
    assert data["closed"] is True
    assert {j["id"] for j in data["jobs"]} == {done, held, *queued}

    second = make_engine(state_dir=state, max_workers=1)
    rec = second.recovery
    assert rec is not None and rec.sources == (first.sidecar_path.name,)
    assert (rec.requeued, rec.finished, rec.held, rec.resumed, rec.interrupted) == (4, 1, 1, 0, 0)
    notices = [e for e in second.drain_events() if e.type == "notice"]
    assert any("recovered 5 jobs" in (e.message or "") for e in notices), notices
    assert second.wait(queued, timeout=10)
    assert second.get(done).state is JobState.COMPLETED
    assert second.get(done).result == {"ok": True, "params": {"n": 0}}
    assert [j.id for j in second.jobs(states="queued")] == [held]  # still waits for release()
    assert second.get(held).held
    ran = sorted(queued, key=lambda i: second.get(i).started_at)
    assert ran == [i for i in order if i != held], "dispatch order changed across the restart"
    assert not first.sidecar_path.exists(), "the adopted file should be gone once ours holds it"


@pytest.mark.timeout(30)
def test_shutdown_with_running_jobs(make_engine, registry, tmp_path):
    """Resumable running jobs resume from their checkpoint at the next start;
    non-resumable ones end interrupted with their partial result."""
    res, plain = Gate(checkpoint={"step": 3}), Gate(checkpoint={"frames": 12})
    registry.register(KindSpec(name="t.res", handler=res, resumable=True))
    registry.register(KindSpec(name="t.plain", handler=plain))
    state = tmp_path / "state"
    first = make_engine(state_dir=state, max_workers=2)
    r = first.submit("t.res")
    p = first.submit("t.plain")
    assert res.checkpointed.wait(10) and plain.checkpointed.wait(10)
    first.shutdown(timeout=5)
    assert first.get(p).state is JobState.INTERRUPTED
    assert first.get(p).partial_result == {"frames": 12}
    disk = on_disk(first)
    assert disk[r]["checkpoint"] == {"step": 3} and disk[r]["state"] in ("queued", "running")

    res.open.set()
    res.checkpoint = None
    second = make_engine(state_dir=state)
    assert second.wait([r], timeout=10)
    assert res.resumes == [None, {"step": 3}]
    assert second.get(r).state is JobState.COMPLETED
    assert second.get(p).state is JobState.INTERRUPTED
    assert second.get(p).partial_result == {"frames": 12}


def test_engine_without_jobs_leaves_no_file(make_engine, tmp_path):
    state = tmp_path / "state"
    engine = make_engine(state_dir=state)
    assert engine.flush()
    engine.shutdown()
    assert not list(state.glob("queue-*"))


# ----------------------------------------------------------------------------- round trip (hypothesis)

RT_KINDS = ("rt.echo", "rt.fail", "rt.ckpt", "rt.res")
PRIORITIES = ["urgent", "high", "normal", "low", *range(10)]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
params_st = st.dictionaries(st.text(min_size=1, max_size=6), json_leaf, max_size=3)
submit_op = st.tuples(st.just("submit"), st.sampled_from(RT_KINDS), params_st,
                      st.sampled_from(PRIORITIES), st.booleans(),
                      st.fixed_dictionaries({}, optional={
                          "timeout": st.none() | st.floats(30, 1e6),
                          "max_retries": st.integers(0, 3),
                          "memory_mb": st.none() | st.integers(1, 16),
                          "label": st.text(min_size=1, max_size=10)}))
op_st = st.one_of(
    submit_op,
    st.tuples(st.just("run_next")),
    st.tuples(st.just("cancel"), st.integers(0, 60)),
    st.tuples(st.just("move"), st.integers(0, 60), st.sampled_from(["top", "up", "down", "bottom"])),
    st.tuples(st.just("run_next")),
    st.tuples(st.just("release"), st.integers(0, 60)),
    st.tuples(st.just("retry"), st.integers(0, 60)),
    st.tuples(st.just("clear_finished")),
)


def rt_registry(holder: dict) -> KindRegistry:
    """Kinds that pause the engine as they run, so exactly one job runs per run_next."""

    def echo(ctx, params):
        holder["engine"].pause()
        return {"echo": dict(params), "id": ctx.job_id}

    def fail(ctx, params):
        holder["engine"].pause()
        raise ValueError(f"boom {sorted(params)}")

    def ckpt(ctx, params):
        holder["engine"].pause()
        ctx.checkpoint({"partial": len(params)})
        raise RuntimeError("failed after a checkpoint")

    reg = KindRegistry()
    for name, fn, resumable in [("rt.echo", echo, False), ("rt.fail", fail, False),
                                ("rt.ckpt", ckpt, False), ("rt.res", echo, True)]:
        reg.register(KindSpec(name=name, handler=fn, resumable=resumable))
    return reg


def job_view(info) -> tuple:
    return (info.id, info.kind, info.label, dict(info.params), info.priority, info.state,
            info.held, info.result, info.partial_result, info.progress, info.attempt,
            info.max_retries, [(e.type, e.message, e.stage, e.attempt) for e in info.errors],
            info.created_at, info.finished_at, info.timeout, info.memory_mb)


def apply_ops(engine: Engine, ops: list) -> None:
    ids: list[str] = []
    for op in ops:
        name = op[0]
        if name == "submit":
            _, kind, params, priority, held, options = op
            if kind in ("rt.fail", "rt.ckpt"):
                options = {k: v for k, v in options.items() if k != "max_retries"}  # no backoff here
            ids.append(engine.submit(kind, params, priority=priority, held=held, **options))
        elif not ids:
            continue
        elif name == "cancel":
            known = [j.id for j in engine.jobs()]
            if known:
                engine.cancel(known[op[1] % len(known)])
        elif name == "move":
            queued = [j.id for j in engine.jobs(states="queued")]
            if queued:
                engine.move(queued[op[1] % len(queued)], op[2])
        elif name == "release":
            held = [j.id for j in engine.jobs(states="queued") if j.held]
            if held:
                assert engine.release(held[op[1] % len(held)]) == 1
        elif name == "retry":
            done = [j.id for j in engine.jobs() if j.is_terminal]
            if done:
                ids.append(engine.retry(done[op[1] % len(done)]))
        elif name == "clear_finished":
            engine.clear_finished()
        elif name == "run_next":
            ready = [j for j in engine.jobs(states="queued") if not j.held]
            if ready:
                engine.resume()
                assert engine.wait([ready[0].id], timeout=10)
                assert engine.paused
                assert engine.get(ready[0].id).is_terminal


def assert_same_queue(before: list, after_engine: Engine) -> None:
    after = after_engine.jobs()
    assert [j.id for j in after] == [j.id for j in before], "order (queued dispatch order, history) differs"
    for old, new in zip(before, after, strict=True):
        assert job_view(new) == job_view(old)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.builds(lambda a, b: a + b, st.lists(submit_op, max_size=8), st.lists(op_st, max_size=25)))
@pytest.mark.timeout(120)
def test_queue_round_trips_through_a_clean_shutdown(ops):
    holder: dict = {}
    registry = rt_registry(holder)
    clock = itertools.count(1_700_000_000.0, 1.0)  # distinct, ordered wall times
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        with fresh_engine(state, registry, paused=True, wall_clock=lambda: next(clock)) as first:
            holder["engine"] = first
            apply_ops(first, ops)
            before = first.jobs()
        for state_ in sorted({j.state.value for j in before}):
            event(f"round trip with a {state_} job")
        if any(j.held for j in before):
            event("round trip with a held job")
        for _ in range(2):  # adopt, shut down, adopt again
            with fresh_engine(state, registry, paused=True, wall_clock=lambda: next(clock)) as nxt:
                holder["engine"] = nxt
                assert_same_queue(before, nxt)
                rec = nxt.recovery
                if before:
                    queued = [j for j in before if j.state is JobState.QUEUED]
                    assert rec is not None
                    assert rec.requeued == len(queued)
                    assert rec.held == sum(j.held for j in queued)
                    assert rec.finished == len(before) - len(queued)
                    assert (rec.resumed, rec.interrupted, rec.duplicates, rec.problems) == (0, 0, 0, ())
                else:
                    assert rec is None
        assert not list(state.glob(f"*{CLAIM_MARK}*"))


# ----------------------------------------------------------------------------- ownership


def test_two_live_engines_never_touch_each_others_files(make_engine, registry, tmp_path):
    quick_registry(registry)
    state = tmp_path / "state"
    a = make_engine(state_dir=state)
    a.pause()
    ids_a = [a.submit("t.quick", {"a": n}) for n in range(3)]
    assert a.flush()
    a_bytes = a.sidecar_path.read_bytes()

    b = make_engine(state_dir=state)
    b.pause()
    assert b.recovery is None, "the second engine adopted a live engine's queue"
    assert b.jobs() == []
    ids_b = [b.submit("t.quick", {"b": n}) for n in range(2)]
    assert b.flush()
    assert a.sidecar_path != b.sidecar_path
    assert a.sidecar_path.read_bytes() == a_bytes, "b touched a's file"
    assert set(on_disk(a)) == set(ids_a) and set(on_disk(b)) == set(ids_b)
    a.submit("t.quick", {"a": 9})
    assert a.flush()
    assert set(on_disk(b)) == set(ids_b) and len(on_disk(a)) == 4
    assert {j.id for j in a.jobs()}.isdisjoint(ids_b)

    a.shutdown()  # a closes cleanly: its queue may be adopted, b's (alive) never
    c = make_engine(state_dir=state)
    c.pause()
    assert c.recovery is not None and c.recovery.sources == (a.sidecar_path.name,)
    assert set(ids_a) < {j.id for j in c.jobs()}
    assert {j.id for j in c.jobs()}.isdisjoint(ids_b)
    assert set(on_disk(b)) == set(ids_b)


def test_reused_pid_is_not_mistaken_for_the_owner(make_engine, registry, tmp_path):
    """Owner = pid + start time: our own (live) pid with another start time is dead."""
    quick_registry(registry)
    state = tmp_path / "state"
    path = write_file(state, sidecar_doc([entry("old-1", "t.quick", "queued")]))
    engine = make_engine(state_dir=state)
    assert engine.recovery is not None and engine.recovery.sources == (path.name,)
    assert engine.wait(["old-1"], timeout=10)
    assert engine.get("old-1").state is JobState.COMPLETED


def test_live_owner_in_this_process_and_other_hosts_are_left_alone(make_engine, registry, tmp_path):
    quick_registry(registry)
    state = tmp_path / "state"
    live = dict(dead_owner("live"), started=psutil.Process().create_time())
    elsewhere = dict(dead_owner("far"), host=socket.gethostname() + "-elsewhere")
    p1 = write_file(state, sidecar_doc([entry("live-1", "t.quick", "queued")], owner=live), "queue-1-live.json")
    p2 = write_file(state, sidecar_doc([entry("far-1", "t.quick", "queued")], owner=elsewhere),
                    "queue-2-far.json")
    b1, b2 = p1.read_bytes(), p2.read_bytes()
    engine = make_engine(state_dir=state)
    rec = engine.recovery  # the live one is left alone quietly; the other host's is mentioned
    assert rec is not None and rec.adopted == 0 and rec.sources == ()
    assert len(rec.skipped) == 1 and rec.skipped[0].startswith("queue-2-far.json: written on host")
    assert "left alone" in rec.summary
    assert engine.jobs() == []
    assert p1.read_bytes() == b1 and p2.read_bytes() == b2


def test_stale_claim_is_adopted_but_a_live_claim_is_not(make_engine, registry, tmp_path):
    """A claim (``.adopting-<pid>-<start>-<token>``) whose claimer died is adopted again."""
    quick_registry(registry)
    state = tmp_path / "state"
    me = psutil.Process()
    stale = write_file(state, sidecar_doc([entry("st-1", "t.quick", "queued")]),
                       f"queue-1-a.json{CLAIM_MARK}{os.getpid()}-1-tok")
    live = write_file(state, sidecar_doc([entry("lv-1", "t.quick", "queued")]),
                      f"queue-2-b.json{CLAIM_MARK}{os.getpid()}-{int(me.create_time())}-tok")
    engine = make_engine(state_dir=state)
    assert engine.recovery is not None and engine.recovery.sources == ("queue-1-a.json",)
    assert engine.wait(["st-1"], timeout=10)
    assert {j.id for j in engine.jobs()} == {"st-1"}
    assert engine.flush()
    assert not stale.exists() and live.exists()


def test_adopted_ids_are_preserved_and_deduplicated(make_engine, registry, tmp_path):
    quick_registry(registry, "t.quick", "t.other")
    state = tmp_path / "state"
    jobs = [entry("x-1", "t.quick", "queued", seq=1),
            entry("x-2", "t.quick", "completed", result={"r": 2}, finished_at=1001.0, progress=1.0)]
    write_file(state, sidecar_doc(jobs), "queue-1-a.json")
    write_file(state, sidecar_doc(jobs), "queue-2-b.json")  # the same jobs again
    # another job that happens to have the same id: kept, under a new id
    write_file(state, sidecar_doc([entry("x-1", "t.other", "queued", created_at=5.0)]), "queue-3-c.json")
    engine = make_engine(state_dir=state)
    engine.pause()
    rec = engine.recovery
    assert rec is not None and rec.duplicates == 2
    got = {j.id: j for j in engine.jobs()}
    assert set(got) == {"x-1", "x-2", "x-1~2"}
    assert got["x-1"].kind == "t.quick" and got["x-1~2"].kind == "t.other"
    assert got["x-2"].result == {"r": 2}


@pytest.mark.parametrize("order", ["older_copy_first", "newer_copy_first"])
def test_a_job_one_sidecar_saw_finish_never_runs_again(make_engine, registry, tmp_path, order, request):
    """Two dead sidecars hold the same job (an adopter died between writing its own
    file and deleting the claim): one saw it queued, the other completed."""
    ran: list[str] = []
    registry.register(KindSpec(name="t.rec", handler=lambda ctx, p: ran.append(ctx.job_id) or "again"))
    state = tmp_path / "state"
    queued = entry("dup-1", "t.rec", "queued")
    done = entry("dup-1", "t.rec", "completed", result="first", progress=1.0, attempt=1,
                 finished_at=1002.0)
    names = ["queue-1-a.json", "queue-2-b.json"]
    first, second = (queued, done) if order == "older_copy_first" else (done, queued)
    write_file(state, sidecar_doc([first]), names[0])
    write_file(state, sidecar_doc([second]), names[1])
    engine = make_engine(state_dir=state)
    assert engine.wait(timeout=10)
    assert engine.recovery.duplicates == 1
    assert engine.get("dup-1").state is JobState.COMPLETED
    assert engine.get("dup-1").result == "first"
    assert ran == [], "a job a sidecar recorded as completed ran again"


# ----------------------------------------------------------------------------- damaged files


def _damaged_variants(valid: bytes) -> dict[str, bytes]:
    doc = json.loads(valid)

    def variant(**changes):
        d = json.loads(valid)
        for k, v in changes.items():
            if v is ...:
                del d[k]
            else:
                d[k] = v
        return json.dumps(d).encode()

    return {
        "truncated": valid[: len(valid) // 2],
        "truncated_by_one_brace": valid.rstrip()[:-1],
        "empty": b"",
        "newer_schema": variant(schema_version=SCHEMA_VERSION + 1),
        "older_schema": variant(schema_version=0),
        "schema_as_string": variant(schema_version=str(SCHEMA_VERSION)),
        "schema_missing": variant(schema_version=...),
        "not_a_dict_list": json.dumps(doc["jobs"]).encode(),
        "not_a_dict_string": b'"queue"',
        "not_a_dict_null": b"null",
        "other_app": variant(app="something_else"),
        "jobs_not_a_list": variant(jobs={"a": 1}),
        "owner_missing": variant(owner=...),
        "owner_malformed": variant(owner={"pid": "x"}),
        "non_utf8": b"\xff\xfe" + valid[2:],
        "latin1": valid.replace(b'"x', b'"\xe9'),
        "nul_bytes": b"\x00" * 64,
    }


@pytest.fixture(scope="module")
def valid_sidecar(tmp_path_factory) -> bytes:
    return closed_sidecar_bytes(tmp_path_factory.mktemp("valid"))


DAMAGE = list(_damaged_variants(json.dumps(sidecar_doc([entry("v-1", "t.quick", "queued")])).encode()))


def assert_moved_aside(engine: Engine, path: Path, raw: bytes) -> Path:
    assert not path.exists(), "a damaged sidecar must be moved aside"
    rec = engine.recovery
    assert rec is not None and len(rec.moved_aside) == 1, rec
    moved = path.parent / rec.moved_aside[0]
    m = MOVED_NAME.match(moved.name)
    assert m and m["orig"] == path.name, moved.name
    assert moved.read_bytes() == raw, "the moved file must keep its bytes (never deleted or changed)"
    assert any(path.name in p for p in rec.problems), rec.problems
    assert "moved aside" in rec.summary
    return moved


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_sidecar_is_moved_aside_and_reported(make_engine, registry, tmp_path, valid_sidecar,
                                                     damage):
    quick_registry(registry)
    state = tmp_path / "state"
    raw = _damaged_variants(valid_sidecar)[damage]
    path = write_file(state, raw)
    engine = make_engine(state_dir=state)
    moved = assert_moved_aside(engine, path, raw)
    notices = [e for e in engine.drain_events() if e.type == "notice"]
    assert any("moved aside" in (e.message or "") and e.level == "warning" for e in notices), notices
    job_id = engine.submit("t.quick")  # and the engine works
    assert engine.wait([job_id], timeout=10)
    assert engine.get(job_id).state is JobState.COMPLETED
    engine.shutdown()
    again = make_engine(state_dir=state)  # never read again
    assert again.recovery is not None and again.recovery.moved_aside == ()
    assert moved.read_bytes() == raw


def test_unreadable_sidecar_is_moved_aside(make_engine, registry, tmp_path, monkeypatch):
    """As root, chmod cannot make a file unreadable: fail the read itself (EIO)."""
    state = tmp_path / "state"
    raw = json.dumps(sidecar_doc([entry("u-1", "t.quick", "queued")])).encode()
    path = write_file(state, raw)
    real = Path.read_bytes

    def failing_read(self):
        if self.name == path.name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    engine = make_engine(state_dir=state)
    monkeypatch.undo()
    moved = assert_moved_aside(engine, path, raw)
    assert ".unreadable-" in moved.name
    assert any(os.strerror(errno.EIO) in p for p in engine.recovery.problems)


def _check_any_bytes_adoption(raw: bytes) -> None:
    registry = KindRegistry()
    quick_registry(registry, "fz.ok")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        path = write_file(state, raw)
        with fresh_engine(state, registry) as engine:
            assert engine.is_running
            rec = engine.recovery
            assert rec is not None, "the file was neither adopted nor moved aside"
            assert not path.exists()
            if rec.moved_aside:
                (name,) = rec.moved_aside
                assert (state / name).read_bytes() == raw
                assert rec.sources == ()
            else:
                assert rec.sources == (path.name,)
            probe = engine.submit("fz.ok", priority="urgent")
            assert engine.wait([probe], timeout=20), "the engine is wedged after adoption"
            assert engine.flush()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=400))
@example(raw=b"")
@example(raw=b"{}")
@example(raw=b"\xef\xbb\xbf{}")
@example(raw=b"[" * 50)
@pytest.mark.timeout(120)
def test_any_bytes_never_crash_adoption(raw):
    _check_any_bytes_adoption(raw)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.timeout(120)
def test_any_truncation_of_a_real_sidecar_never_crashes_adoption(data, valid_sidecar):
    """Every prefix: moved aside, or (the whole document) adopted."""
    cut = data.draw(st.integers(0, len(valid_sidecar)))
    flip = data.draw(st.one_of(st.none(), st.integers(0, max(0, cut - 1))))
    raw = bytearray(valid_sidecar[:cut])
    if flip is not None and raw:
        raw[flip] ^= data.draw(st.integers(1, 255))
    _check_any_bytes_adoption(bytes(raw))


# Structured fuzzing: documents that pass the header checks, with job entries whose
# fields hold arbitrary JSON (Python's json reads and writes NaN and Infinity too).
# Only memory_mb stays small: a job that needs more memory than the machine has
# waits at the head of its band by design, which would block the probe job.
any_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
FUZZ_FIELDS = ("label", "params", "priority", "progress", "stage", "message", "attempt",
               "max_retries", "errors", "result", "partial_result", "checkpoint", "held",
               "created_at", "started_at", "finished_at", "timeout", "seq", "partial_is_checkpoint",
               "recovered_from")
fuzz_entry = st.fixed_dictionaries(
    {"id": st.sampled_from(["j-1", "j-2", "j-3", "x"]) | st.text(max_size=5) | any_json,
     "kind": st.sampled_from(["fz.ok", "fz.res", "fz.missing", "python.call"]),
     "state": st.sampled_from([s.value for s in JobState] + ["bogus"])},
    optional={
        **{f: any_json for f in FUZZ_FIELDS},
        "params": st.dictionaries(st.text(max_size=4), any_json, max_size=3) | any_json,
        "checkpoint": st.dictionaries(st.text(max_size=4), any_json, max_size=3) | any_json,
        "priority": st.integers(-2, 12) | any_json,
        "created_at": st.floats(0, 2e9) | any_json,
        "finished_at": st.none() | st.floats(0, 2e9) | any_json,
        "memory_mb": st.none() | st.integers(-5, 64) | st.text(max_size=3) | st.floats(),
        "timeout": st.none() | st.floats(0.5, 1e6) | any_json,
        "seq": st.integers(-10, 10**20) | any_json,
        "errors": st.lists(st.fixed_dictionaries({"type": st.text(max_size=4), "message": st.text(max_size=4),
                                                  "traceback": st.just(""), "stage": st.none()}),
                           max_size=2) | any_json,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=st.lists(fuzz_entry, max_size=6), closed=st.booleans())
@pytest.mark.timeout(120)
def test_any_job_entries_never_crash_adoption(jobs, closed):
    registry = KindRegistry()
    quick_registry(registry, "fz.ok")
    registry.register(KindSpec(name="fz.res", handler=ok_handler, resumable=True))
    raw = json.dumps(sidecar_doc(jobs, closed=closed)).encode()
    bad = 0
    for e in json.loads(raw)["jobs"]:
        try:
            job_from_dict(e)
        except SidecarError:
            bad += 1
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        write_file(state, raw)
        with fresh_engine(state, registry, max_workers=2) as engine:
            rec = engine.recovery
            assert rec is not None and rec.sources == ("queue-1-dead.json",) and rec.moved_aside == ()
            assert len(rec.problems) == bad, rec.problems
            assert rec.adopted + rec.duplicates >= len(jobs) - bad
            assert len(engine.jobs()) <= rec.adopted
            probe = engine.submit("fz.ok", priority="urgent")
            assert engine.wait([probe], timeout=20), "the engine is wedged after adoption"
            assert engine.flush()
            assert engine.get(probe).state is JobState.COMPLETED


def _doc_bytes(*jobs: dict, owner: Optional[dict] = None) -> bytes:
    return json.dumps(sidecar_doc(list(jobs), owner=owner)).encode()


HOSTILE = {
    "deep_nesting": (b'{"app": "blender_taskqueue", "jobs": ' + b"[" * 100_000, None),
    "deep_nesting_in_a_job": (_doc_bytes(entry("d-1", "fz.ok", "queued"))[:-2]
                              + b', {"params": ' + b"[" * 100_000 + b"]}", None),
    "infinite_seq": (_doc_bytes(entry("i-1", "fz.ok", "queued", seq=float("inf"))), None),
    "infinite_priority": (_doc_bytes(entry("i-1", "fz.ok", "queued", priority=float("inf"))), None),
    "nan_created_at": (_doc_bytes(entry("n-1", "fz.ok", "queued", created_at=float("nan"))), None),
    "huge_ints": (_doc_bytes(entry("h-1", "fz.ok", "queued", seq=10**400, attempt=10**400,
                                   max_retries=10**400)), None),
    "negative_owner_pid": (_doc_bytes(owner=dict(dead_owner(), pid=-1)), None),
    "huge_owner_pid": (_doc_bytes(owner=dict(dead_owner(), pid=2**70)), None),
    "finished_at_not_a_number": (_doc_bytes(
        entry("f-1", "fz.ok", "completed", finished_at="yesterday"),
        entry("f-2", "fz.ok", "completed", finished_at=5.0)), None),
    "memory_mb_not_a_number": (_doc_bytes(entry("m-1", "fz.ok", "queued", memory_mb="lots")), None),
    "timeout_not_a_number": (_doc_bytes(entry("t-1", "fz.ok", "queued", timeout="soon")), None),
    "timeout_negative": (_doc_bytes(entry("t-1", "fz.ok", "queued", timeout=-1)), None),
    "checkpoint_not_a_dict": (_doc_bytes(entry("c-1", "fz.res", "running", checkpoint=[1, 2])), None),
    "id_not_a_string": (_doc_bytes(entry(7, "fz.ok", "queued")), None),
    "errors_garbage": (_doc_bytes(entry("e-1", "fz.ok", "failed", errors=[{"nope": 1}, "x"])), None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.timeout(30)
def test_hostile_sidecar_never_crashes_start(name, request):
    raw, bug = HOSTILE[name]
    if bug:
        request.applymarker(pytest.mark.xfail(strict=True, reason=bug))
    registry = KindRegistry()
    quick_registry(registry, "fz.ok")
    registry.register(KindSpec(name="fz.res", handler=ok_handler, resumable=True))
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        path = write_file(state, raw)
        engine = Engine(EngineConfig(state_dir=state, log_dir=Path(tmp) / "logs", console_log=False,
                                     max_workers=1), registry=registry)
        try:
            engine.start()
            assert engine.is_running
            rec = engine.recovery
            assert rec is not None and not path.exists()
            assert rec.moved_aside or rec.problems or rec.sources, rec
            probe = engine.submit("fz.ok", priority="urgent")
            assert engine.wait([probe], timeout=5), "the engine is wedged after adoption"
            assert engine.wait(timeout=5), "an adopted job never finished (a worker died?)"
        finally:
            engine.shutdown(timeout=2)


# ----------------------------------------------------------------------------- write failures


class BrokenWriter:
    """Fails every write with ``err`` while ``broken`` is set; writes for real after."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.broken = threading.Event()
        self.broken.set()
        self.failures = 0
        self.successes = 0

    def __call__(self, path: Path, payload: bytes) -> None:
        if self.broken.is_set():
            self.failures += 1
            raise OSError(self.err, os.strerror(self.err), str(path))
        write_atomic(path, payload)
        self.successes += 1


def log_text(engine: Engine) -> str:
    path = engine.log_path
    return path.read_text(encoding="utf-8") if path and path.exists() else ""


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM])
@pytest.mark.timeout(60)
def test_failing_writes_are_reported_and_retried(make_engine, registry, tmp_path, err):
    quick_registry(registry)
    writer = BrokenWriter(err)
    engine = make_engine(state_dir=tmp_path / "state", sidecar_writer=writer, max_workers=2)
    ids = [engine.submit("t.quick", {"n": n}) for n in range(5)]
    assert engine.wait(ids, timeout=20), "jobs must run while the sidecar cannot be written"
    error = poll(lambda: engine.stats().write_error, 10, "stats().write_error")
    assert os.strerror(err) in error and str(engine.sidecar_path) in error
    logged = poll(lambda: "sidecar write failed" in log_text(engine) and log_text(engine), 10,
                  "the failure in the log")
    assert os.strerror(err) in logged
    assert engine.flush(timeout=0.5) is False  # reports the failure, does not hang
    more = engine.submit("t.quick", {"n": 99})  # still takes and runs work
    assert engine.wait([more], timeout=20)
    assert engine.get(more).state is JobState.COMPLETED
    assert not engine.sidecar_path.exists()

    writer.broken.clear()  # the disk has room again / the folder is writable again
    assert engine.flush(timeout=40), engine.stats().write_error
    assert engine.stats().write_error is None
    assert writer.successes >= 1 and writer.failures >= 1
    disk = on_disk(engine)
    assert set(disk) == {*ids, more} and all(j["state"] == "completed" for j in disk.values())
    poll(lambda: "sidecar write recovered" in log_text(engine), 10, "the recovery in the log")


@pytest.mark.timeout(60)
def test_a_hanging_write_does_not_stall_the_engine(make_engine, registry, tmp_path):
    quick_registry(registry)
    entered, release = threading.Event(), threading.Event()

    def hanging_writer(path, payload):
        entered.set()
        assert release.wait(30)
        write_atomic(path, payload)

    engine = make_engine(state_dir=tmp_path / "state", sidecar_writer=hanging_writer, max_workers=2)
    first = engine.submit("t.quick")
    assert entered.wait(10)
    ids = [first, *(engine.submit("t.quick", {"n": n}) for n in range(10))]
    assert engine.wait(ids, timeout=20)
    assert engine.stats().completed == 11
    release.set()
    assert engine.flush(timeout=20)
    assert set(on_disk(engine)) == set(ids)


@pytest.mark.timeout(60)
def test_state_dir_that_cannot_be_created(make_engine, registry, tmp_path):
    quick_registry(registry)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    engine = make_engine(state_dir=blocker / "state")
    job_id = engine.submit("t.quick")
    assert engine.wait([job_id], timeout=20)
    assert engine.get(job_id).state is JobState.COMPLETED
    error = poll(lambda: engine.stats().write_error, 10, "stats().write_error")
    assert os.strerror(errno.ENOTDIR) in error or os.strerror(errno.ENOENT) in error


@pytest.mark.timeout(60)
def test_state_dir_removed_while_running_is_recreated(make_engine, registry, tmp_path):
    quick_registry(registry)
    state = tmp_path / "state"
    engine = make_engine(state_dir=state)
    first = engine.submit("t.quick")
    assert engine.wait([first], timeout=10) and engine.flush()
    shutil.rmtree(state)
    second = engine.submit("t.quick")
    assert engine.wait([second], timeout=10)
    assert engine.flush(timeout=20), engine.stats().write_error
    assert set(on_disk(engine)) == {first, second}


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs, for a real ENOSPC (root ignores permission bits)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(60)
def test_full_disk_for_real(small_fs, make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=small_fs / "state", work_dir=tmp_path / "work")
    engine.pause()
    small = engine.submit("t.quick", {"n": 0})
    assert engine.flush()
    big = engine.submit_many([{"kind": "t.quick", "params": {"blob": "x" * 3000, "n": n}}
                              for n in range(40)])  # ~120 KB: more than the disk holds
    error = poll(lambda: engine.stats().write_error, 10, "stats().write_error")
    assert os.strerror(errno.ENOSPC) in error
    assert engine.flush(timeout=0.5) is False
    assert json.loads((small_fs / "state" / engine.sidecar_path.name).read_bytes())["jobs"], \
        "the last good file must stay intact"
    for job_id in big:  # make room: the next retry fits
        engine.cancel(job_id)
    engine.clear_finished()
    engine.resume()
    assert engine.wait([small], timeout=10)
    assert engine.flush(timeout=40), engine.stats().write_error
    assert engine.stats().write_error is None
    assert set(on_disk(engine)) == {small}


# ----------------------------------------------------------------------------- adoption details


def test_missing_kind_is_held_and_runs_once_registered(make_engine, registry, tmp_path):
    state = tmp_path / "state"
    other = KindRegistry()
    quick_registry(other, "ext.gen")
    with fresh_engine(state, other, paused=True) as first:
        ids = [first.submit("ext.gen", {"n": n}) for n in range(2)]
    quick_registry(registry, "t.quick")
    engine = make_engine(state_dir=state)
    rec = engine.recovery
    assert rec is not None and rec.held == 2 and rec.requeued == 2
    for job_id in ids:
        info = engine.get(job_id)
        assert info.state is JobState.QUEUED and info.held
        assert "'ext.gen'" in info.message and "not registered" in info.message
    assert engine.stats().held == 2
    with pytest.raises(UnknownKind, match="ext.gen"):
        engine.release(ids[0])
    assert engine.release() == 0
    assert engine.get(ids[0]).held

    quick_registry(registry, "ext.gen")  # the add-on that provides it is enabled
    assert engine.release(ids[0]) == 1
    assert engine.wait([ids[0]], timeout=10)
    assert engine.get(ids[0]).state is JobState.COMPLETED
    assert engine.get(ids[0]).result == {"ok": True, "params": {"n": 0}}
    assert engine.release() == 1
    assert engine.wait([ids[1]], timeout=10)


@pytest.mark.timeout(30)
def test_running_job_of_missing_kind_is_interrupted_naming_it(make_engine, registry, tmp_path):
    other = KindRegistry()
    gate = Gate(checkpoint={"step": 1})
    other.register(KindSpec(name="ext.slow", handler=gate, resumable=True))
    with fresh_engine(tmp_path / "a", other) as first:
        job_id = first.submit("ext.slow", {"n": 1})
        assert gate.checkpointed.wait(10)
        crashed_copy(first, tmp_path / "state")
        gate.open.set()
    engine = make_engine(state_dir=tmp_path / "state")
    info = engine.get(job_id)
    assert info.state is JobState.INTERRUPTED
    assert "'ext.slow'" in info.message and "not registered" in info.message
    assert info.partial_result == {"step": 1}
    quick_registry(registry, "ext.slow")
    again = engine.retry(job_id)
    assert engine.wait([again], timeout=10)
    assert engine.get(again).state is JobState.COMPLETED


@pytest.mark.timeout(30)
def test_auto_resume_off_holds_adopted_jobs(make_engine, registry, tmp_path):
    gate = Gate(checkpoint={"step": 4})
    other = KindRegistry()
    other.register(KindSpec(name="t.res", handler=gate, resumable=True))
    quick_registry(other)
    with fresh_engine(tmp_path / "a", other) as first:
        running = first.submit("t.res")
        assert gate.checkpointed.wait(10)
        first.pause()
        queued = [first.submit("t.quick", {"n": n}) for n in range(3)]
        crashed_copy(first, tmp_path / "state")
        gate.open.set()
    gate.checkpoint = None
    registry.register(KindSpec(name="t.res", handler=gate, resumable=True))
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state", auto_resume=False)
    rec = engine.recovery
    assert (rec.requeued, rec.resumed, rec.held) == (3, 1, 4)
    for job_id in [running, *queued]:
        assert engine.get(job_id).state is JobState.QUEUED and engine.get(job_id).held
    assert engine.stats().held == 4
    assert engine.wait([running, *queued], timeout=0.3) is False  # nothing ran by itself
    assert engine.release() == 4
    assert engine.wait([running, *queued], timeout=10)
    assert gate.resumes[-1] == {"step": 4}
    assert engine.get(running).result == {"gate": "done", "resumed_from": {"step": 4}}


def test_large_results_are_stored_as_files(make_engine, registry, tmp_path):
    big = {"images": ["p" * 1000 for _ in range(100)]}  # ~100 KB of JSON
    registry.register(KindSpec(name="t.big", handler=lambda ctx, p: big))
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state")
    job_id = engine.submit("t.big")
    small = engine.submit("t.quick")
    assert engine.wait([job_id, small], timeout=10)
    assert engine.flush()
    disk = on_disk(engine)
    ref = disk[job_id]["result"]
    assert set(ref) == {"$file", "bytes"}, "a large result must be a file reference, not inline"
    target = Path(ref["$file"])
    assert engine.workdir_for(job_id) in target.parents
    assert json.loads(target.read_text(encoding="utf-8")) == big
    assert ref["bytes"] == len(json.dumps(big))
    assert disk[small]["result"] == {"ok": True, "params": {}}
    assert engine.sidecar_path.stat().st_size < INLINE_RESULT_MAX


def test_large_result_survives_a_restart(make_engine, registry, tmp_path):
    big = {"images": ["p" * 1000 for _ in range(100)]}
    registry.register(KindSpec(name="t.big", handler=lambda ctx, p: big))
    state = tmp_path / "state"
    first = make_engine(state_dir=state)
    job_id = first.submit("t.big")
    assert first.wait([job_id], timeout=10)
    first.shutdown()
    second = make_engine(state_dir=state)
    assert second.get(job_id).state is JobState.COMPLETED
    assert second.flush()  # the result file is read back off this thread
    assert second.get(job_id).result == big


def test_history_in_the_file_is_bounded(make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state", history_limit=3, max_workers=2)
    ids = [engine.submit("t.quick", {"n": n}) for n in range(10)]
    assert engine.wait(ids, timeout=20)
    assert engine.flush()
    finished = [j for j in on_disk(engine).values() if j["state"] in TERMINAL]
    assert len(finished) == 3
    assert {j["id"] for j in finished} == {j.id for j in engine.jobs()}
    engine.clear_finished()
    assert engine.flush()
    assert on_disk(engine) == {}


@pytest.mark.timeout(60)
def test_file_size_tracks_live_queue_plus_history(make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state", history_limit=5, max_workers=2)

    def run(n: int) -> int:
        ids = [engine.submit("t.quick", {"n": i, "pad": "y" * 200}) for i in range(n)]
        assert engine.wait(ids, timeout=30)
        assert engine.flush()
        return engine.sidecar_path.stat().st_size

    after_20 = run(20)
    after_300 = run(300)
    assert after_300 <= after_20 * 1.25, (after_20, after_300)
    engine.pause()
    queued = [engine.submit("t.quick", {"n": i, "pad": "y" * 200}) for i in range(50)]
    assert engine.flush()
    assert len(on_disk(engine)) == 55
    for job_id in queued:
        engine.cancel(job_id)
    assert engine.flush()
    assert len(on_disk(engine)) == 5


def test_adoption_trims_history_to_the_limit(make_engine, registry, tmp_path):
    quick_registry(registry)
    state = tmp_path / "state"
    jobs = [entry(f"h-{i}", "t.quick", "completed", result=i, finished_at=2000.0 + i, progress=1.0,
                  seq=i) for i in range(10)]
    jobs.append(entry("q-1", "t.quick", "queued", seq=99))
    write_file(state, sidecar_doc(jobs))
    engine = make_engine(state_dir=state, history_limit=3)
    assert engine.wait(["q-1"], timeout=10)
    assert engine.flush()
    kept = [j.id for j in engine.jobs() if j.is_terminal]
    assert kept[0] == "q-1" and kept[1:] == ["h-9", "h-8"]  # newest first
    assert set(on_disk(engine)) == set(kept)
    with pytest.raises(KeyError):
        engine.get("h-0")


def test_release_of_a_finished_job_is_refused(make_engine, registry, tmp_path):
    quick_registry(registry)
    engine = make_engine(state_dir=tmp_path / "state")
    job_id = engine.submit("t.quick")
    assert engine.wait([job_id], timeout=10)
    with pytest.raises(InvalidStateError):
        engine.release(job_id)


@pytest.mark.timeout(30)
def test_large_result_of_a_rerun_job_is_the_rerun_result(make_engine, registry, tmp_path):
    runs: list[int] = []
    gate = threading.Event()

    def handler(ctx, params):
        runs.append(len(runs) + 1)
        run = len(runs)
        if run == 1:
            assert gate.wait(10)
        return {"run": run, "blob": "r" * (INLINE_RESULT_MAX + 1000)}

    registry.register(KindSpec(name="t.bigres", handler=handler, resumable=True))
    work = tmp_path / "work"
    first = make_engine(state_dir=tmp_path / "a", work_dir=work)
    job_id = first.submit("t.bigres")
    poll(lambda: runs, 10, "the first run to start")
    crashed_copy(first, tmp_path / "b")  # the file as it was while the job ran...
    gate.set()
    assert first.wait([job_id], timeout=10) and first.flush()  # ...its result.json written
    first.shutdown()

    second = make_engine(state_dir=tmp_path / "b", work_dir=work)  # adopts the crashed copy
    assert second.wait([job_id], timeout=10)
    assert second.get(job_id).result["run"] == 2
    assert second.flush()
    ref = on_disk(second)[job_id]["result"]
    assert json.loads(Path(ref["$file"]).read_text(encoding="utf-8"))["run"] == 2


@pytest.mark.timeout(60)
def test_engines_adopting_at_once_take_each_job_once(tmp_path):
    """Claiming is an atomic rename: of engines starting together, one adopts each file."""
    state = tmp_path / "state"
    for n in range(3):
        write_file(state, sidecar_doc([entry(f"c{n}-{i}", "t.quick", "queued", seq=i) for i in range(5)],
                                      owner=dead_owner(f"t{n}")), f"queue-{n + 1}-dead.json")
    registry = KindRegistry()
    quick_registry(registry)
    barrier = threading.Barrier(4)
    engines: list[Engine] = []
    errors: list[BaseException] = []

    def start_one(i: int) -> None:
        engine = Engine(EngineConfig(state_dir=state, log_dir=tmp_path / "logs", console_log=False,
                                     max_workers=1), registry=registry)
        engine.pause()
        engines.append(engine)
        barrier.wait()
        try:
            engine.start()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start_one, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        adopted = [j.id for e in engines for j in e.jobs()]
        assert sorted(adopted) == sorted(f"c{n}-{i}" for n in range(3) for i in range(5))
        sources = [s for e in engines if e.recovery for s in e.recovery.sources]
        assert sorted(sources) == [f"queue-{n + 1}-dead.json" for n in range(3)]
        for e in engines:
            assert e.flush()
        assert not list(state.glob(f"*{CLAIM_MARK}*"))
    finally:
        for e in engines:
            e.shutdown(timeout=2)


@pytest.mark.timeout(60)
def test_shutdown_with_a_failing_writer_returns(make_engine, registry, tmp_path):
    quick_registry(registry)
    writer = BrokenWriter(errno.ENOSPC)
    writer.broken.clear()
    engine = make_engine(state_dir=tmp_path / "state", sidecar_writer=writer)
    engine.pause()
    job_id = engine.submit("t.quick")
    assert engine.flush()
    good = engine.sidecar_path.read_bytes()
    writer.broken.set()
    engine.submit("t.quick")
    engine.shutdown(timeout=2)  # returns; the error is reported, not raised
    assert engine.stats().write_error is not None
    assert engine.sidecar_path.read_bytes() == good  # the last good file is intact
    assert job_id in {j["id"] for j in json.loads(good)["jobs"]}
