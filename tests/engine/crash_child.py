"""Child process (and shared job kinds) for tests/engine/test_crash.py.

Run as ``python crash_child.py --state-dir D --log L [--mode submit|adopt|idle]
[--trigger none|after_flush|midwrite:tmp_half|midwrite:before_rename|midwrite:after_rename]``.
It runs an Engine on ``D`` until it is killed (SIGKILL from the test), printing
protocol lines on stdout:

* ``READY {"ids": [...], "flushed": true, "sidecar": ...}`` after submitting (and
  flushing) the jobs, before any of them may run;
* ``SUBMITTED <id> <time.monotonic()>`` (mode trickle): one line per submit as it returns;
* ``ADOPTED {...recovery...}`` in adopt mode, after start() adopted and flushed;
* ``FLUSHED <resumable id> <plain id>`` (trigger after_flush): a resumable job
  checkpointed step 2 and a plain job step 1, flush() returned, and both (and
  every other handler) are frozen until the kill;
* ``MIDWRITE <phase> <n completed in payload>`` (trigger midwrite:*): the sidecar
  writer is frozen in the middle of a write.

The job handlers write an independent log (``--log``), one line per event,
appended, flushed and fsynced before the handler goes on:

* ``start <id> <attempt> <resume_from as compact JSON>``
* ``step <id> <n>`` (written before ``ctx.checkpoint({"step": n})``)
* ``end <id>`` (written just before the handler returns its result)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

try:
    import blender_taskqueue  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

RESUMABLE = "crash.resumable"
PLAIN = "crash.plain"
QUICK = "crash.quick"
RESUMABLE_KINDS = frozenset({RESUMABLE})
N_JOBS = 40
STEP_DELAY_S = 0.03
STEPS = {RESUMABLE: 5, PLAIN: 4}


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class LineLog:
    """Append one line per event; open, append, flush and fsync each line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
                fh.flush()
                os.fsync(fh.fileno())


class Hooks:
    """No-op hooks; the child's trigger modes override them."""

    def at_start(self, ctx: object, kind: str) -> None:
        pass

    def after_checkpoint(self, ctx: object, kind: str, n: int) -> None:
        pass


def register_kinds(registry, log_path: Path, *, step_delay: float = STEP_DELAY_S,
                   hooks: Hooks | None = None) -> LineLog:
    """Register the three test kinds on ``registry``; handlers log to ``log_path``."""
    from blender_taskqueue.engine import KindSpec

    log = LineLog(log_path)
    hooks = hooks or Hooks()

    def stepped(ctx, params, kind: str):
        resume = ctx.resume_from
        log.line(f"start {ctx.job_id} {ctx.attempt} {compact(resume)}")
        hooks.at_start(ctx, kind)
        first = int(resume["step"]) + 1 if resume else 1
        for n in range(first, int(params["steps"]) + 1):
            ctx.sleep(step_delay)
            log.line(f"step {ctx.job_id} {n}")
            ctx.checkpoint({"step": n})
            hooks.after_checkpoint(ctx, kind, n)
        log.line(f"end {ctx.job_id}")
        return {"id": ctx.job_id, "steps": int(params["steps"]), "tag": params.get("tag")}

    def resumable(ctx, params):
        return stepped(ctx, params, RESUMABLE)

    def plain(ctx, params):
        return stepped(ctx, params, PLAIN)

    def quick(ctx, params):
        log.line(f"start {ctx.job_id} {ctx.attempt} {compact(ctx.resume_from)}")
        hooks.at_start(ctx, QUICK)
        ctx.sleep(0.005)
        log.line(f"end {ctx.job_id}")
        return {"id": ctx.job_id, "tag": params.get("tag")}

    registry.register(KindSpec(name=RESUMABLE, handler=resumable, resumable=True))
    registry.register(KindSpec(name=PLAIN, handler=plain, resumable=False))
    registry.register(KindSpec(name=QUICK, handler=quick, resumable=False))
    return log


def job_specs(n: int = N_JOBS) -> list[dict]:
    """Forty generation jobs: the first three (high priority) are slow, the rest a mix."""
    kinds = [RESUMABLE, QUICK, PLAIN, QUICK, RESUMABLE, QUICK, PLAIN, QUICK]
    priorities = ["normal", "low", 6, "normal", 4]
    specs = []
    for i in range(n):
        if i < 3:
            kind, priority = [RESUMABLE, PLAIN, RESUMABLE][i], "high"
        else:
            kind, priority = kinds[i % len(kinds)], priorities[i % len(priorities)]
        params = {"tag": i}
        if kind in STEPS:
            params["steps"] = STEPS[kind]
        specs.append({"kind": kind, "params": params, "priority": priority, "label": f"gen {i}"})
    return specs


_out_lock = threading.Lock()


def emit(text: str) -> None:
    with _out_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def block_forever() -> None:
    while True:
        time.sleep(60)


class AfterFlushHooks(Hooks):
    """Freeze the run in a known state: resumable at step 2, plain at step 1, flushed."""

    def __init__(self) -> None:
        self.engine = None
        self.lock = threading.Lock()
        self.plain_id = None
        self.plain_ready = threading.Event()
        self.resumable_id = None
        self.frozen = threading.Event()

    def at_start(self, ctx, kind):
        if self.frozen.is_set():
            block_forever()

    def after_checkpoint(self, ctx, kind, n):
        if self.frozen.is_set():
            block_forever()
        if kind == PLAIN and n == 1:
            with self.lock:
                mine = self.plain_id is None
                if mine:
                    self.plain_id = ctx.job_id
            if mine:
                self.plain_ready.set()
                block_forever()  # stays running with partial result {"step": 1}
        if kind == RESUMABLE and n == 2:
            with self.lock:
                mine = self.resumable_id is None
                if mine:
                    self.resumable_id = ctx.job_id
            if mine:
                self.plain_ready.wait(30)
                self.frozen.set()
                ok = self.engine.flush()
                emit(f"FLUSHED {ctx.job_id} {self.plain_id} {ok}")
                block_forever()


def midwrite_writer(phase: str, threshold: int = 3):
    """A sidecar writer that freezes once, in ``phase`` of the first write whose
    payload holds ``threshold`` completed jobs; other writes are the real ones."""
    from blender_taskqueue.engine.store import write_atomic

    done = threading.Event()

    def writer(path: Path, payload: bytes) -> None:
        completed = sum(j.get("state") == "completed" for j in json.loads(payload)["jobs"])
        if done.is_set() or completed < threshold:
            write_atomic(path, payload)
            return
        done.set()
        tmp = path.with_name(f".{path.name}.tmp")
        if phase == "after_rename":
            write_atomic(path, payload)
        else:
            with open(tmp, "wb") as fh:
                fh.write(payload if phase == "before_rename" else payload[: len(payload) // 2])
                fh.flush()
                os.fsync(fh.fileno())
        emit(f"MIDWRITE {phase} {completed}")
        block_forever()

    return writer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--log", required=True, type=Path)
    ap.add_argument("--mode", default="submit", choices=["submit", "adopt", "idle", "trickle"])
    ap.add_argument("--trigger", default="none")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=N_JOBS)
    ap.add_argument("--lifetime", type=float, default=120.0)
    args = ap.parse_args()

    # Never outlive a test that forgot us.
    threading.Timer(args.lifetime, lambda: os._exit(3)).start()

    from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry

    hooks: Hooks = Hooks()
    writer = None
    if args.trigger == "after_flush":
        hooks = AfterFlushHooks()
    elif args.trigger.startswith("midwrite:"):
        writer = midwrite_writer(args.trigger.split(":", 1)[1])
    elif args.trigger != "none":
        ap.error(f"unknown trigger {args.trigger}")

    registry = KindRegistry()
    register_kinds(registry, args.log, hooks=hooks)
    config = EngineConfig(
        max_workers=args.workers,
        state_dir=args.state_dir,
        log_dir=args.state_dir.parent / f"child-logs-{os.getpid()}",
        console_log=False,
    )
    engine = Engine(config, registry=registry, sidecar_writer=writer)
    if isinstance(hooks, AfterFlushHooks):
        hooks.engine = engine

    if args.mode in ("submit", "idle"):
        engine.pause()  # nothing runs until every job is queued and durable
        engine.start()
        ids = engine.submit_many(job_specs(args.jobs))
        ok = engine.flush()
        emit("READY " + json.dumps({"ids": ids, "flushed": ok, "sidecar": str(engine.sidecar_path),
                                    "pid": os.getpid()}))
        if args.mode == "submit":
            engine.resume()
    elif args.mode == "trickle":
        # Submit one job at a time while the queue runs; each line is printed after
        # submit() returned, with the (system-wide) monotonic time it returned at.
        engine.start()
        emit("READY " + json.dumps({"ids": [], "sidecar": str(engine.sidecar_path), "pid": os.getpid()}))
        for spec in job_specs(args.jobs):
            job_id = engine.submit(spec["kind"], spec["params"], priority=spec["priority"],
                                   label=spec["label"])
            emit(f"SUBMITTED {job_id} {time.monotonic()!r}")
            time.sleep(0.02)  # the workload's pace, not a synchronisation
        emit("ALL-SUBMITTED")
    else:
        engine.start()
        ok = engine.flush()
        rec = engine.recovery
        emit("ADOPTED " + json.dumps({
            "flushed": ok,
            "sidecar": str(engine.sidecar_path),
            "recovery": None if rec is None else {
                k: getattr(rec, k) for k in
                ("sources", "requeued", "resumed", "interrupted", "held", "finished",
                 "duplicates", "moved_aside", "problems")
            },
        }))
    block_forever()


if __name__ == "__main__":
    main()
