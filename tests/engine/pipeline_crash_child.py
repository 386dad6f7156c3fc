"""Child process for test_pipeline_crash.py: an Engine on ``--state-dir`` that
queues chains of jobs and runs until it is killed (SIGKILL from the test).

Prints ``READY {"chains": [[id, id, id], ...], "later": id, "not_before": t}``
once everything is submitted and flushed. The handler of ``pc.step`` appends
``start <id> <inputs as JSON>`` and ``end <id>`` lines to ``--log`` (flushed and
fsynced), with a short pause between them, so a kill lands mid-chain.
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
    import blender_taskqueue  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry, KindSpec  # noqa: E402

KIND = "pc.step"
CHAINS = 6
LENGTH = 3
STEP_S = 0.04
_lock = threading.Lock()


def make_kind(log: Path) -> KindSpec:
    def step(ctx, params):
        line(log, f"start {ctx.job_id} {json.dumps(ctx.inputs, sort_keys=True, separators=(',', ':'))}")
        time.sleep(STEP_S)
        line(log, f"end {ctx.job_id}")
        return {"by": ctx.job_id, "n": params["n"]}

    return KindSpec(name=KIND, handler=step)


def line(log: Path, text: str) -> None:
    with _lock:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    registry = KindRegistry()
    registry.register(make_kind(Path(args.log)))
    engine = Engine(EngineConfig(max_workers=2, state_dir=Path(args.state_dir), console_log=False,
                                 log_dir=Path(args.state_dir) / "logs"), registry=registry)
    engine.pause()  # everything is queued and on disk before anything runs
    engine.start()
    chains = []
    for c in range(CHAINS):
        chains.append(engine.pipeline([(KIND, {"n": c * 10 + i}) for i in range(LENGTH)]))
    later = engine.submit(KIND, {"n": 999}, depends_on=chains[0][0], not_before=3600)
    engine.flush()
    print("READY " + json.dumps({"chains": chains, "later": later,
                                 "not_before": engine.get(later).not_before}), flush=True)
    engine.resume()
    threading.Event().wait()


if __name__ == "__main__":
    main()
