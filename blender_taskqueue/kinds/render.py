"""The built-in ``blender.render`` kind: render a saved .blend in a background Blender.

The render never runs inside the user's Blender: a child Blender (``blender -b``)
runs ``_render_driver.py``, which renders frame by frame and reports each one on
stdout; the worker thread only watches it through ``process.watch``. So:

* progress is per frame (stage ``"frame 12/48"``) and per sample where Blender
  prints samples (Cycles' ``Sample 5/16``, Eevee's ``Rendering 5 / 64 samples``);
* every frame is written under a temporary name and renamed into place, so a
  frame file that exists is complete. After a crash the job resumes from its
  checkpoint and skips the frames this job already wrote (their files are newer
  than the job's first start); a retry does the same;
* cancel and timeouts stop the child Blender and anything it started, as
  ``process.run`` does;
* the result lists the written files, in frame order.

Which Blender: the ``blender`` param, else the add-on preference (set through
``set_default_blender``), else ``$BLENDER_TASKQUEUE_BLENDER``, else the Blender
this runs in (``bpy.app.binary_path``), else, inside the ``bpy`` module, this
Python (which then opens the file itself), else ``blender`` on PATH. A path
whose name starts with ``python`` is run as a Python with the ``bpy`` module.

Importing this module registers the kind. Never imports ``bpy`` (it only looks
at it when the caller already has).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal, Optional

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import CHILD_ENV  # set in the child: the add-on stays out of its way there
from ..engine import JobCancelled, JobContext, KindRegistry, KindSpec
from ..engine import registry as shared_registry
from . import process

KIND = "blender.render"
BLENDER_ENV = "BLENDER_TASKQUEUE_BLENDER"
DRIVER = Path(__file__).with_name("_render_driver.py")
TAG = "TASKQUEUE "
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "OPEN_EXR", "OPEN_EXR_MULTILAYER", "WEBP", "TARGA")
_SAMPLE = re.compile(r"\bSample (\d+)/(\d+)|Rendering (\d+) / (\d+) samples")
_PYTHON = re.compile(r"^python[0-9.]*(\.exe)?$", re.IGNORECASE)

_default_blender: Optional[str] = None


class RenderFailed(RuntimeError):
    """The background Blender reported an error or exited with a non-zero code."""


def set_default_blender(path: Optional[str]) -> None:
    """The Blender to use when a job names none (the add-on preference); None or ""
    for the automatic choice."""
    global _default_blender
    _default_blender = path or None


def find_blender(explicit: Optional[str] = None) -> str:
    """The Blender executable ``blender.render`` will run, or raise ``ValueError``."""
    choices: list[tuple[str, Optional[str]]] = [
        ("the job's 'blender' param", explicit),
        ("the add-on preference", _default_blender),
        (f"${BLENDER_ENV}", os.environ.get(BLENDER_ENV)),
    ]
    for source, path in choices:
        if path:
            try:
                return process.resolve_executable(path, None, {})
            except ValueError as exc:
                raise ValueError(f"Blender from {source}: {exc}") from None
    bpy = sys.modules.get("bpy")
    if bpy is not None:
        binary = getattr(getattr(bpy, "app", None), "binary_path", "")
        if binary:
            return str(binary)
        return sys.executable  # the bpy module: this Python renders with it
    found = shutil.which("blender")
    if found is None:
        raise ValueError(
            "no Blender to render with: pass blender='/path/to/blender', set it in the "
            f"add-on preferences or ${BLENDER_ENV}, or put 'blender' on PATH"
        )
    return os.path.abspath(found)


def is_python(executable: str) -> bool:
    """True for a Python interpreter (run with the ``bpy`` module), not a Blender."""
    return bool(_PYTHON.match(Path(executable).name))


class BlenderRender(BaseModel):
    """Params of ``blender.render``. Checked at submit: the file exists, the frames
    make sense, the output folder is absolute and a Blender can be found."""

    model_config = ConfigDict(extra="forbid")

    blend_file: str = Field(..., description="the saved .blend to render")
    output_dir: Optional[str] = Field(
        None, description="absolute, or '//' relative to the .blend; default: the job's workdir"
    )
    frame: Optional[int] = Field(None, description="render this one frame")
    frame_start: Optional[int] = Field(None, description="first frame (default: the scene's)")
    frame_end: Optional[int] = Field(None, description="last frame (default: the scene's)")
    frame_step: Optional[int] = Field(None, ge=1, description="default: the scene's")
    scene: Optional[str] = Field(None, description="scene name (default: the file's active one)")
    format: Optional[Literal[IMAGE_FORMATS]] = Field(  # type: ignore[valid-type]
        "PNG", description="image format; None keeps the scene's (if it is not a movie)"
    )
    engine: Optional[str] = Field(
        None, pattern=r"^[A-Z][A-Z0-9_]*$", description="e.g. BLENDER_WORKBENCH, CYCLES"
    )
    resolution_percentage: Optional[int] = Field(None, ge=1, le=1000)
    samples: Optional[int] = Field(None, ge=1, le=1_000_000)
    file_prefix: str = Field("frame_", max_length=100, description="file name before the number")
    overwrite: bool = Field(True, description="False keeps frame files that already exist")
    blender: Optional[str] = Field(None, description="the Blender executable to run")
    factory_startup: bool = Field(False, description="start the child without user add-ons")
    timeout_s: Optional[float] = Field(None, gt=0)
    grace_s: float = Field(5.0, ge=0, le=60, description="between terminate and kill")
    relative_base: Optional[str] = Field(
        None, description="the folder '//' paths mean, when blend_file is a copy saved elsewhere"
    )
    blend_is_copy: bool = Field(
        False, description="blend_file is a copy made for this job: delete it once every frame is written"
    )

    @field_validator("blend_file")
    @classmethod
    def _blend_exists(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ValueError(f"blend_file {value!r} must be an absolute path")
        if path.suffix.lower() != ".blend":
            raise ValueError(f"blend_file {value!r} is not a .blend file")
        if not path.is_file():
            raise ValueError(f"blend_file {value!r} does not exist")
        return str(path)

    @field_validator("relative_base")
    @classmethod
    def _base_is_absolute(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not Path(value).is_absolute():
            raise ValueError(f"relative_base {value!r} must be an absolute folder")
        return value

    @field_validator("file_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if any(c in value for c in '/\\\0:*?"<>|#'):
            raise ValueError(f"file_prefix {value!r} must be a plain file name part")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "BlenderRender":
        if self.frame is not None and (self.frame_start is not None or self.frame_end is not None):
            raise ValueError("give either frame or frame_start/frame_end, not both")
        if (
            self.frame_start is not None
            and self.frame_end is not None
            and self.frame_end < self.frame_start
        ):
            raise ValueError(
                f"frame_end ({self.frame_end}) is before frame_start ({self.frame_start})"
            )
        if self.output_dir is not None:
            out = self.output_dir
            if not (out.startswith("//") or Path(out).expanduser().is_absolute()):
                raise ValueError(
                    f"output_dir {out!r} must be absolute or start with '//' (relative to the .blend)"
                )
            target = self.resolved_output_dir()
            if target.exists() and not target.is_dir():
                raise ValueError(f"output_dir {out!r} exists and is not a folder")
        find_blender(self.blender)
        return self

    def resolved_output_dir(self) -> Path:
        assert self.output_dir is not None
        if self.output_dir.startswith("//"):
            base = Path(self.relative_base) if self.relative_base else Path(self.blend_file).parent
            return base / self.output_dir[2:]
        return Path(self.output_dir).expanduser()


class _Progress:
    """What the child reported so far. Fed by the output reader thread; read by the
    job's thread when it publishes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames: list[int] = []
        self.total = 0
        self.position = 0  # index (1-based) of the frame being rendered
        self.frame: Optional[int] = None
        self.samples: Optional[tuple[int, int]] = None
        self.saved: dict[int, str] = {}
        self.skipped: dict[int, str] = {}
        self.rendered: list[int] = []  # saved in this attempt
        self.error: Optional[str] = None
        self.plan: dict[str, Any] = {}

    def on_line(self, stream: str, line: str) -> None:
        if line.startswith(TAG):
            try:
                event = json.loads(line[len(TAG):])
            except ValueError:
                return
            if not isinstance(event, dict):
                return  # not ours: a scene script printing something that looks alike
            with self.lock:
                try:
                    self._event(event)
                except (AttributeError, KeyError, TypeError, ValueError):
                    pass
            return
        m = _SAMPLE.search(line)
        if m is not None:
            done, total = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            with self.lock:
                self.samples = (int(done), int(total))

    def _event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "plan":
            self.plan = event
            self.frames = list(event.get("frames", []))
            self.total = len(self.frames)
        elif kind == "frame":
            self.frame = event.get("frame")
            self.position = event.get("index", 0)
            self.samples = None
        elif kind == "skip":
            self.skipped[event["frame"]] = event["path"]
            self.saved[event["frame"]] = event["path"]
        elif kind == "saved":
            self.saved[event["frame"]] = event["path"]
            if event["frame"] not in self.rendered:
                self.rendered.append(event["frame"])
            self.samples = None
        elif kind == "error":
            self.error = event.get("message") or "unknown error"
            if event.get("traceback"):
                self.error += "\n" + event["traceback"].rstrip()

    def view(self) -> tuple[Optional[float], Optional[str], Optional[str], int]:
        """(fraction, stage, message, frames done) for the job's progress."""
        with self.lock:
            if not self.total:
                return None, None, None, 0
            done = len(self.saved)
            fraction = done / self.total
            if self.samples and self.samples[1] > 0 and done < self.total:
                fraction += min(self.samples[0] / self.samples[1], 1.0) / self.total
            position = min(max(self.position, done), self.total) or 1
            stage = f"frame {position}/{self.total}"
            if self.frame is None or done == self.total:
                message = f"{done} of {self.total} frames written"
            else:
                message = f"rendering frame {self.frame}"
                if self.samples:
                    message += f", sample {self.samples[0]}/{self.samples[1]}"
            if self.skipped:
                message += f" ({len(self.skipped)} kept from before)"
            return min(fraction, 1.0), stage, message, done

    def files(self) -> list[str]:
        with self.lock:
            return [self.saved[f] for f in self.frames if f in self.saved]


def stop_leftover(ctx: JobContext, child: Optional[dict]) -> None:
    """Stop the background Blender an earlier run of this job left behind.

    The child watches its parent and exits when it dies, but only between frames
    if Blender holds Python's lock while it renders: after a crash, the old render
    may still be finishing a frame when the job resumes. The checkpoint names it by
    pid and start time, so a reused pid is never touched.
    """
    if not child or not child.get("pid"):
        return
    try:
        proc = psutil.Process(int(child["pid"]))
        if abs(proc.create_time() - float(child.get("started", 0))) > 0.01:
            return  # the pid was reused by some other process
    except (psutil.Error, ValueError, TypeError):
        return
    ctx.log.warning("stopping the background Blender left by the interrupted run", pid=proc.pid)
    procs = {p.pid: p for p in [proc, *process.group_members(proc.pid)]}
    try:
        procs.update((p.pid, p) for p in proc.children(recursive=True))
    except psutil.Error:
        pass
    process.stop_processes(list(procs.values()), grace_s=2.0)


def driver_args(params: BlenderRender, output_dir: Path, since: Optional[float], opens: bool) -> dict:
    """The JSON argument of ``_render_driver.py``."""
    frames = [params.frame] if params.frame is not None else None
    return {
        "open": opens,
        "blend_file": params.blend_file,
        "scene": params.scene,
        "engine": params.engine,
        "format": params.format,
        "resolution_percentage": params.resolution_percentage,
        "samples": params.samples,
        "frames": frames,
        "frame_start": params.frame_start,
        "frame_end": params.frame_end,
        "frame_step": params.frame_step,
        "output_dir": str(output_dir),
        "file_prefix": params.file_prefix,
        "overwrite": params.overwrite,
        "since": since,
        "relative_base": params.relative_base,
    }


def command(executable: str, params: BlenderRender, args_file: Path) -> list[str]:
    """The child's argv: ``blender -b file --python driver -- args.json``, or, for a
    Python with the bpy module, ``python driver -- args.json`` (the driver opens the
    file). The arguments go in a file: a resumed range lists every frame it keeps,
    more than one argument may hold (128 KiB on Linux, 32 KiB a command on Windows)."""
    payload = str(args_file)
    if is_python(executable):
        return [executable, str(DRIVER), "--", payload]
    argv = [executable, "-b"]
    if params.factory_startup:
        argv.append("--factory-startup")
    return argv + [params.blend_file, "--python", str(DRIVER), "--", payload]


def render(ctx: JobContext, params: BlenderRender) -> dict:
    """Render frames of a saved .blend in a background Blender; resumable per frame."""
    resume = ctx.resume_from or {}
    resuming = "since" in resume
    stop_leftover(ctx, resume.get("child"))
    executable = resume.get("blender") if resuming and params.blender is None else None
    if not executable or not os.path.isfile(executable):
        executable = find_blender(params.blender)  # a resume keeps the Blender it began with
    output_dir = (
        params.resolved_output_dir() if params.output_dir is not None else ctx.workdir / "frames"
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    # Frame files newer than `since` (or listed in the checkpoint) were written by this
    # job; a resume or a retry keeps them. A first run renders every frame.
    since = resume["since"] if resuming else time.time()
    kept = [f for f in resume.get("files", []) if isinstance(f, str)]
    child: dict[str, Any] = {}

    def save(files: list[str]) -> None:
        ctx.checkpoint({"since": since, "output_dir": str(output_dir), "blender": executable,
                        "files": files, "child": child or None})

    save(kept)
    ctx.progress(0.0 if not resuming else None, stage="starting Blender",
                 message=f"{Path(params.blend_file).name} -> {output_dir}")
    state = _Progress()
    written = [0]

    def publish(output: process._Output) -> None:
        fraction, stage, message, done = state.view()
        if stage is None:
            _, _, line = output.snapshot()
            ctx.progress(None, message=line)
            return
        ctx.progress(fraction, stage=stage, message=message)
        if done != written[0]:
            written[0] = done
            save(state.files())

    def started(pid: int) -> None:
        try:
            child.update(pid=pid, started=psutil.Process(pid).create_time())
        except psutil.Error:
            return
        save(kept)

    args = driver_args(params, output_dir, since if resuming else None, is_python(executable))
    args["keep"] = kept
    args_file = ctx.workdir / "render-args.json"
    args_file.write_text(json.dumps(args), encoding="utf-8")
    done = process.watch(
        ctx, command(executable, params, args_file), executable=executable,
        cwd=str(Path(params.blend_file).parent), env={CHILD_ENV: "1"},
        timeout_s=params.timeout_s, grace_s=params.grace_s,
        on_line=state.on_line, publish=publish, on_start=started,
    )
    files = state.files()
    child.clear()
    save(files)
    where = f"{len(files)} of {state.total or '?'} frames written to {output_dir}"
    if done.stop == "cancel":
        raise JobCancelled(f"render cancelled; {where}")
    if done.stop == "timeout":
        raise process.ProcessTimeout(
            f"render timed out after {params.timeout_s:g} s (timeout_s); {where}. Log: {done.log_path}"
        )
    if state.error is not None:
        raise RenderFailed(f"{state.error}\n{where}. Log: {done.log_path}")
    if done.code != 0 or len(files) != state.total or not state.total:
        tail = "\n".join(list(done.output.tail)[-process.ERROR_TAIL_LINES:])
        how = f"exited with code {done.code}" if done.code else "exited early"
        raise RenderFailed(
            f"the background Blender {how}; {where}.\nLast output:\n{tail}\nLog: {done.log_path}"
        )
    ctx.progress(1.0, stage=f"frame {state.total}/{state.total}", message=where)
    if params.blend_is_copy:
        # A copy made for this job alone: kept while the job can still fail and be
        # retried or resumed, removed once it is complete.
        try:
            os.unlink(params.blend_file)
        except OSError as exc:
            ctx.log.warning("could not remove the rendered copy", path=params.blend_file, error=str(exc))
    return {
        "files": files,
        "frames": state.frames,
        "rendered": list(state.rendered),
        "kept": sorted(state.skipped),
        "output_dir": str(output_dir),
        "scene": state.plan.get("scene"),
        "engine": state.plan.get("engine"),
        "blender": state.plan.get("blender"),
        "log": str(done.log_path),
        "duration_s": round(done.duration_s, 3),
    }


# One spec for the shared registry (importing this module registers the kind there)
# and for any other registry a test or a bench passes to register().
SPEC = KindSpec(
    name=KIND,
    handler=render,
    params=BlenderRender,
    resumable=True, out_of_process=True,
    description=(render.__doc__ or "").strip().splitlines()[0],
)
shared_registry.register(SPEC)


def register(registry: KindRegistry) -> KindSpec:
    """Add the kind to ``registry`` (importing this module already added it to the
    shared one)."""
    return registry.register(SPEC)
