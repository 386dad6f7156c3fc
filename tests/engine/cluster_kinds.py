"""Job kinds for tests/engine/test_cluster.py, importable on dask workers (the
tests put this folder on their PYTHONPATH). Each start appends a line to the file
named in its params, fsynced, so a test can count runs across processes."""

from __future__ import annotations

import os
from typing import Any

from blender_taskqueue.engine import KindSpec, registry
from blender_taskqueue.kinds import process


def _log(params: dict, line: str) -> None:
    with open(params["log"], "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def steps(ctx: Any, params: dict) -> dict:
    """n steps of delay seconds, with progress and checkpoints."""
    start = (ctx.resume_from or {}).get("done", 0)
    _log(params, f"start {ctx.job_id} {os.getpid()} {start}")
    n = params["n"]
    for i in range(start + 1, n + 1):
        ctx.sleep(params.get("delay", 0.01))
        ctx.progress(i / n, stage=f"step {i}/{n}")
        ctx.checkpoint({"done": i})
    _log(params, f"end {ctx.job_id}")
    return {"steps": n, "pid": os.getpid()}


def forever(ctx: Any, params: dict) -> None:
    """Runs until asked to stop."""
    _log(params, f"start {ctx.job_id} {os.getpid()} 0")
    while True:
        ctx.sleep(0.02)


def fails(ctx: Any, params: dict) -> None:
    raise ValueError(f"bad input {params.get('what')!r}")


def gather(ctx: Any, params: dict) -> dict:
    """What a pipeline step on a worker got from the jobs it depends on."""
    return {"inputs": dict(ctx.inputs), "pid": os.getpid()}


SPECS = [
    KindSpec("cl.steps", steps, remote_ok=True),
    KindSpec("cl.gather", gather, remote_ok=True),
    KindSpec("cl.forever", forever, remote_ok=True),
    KindSpec("cl.fails", fails, remote_ok=True),
    KindSpec("cl.local", lambda ctx, params: os.getpid()),
    # process.run itself, allowed on the cluster: its tree is stopped on the worker.
    KindSpec("cl.process", process.run_process, params=process.ProcessRun, remote_ok=True),
]
for spec in SPECS:
    registry.register(spec, replace=True)
