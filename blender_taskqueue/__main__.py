"""``python -m blender_taskqueue demo``: a batch of demo jobs with live progress.

Headless and bpy-free: it shows what the panel shows, in the terminal.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .engine import Engine, EngineConfig, JobInfo, JobState

_ICONS = {
    JobState.SUBMITTED: "·",
    JobState.QUEUED: "…",
    JobState.DISPATCHED: "→",
    JobState.RUNNING: "▶",
    JobState.COMPLETED: "✔",
    JobState.FAILED: "✖",
    JobState.CANCELLED: "⊘",
    JobState.INTERRUPTED: "!",
}


def _bar(fraction: float, width: int = 20) -> str:
    full = int(round(fraction * width))
    return "█" * full + "░" * (width - full)


def _row(info: JobInfo) -> str:
    eta = f"{info.eta_seconds:4.1f}s" if info.eta_seconds else "     "
    attempt = f"{info.attempt}/{info.max_retries + 1}" if info.max_retries else "   "
    held = " held" if info.held else ""
    detail = info.stage or ""
    if info.message and (info.state is not JobState.COMPLETED):
        detail = f"{detail}  {info.message}" if detail else info.message
    if info.cancel_pending:
        detail = f"{detail}  (cancelling…)"
    return (
        f"{_ICONS[info.state]} {info.label[:22]:<22} {info.state.value:<11}{held} "
        f"{_bar(info.progress)} {info.progress * 100:5.1f}% {eta} {attempt} {detail[:60]}"
    )


_SCENE_SCRIPT = (
    "import bpy, sys\n"
    "s = bpy.context.scene\n"
    "s.render.resolution_x, s.render.resolution_y = 160, 90\n"
    "s.frame_start, s.frame_end = 1, 8\n"
    "s.render.engine = 'BLENDER_WORKBENCH'\n"
    "bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])\n"
)


def _short(result: object) -> object:
    """A result for one terminal line: long lists as a count and their ends."""
    if not isinstance(result, dict):
        return result
    out = {}
    for key, value in result.items():
        if isinstance(value, list) and len(value) > 3:
            first, last = (Path(v).name if isinstance(v, str) else v for v in (value[0], value[-1]))
            value = f"{len(value)} ({first} … {last})"
        out[key] = value
    return out


def _demo_scene(folder: Path) -> Optional[Path]:
    """A tiny saved scene for the demo's background render, made by the Blender that
    will render it; None (and a note) when there is no Blender to render with."""
    from .kinds import render

    try:
        blender = render.find_blender()
    except ValueError as exc:
        print(f"(no background render in this demo: {exc})")
        return None
    path = folder / "demo-scene.blend"
    try:
        subprocess.run(
            [blender, "-b", "--factory-startup", "--python-expr", _SCENE_SCRIPT, "--", str(path)],
            check=True, capture_output=True, timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"(no background render in this demo: {blender} could not save a scene: {exc})")
        return None
    return path


def demo(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blender_taskqueue demo")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--state-dir", type=Path, default=None, help="keep the queue here")
    args = parser.parse_args(argv)

    from .kinds import process, render  # noqa: F401  (registers process.run, blender.render)
    from .kinds.demo import DEMO_BATCH, external_jobs  # importing registers the demo.* kinds

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="taskqueue-demo-"))
    engine = Engine(
        EngineConfig(max_workers=args.workers, state_dir=state_dir, log_dir=state_dir / "logs",
                     console_log=False)
    )
    engine.start()
    ids = engine.submit_many(DEMO_BATCH)
    ids += engine.submit_many(external_jobs(sys.executable))
    scene = _demo_scene(state_dir)
    if scene is not None:
        ids.append(engine.submit(
            "blender.render", {"blend_file": str(scene), "engine": "BLENDER_WORKBENCH"},
            label="Background render (Blender)",
        ))
    cancel_id = ids[5]
    engine.move(ids[7], "top")  # within its band: still runs last, by priority
    tty = sys.stdout.isatty()
    drawn = 0
    cancelled = False
    start = time.monotonic()
    print(f"blender_taskqueue demo: {len(ids)} jobs on {args.workers} workers "
          f"(queue kept in {state_dir})\n")
    while True:
        infos = engine.jobs()
        stats = engine.stats()
        if not cancelled and engine.get(cancel_id).progress >= 0.15:
            engine.cancel(cancel_id)
            cancelled = True
        header = (f"queued {stats.queued}  running {stats.running}/{stats.max_workers}  "
                  f"done {stats.completed}  failed {stats.failed}  cancelled {stats.cancelled}  "
                  f"t={time.monotonic() - start:4.1f}s")
        lines = [header] + [_row(i) for i in infos]
        if tty:
            if drawn:
                sys.stdout.write(f"\x1b[{drawn}F")
            sys.stdout.write("\n".join(f"{line}\x1b[K" for line in lines) + "\n")
            sys.stdout.flush()
            drawn = len(lines)
        else:  # not a terminal (CI logs): one line per state change
            for event in engine.drain_events():
                if event.type == "state" and event.info is not None:
                    print(f"{time.monotonic() - start:5.1f}s {_row(event.info)}")
        if all(i.state.is_terminal for i in infos):
            break
        engine.wait(timeout=0.1)
    print("\nFinal:")
    for info in engine.jobs():
        print(" ", _row(info))
        if info.error:
            print(f"      error: {info.error.type}: {info.error.message} (stage {info.error.stage})")
        if info.result:
            print(f"      result: {_short(info.result)}")
    log_path = engine.log_path
    engine.shutdown()
    print(f"\nLog (JSON lines): {log_path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m blender_taskqueue demo [--workers N] [--state-dir DIR]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        return demo(rest)
    print(f"unknown command {command!r}; try: demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
