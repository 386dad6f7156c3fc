"""Child process for test_cluster.py: an engine on a state folder with a dask
cluster, submitting one ``cl.steps`` job (``--submit LOG``) or adopting what the
folder holds (``--adopt``). Protocol lines: ``REMOTE <key>`` once the job's
remote key is on disk; ``DONE <state> <json>`` when the job ends."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster_kinds  # noqa: E402,F401

from blender_taskqueue.engine import Engine, EngineConfig  # noqa: E402


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--submit", default=None)
    args = ap.parse_args()
    engine = Engine(EngineConfig(state_dir=args.state_dir, log_dir=args.state_dir / "logs",
                                 console_log=False, cluster=args.cluster,
                                 cluster_modules=("cluster_kinds",)))
    engine.start()
    if args.submit:
        job_id = engine.submit("cl.steps", {"n": 40, "delay": 0.05, "log": args.submit})
    else:
        job_id = engine.jobs()[0].id
    said = False
    while True:
        info = engine.get(job_id)
        remote = (info.partial_result or {}).get("$remote")
        if remote and not said and (info.partial_result or {}).get("done"):
            engine.flush()
            say(f"REMOTE {remote}")
            said = True
        if info.state.is_terminal:
            say(f"DONE {info.state.value} {json.dumps(info.result if info.error is None else info.error.message)}")
            engine.shutdown()
            return 0
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
