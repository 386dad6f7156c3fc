"""Child process for tests/engine/test_comfyui_crash.py: an engine on a state folder
that submits one ``comfyui.prompt`` job (``--submit URL``) or only adopts what the
folder holds (``--adopt``), then runs until it is killed or the job ends.

Protocol lines on stdout:
* ``SUBMITTED <id>`` once the job is in the sidecar;
* ``CHECKPOINT <phase> <prompt_id>`` each time the job's checkpoint changes, after
  a flush, so the line means "this is on disk";
* ``DONE <state> <json result or error>`` when the job ends (adopt mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import blender_taskqueue  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry
from blender_taskqueue.kinds import comfyui

WORKFLOW = json.loads(comfyui.DEFAULT_WORKFLOW.read_text())


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--submit", default=None)
    parser.add_argument("--adopt", action="store_true")
    args = parser.parse_args()
    registry = KindRegistry()
    comfyui.register(registry)
    engine = Engine(EngineConfig(state_dir=args.state_dir, work_dir=args.state_dir / "work",
                                 log_dir=args.state_dir / "logs", console_log=False),
                    registry=registry)
    engine.start()
    if args.submit:
        job_id = engine.submit(comfyui.KIND, {"server": args.submit, "workflow": WORKFLOW,
                                              "poll_s": 0.1})
        engine.flush()
        say(f"SUBMITTED {job_id}")
    else:
        jobs = engine.jobs()
        if not jobs:
            say("DONE none {}")
            return 1
        job_id = jobs[0].id
    seen = None
    while True:
        info = engine.get(job_id)
        partial = info.partial_result or {}
        key = (partial.get("phase"), partial.get("prompt_id"))
        if key != seen and key[0] is not None:
            engine.flush()
            seen = key
            say(f"CHECKPOINT {key[0]} {key[1]}")
        if info.state.is_terminal:
            detail = info.result if info.error is None else info.error.message
            say(f"DONE {info.state.value} {json.dumps(detail)}")
            engine.shutdown()
            return 0
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
