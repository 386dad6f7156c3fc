"""Demo kinds that behave like the real thing: a frame-by-frame render and an AI
generation call with stages. They only sleep, so the demo runs anywhere."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

from ..engine import JobContext, job_kind


class DemoRender(BaseModel):
    frames: int = Field(12, ge=1, le=10_000, description="frames to render")
    seconds_per_frame: float = Field(0.15, ge=0, le=60)
    fail_at_frame: Optional[int] = Field(None, ge=1, description="raise an error at this frame")


@job_kind("demo.render", params=DemoRender, resumable=True, remote_ok=True)
def render(ctx: JobContext, params: DemoRender) -> dict:
    """Render frames one by one (pretend), checkpointing each, resumable after a crash."""
    start = (ctx.resume_from or {}).get("frames_done", 0)
    if start:
        ctx.log.info("resuming render", from_frame=start + 1)
    for frame in range(start + 1, params.frames + 1):
        ctx.progress((frame - 1) / params.frames, stage=f"frame {frame}/{params.frames}")
        ctx.sleep(params.seconds_per_frame)
        if params.fail_at_frame == frame:
            raise RuntimeError(f"the render engine crashed on frame {frame} (out of VRAM)")
        ctx.checkpoint({"frames_done": frame})
    return {"frames": params.frames, "resumed_from": start}


class DemoGenerate(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=2000)
    steps: int = Field(20, ge=1, le=200)
    seconds_per_step: float = Field(0.08, ge=0, le=60)
    fail_attempts: int = Field(0, ge=0, description="fail this many attempts (a flaky backend)")


@job_kind("demo.generate", params=DemoGenerate, max_concurrency=2)
def generate(ctx: JobContext, params: DemoGenerate) -> dict:
    """Pretend to call an image-generation backend: upload, denoise steps, download."""
    ctx.progress(0.0, stage="upload", message=f"prompt: {params.prompt[:40]}")
    ctx.sleep(params.seconds_per_step * 2)
    if ctx.attempt <= params.fail_attempts:
        raise ConnectionError(f"backend returned HTTP 503 (attempt {ctx.attempt})")
    for step in range(1, params.steps + 1):
        ctx.progress(step / (params.steps + 1), stage=f"denoise {step}/{params.steps}")
        ctx.sleep(params.seconds_per_step)
    ctx.progress(1.0, stage="download")
    out = ctx.workdir / "image.txt"
    out.write_text(f"(an image of {params.prompt})\n", encoding="utf-8")
    return {"image": str(out), "steps": params.steps}


# A mixed batch: priorities, a failure with a traceback, a timeout, a flaky backend
# that succeeds on retry, and a long job to cancel (index 5). Used by the demo and
# by the panel's "Add Demo Jobs" button.
DEMO_BATCH: list[dict] = [
    {"kind": "demo.render", "label": "Hero shot", "params": {"frames": 24}, "priority": "high"},
    {"kind": "demo.generate", "label": "Texture: rusty metal",
     "params": {"prompt": "rusty metal, 4k, seamless"}},
    {"kind": "demo.generate", "label": "Flaky backend (retries)",
     "params": {"prompt": "a teapot", "fail_attempts": 1, "steps": 10}, "max_retries": 2},
    {"kind": "demo.render", "label": "Broken scene", "params": {"frames": 10, "fail_at_frame": 4}},
    {"kind": "demo.render", "label": "Too slow (timeout)",
     "params": {"frames": 50, "seconds_per_frame": 0.2}, "timeout": 2.0},
    {"kind": "demo.render", "label": "Turntable", "params": {"frames": 40}, "priority": "low"},
    {"kind": "demo.generate", "label": "Concept: castle",
     "params": {"prompt": "castle on a cliff", "steps": 15}, "priority": "urgent"},
    {"kind": "demo.render", "label": "Preview (low)", "params": {"frames": 8}, "priority": 9},
]


# A stand-in for an external tool (an encoder, a converter) for ``process.run``:
# it prints its progress as "NN%" lines, which the job's progress_regex reads.
_TOOL = (
    "import sys, time\n"
    "steps = int(sys.argv[1])\n"
    "for i in range(steps + 1):\n"
    "    print(f'encoding chunk {i}/{steps}: {100 * i // steps}%', flush=True)\n"
    "    time.sleep(0.1)\n"
)


def external_jobs(python: str) -> list[dict]:
    """Demo jobs that run real programs: ``python`` (an interpreter) stands in for
    an external tool, so the demo needs nothing that is not already there."""
    return [
        {"kind": "process.run", "label": "Encode preview (external tool)",
         "params": {"argv": [python, "-c", _TOOL, "20"], "progress_regex": r"(?P<percent>\d+)%"}},
        {"kind": "process.run", "label": "Broken tool (fails)",
         "params": {"argv": [python, "-c", "import sys; print('reading input.mov'); "
                             "sys.exit('error: input.mov is not a video file')"]}},
    ]
