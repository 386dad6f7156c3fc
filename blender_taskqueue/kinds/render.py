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
  ``process.run`` does (its process tree, its group and every process carrying
  the job's environment marker);
* the result lists the written files, in frame order.

Scripts in the file. The child opens the .blend with Python auto-execution off
(``--disable-autoexec``; for a Python with the ``bpy`` module, ``use_scripts=False``)
unless the job's ``trusted`` param is True, and ``--enable-autoexec`` is never
passed: a trusted job leaves it to the child Blender's own preference. Only the
Blender layer sets ``trusted``, for a file Blender's own rules trusted (Auto Run
Python Scripts on, the file not in an excluded folder); a job that comes from
another file's saved queue says ``trusted`` in its description, which is what a
person reads before releasing it (``describe``).

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
    trusted: bool = Field(
        False,
        description=(
            "the file may run its own Python scripts (drivers, registered text blocks); "
            "only the Blender layer sets it, for a file Blender itself trusts. False (the "
            "default) starts the child with --disable-autoexec"
        ),
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
    pid and start time, so a reused pid is never touched, and by the environment
    marker its processes carry, which finds those that left its tree too.
    """
    if not isinstance(child, dict):
        return
    procs: dict[int, psutil.Process] = {}
    marker = child.get("marker")
    if isinstance(marker, str) and marker:
        procs.update((p.pid, p) for p in process.marked_processes(marker))
    proc: Optional[psutil.Process] = None
    try:
        found = psutil.Process(int(child["pid"]))
        if abs(found.create_time() - float(child.get("started", 0))) <= 0.01:
            proc = found  # else the pid was reused by some other process
    except (psutil.Error, ValueError, TypeError, KeyError):
        pass
    if proc is not None:
        procs.update((p.pid, p) for p in [proc, *process.group_members(proc.pid)])
        try:
            procs.update((p.pid, p) for p in proc.children(recursive=True))
        except psutil.Error:
            pass
    if not procs:
        return
    ctx.log.warning("stopping the background Blender left by the interrupted run",
                    pids=sorted(procs))
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
        "trusted": params.trusted,
    }


def command(executable: str, params: BlenderRender, args_file: Path) -> list[str]:
    """The child's argv: ``blender -b [--disable-autoexec] file --python driver --
    args.json``, or, for a Python with the bpy module, ``python driver -- args.json``
    (the driver opens the file, with scripts off unless ``trusted``). The arguments
    go in a file: a resumed range lists every frame it keeps, more than one argument
    may hold (128 KiB on Linux, 32 KiB a command on Windows). ``--disable-autoexec``
    comes before the file, as Blender applies its options in order; our own
    ``--python`` driver runs either way."""
    payload = str(args_file)
    if is_python(executable):
        return [executable, str(DRIVER), "--", payload]
    argv = [executable, "-b"]
    if params.factory_startup:
        argv.append("--factory-startup")
    if params.trusted is not True:
        argv.append("--disable-autoexec")
    return argv + [str(params.blend_file), "--python", str(DRIVER), "--", payload]


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
    marker = process.new_marker(ctx.job_id)  # in the checkpoint, for stop_leftover

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
        warning = f" (WARNING: {'; '.join(output.warnings)})" if output.warnings else ""
        if stage is None:
            _, _, line = output.snapshot()
            ctx.progress(None, message=f"{line or ''}{warning}".strip() or None)
            return
        ctx.progress(fraction, stage=stage, message=f"{message}{warning}")
        if done != written[0]:
            written[0] = done
            save(state.files())

    def started(pid: int) -> None:
        try:
            child.update(pid=pid, started=psutil.Process(pid).create_time(), marker=marker)
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
        on_line=state.on_line, publish=publish, on_start=started, marker=marker,
    )
    files = state.files()
    child.clear()
    save(files)
    where = f"{len(files)} of {state.total or '?'} frames written to {output_dir}"
    log = f"{done.log_path}{done.output.log_note()}"
    if done.stop == "cancel":
        raise JobCancelled(f"render cancelled; {where}")
    if done.stop == "timeout":
        raise process.ProcessTimeout(
            f"render timed out after {params.timeout_s:g} s (timeout_s); {where}. Log: {log}"
        )
    if state.error is not None:
        raise RenderFailed(f"{state.error}\n{where}. Log: {log}")
    if done.code != 0 or len(files) != state.total or not state.total:
        tail = "\n".join(list(done.output.tail)[-process.ERROR_TAIL_LINES:])
        how = f"exited with code {done.code}" if done.code else "exited early"
        raise RenderFailed(
            f"the background Blender {how}; {where}.\nLast output:\n{tail}\nLog: {log}"
        )
    warning = f" (WARNING: {'; '.join(done.warnings)})" if done.warnings else ""
    ctx.progress(1.0, stage=f"frame {state.total}/{state.total}", message=where + warning)
    if params.blend_is_copy:
        # A copy made for this job alone: kept while the job can still fail and be
        # retried or resumed, removed once it is complete.
        try:
            os.unlink(params.blend_file)
        except OSError as exc:
            ctx.log.warning("could not remove the rendered copy", path=params.blend_file, error=str(exc))
    result: dict[str, Any] = {
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
    if done.warnings:
        result["warnings"] = done.warnings
    if done.output.log_error is not None:
        result["log_error"] = done.output.log_error
    return result


_EXTENSIONS = {
    "PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "OPEN_EXR": ".exr",
    "OPEN_EXR_MULTILAYER": ".exr", "WEBP": ".webp", "TARGA": ".tga",
}


def _blender_source(explicit: Any) -> str:
    """Which of ``find_blender``'s choices applies (the same order)."""
    if explicit:
        return "named by the job's own 'blender' param"
    if _default_blender:
        return "the add-on preference"
    if os.environ.get(BLENDER_ENV):
        return f"${BLENDER_ENV}"
    if sys.modules.get("bpy") is not None:
        return "the Blender this runs in"
    return "'blender' on Blender's PATH"


def _frames_text(p: dict) -> str:
    def num(name: str) -> Optional[str]:
        value = p.get(name)
        return None if value is None else process.show(value)

    if p.get("frame") is not None:
        return f"frame {num('frame')}"
    start, end = num("frame_start") or "the scene's first", num("frame_end") or "the scene's last"
    step = num("frame_step") or "the scene's"
    return f"frames {start} to {end}, step {step}"


def _output_text(p: dict) -> str:
    out = p.get("output_dir")
    prefix = p.get("file_prefix", "frame_")
    fmt = p.get("format", "PNG")
    ext = _EXTENSIONS.get(fmt, "") if isinstance(fmt, str) else ""
    ext_text = ext or (" (the scene's file type)" if fmt is None else f" ({process.show(fmt)})")
    if out is None:
        folder = "<the job's own folder>/frames"
    elif isinstance(out, str) and out.startswith("//"):
        base = p.get("relative_base")
        if not isinstance(base, str):
            blend = p.get("blend_file")
            base = str(Path(blend).parent) if isinstance(blend, str) else "<the .blend's folder>"
        folder = os.path.join(base, out[2:])
    else:
        folder = process.show(out) if not isinstance(out, str) else os.path.expanduser(out)
    name = f"{prefix}####" if isinstance(prefix, str) else f"{process.show(prefix)}####"
    return f"writes the frames to {os.path.join(folder, name)}{ext_text} (#### = the frame number)"


def describe(params: dict) -> list[str]:
    """What a ``blender.render`` job with these (JSON) params will do, in full: the
    program (resolved now, as the job would), every argument, the .blend it opens,
    whether the file's own scripts may run, where the frames go, the folder and the
    environment, the timeout. Never raises, whatever the params (a hostile file's
    may not even validate: that is said first)."""
    p = params if isinstance(params, dict) else {}
    lines: list[str] = []
    problem = process.validation_problem(BlenderRender, p)
    if problem is not None:
        lines.append(f"WARNING: these params do not validate, the job would fail: {problem}")
    explicit = p.get("blender")
    if explicit is not None:
        lines.append(
            f"WARNING: the job names the program to run itself (blender = {process.show(explicit)}): "
            "whatever that program is, it runs with the arguments below"
        )
    executable: Optional[str] = None
    try:
        executable = find_blender(explicit if isinstance(explicit, str) else None)
    except (ValueError, OSError) as exc:
        lines.append(f"runs Blender: none can be found now ({exc})")
    python = executable is not None and is_python(executable)
    if executable is not None:
        what = "a Python with the bpy module" if python else "Blender"
        lines.append(f"runs {what}: {executable} ({_blender_source(explicit)})")
    blend = p.get("blend_file")
    trusted = p.get("trusted") is True
    model = BlenderRender.model_construct(
        blend_file=blend if isinstance(blend, str) else process.show(blend),
        factory_startup=p.get("factory_startup") is True, trusted=trusted,
    )
    argv = command(executable or "<blender>", model, Path("<the job's own folder>") / "render-args.json")
    lines.append(f"with {len(argv)} arguments (argv, in full):")
    lines += [f"  argv[{i}] = {process.show(arg)}" for i, arg in enumerate(argv)]
    lines.append(f"opens the .blend {process.show(blend)}")
    if trusted:
        lines.append(
            "WARNING: trusted = true: the file's own Python scripts (drivers, text blocks that "
            "register) may run, as far as the child Blender's Auto Run preference allows"
        )
    else:
        how = "use_scripts=False" if python else "--disable-autoexec"
        lines.append(f"the file's own Python scripts do not run (autoexec disabled: {how})")
    lines.append(_output_text(p))
    lines.append(_frames_text(p))
    lines.append("overwrites frame files already there" if p.get("overwrite", True) is not False
                 else "keeps frame files already there")
    settings = [f"{name} = {process.show(p[name])}"
                for name in ("scene", "engine", "format", "samples", "resolution_percentage")
                if p.get(name) is not None]
    if settings:
        lines.append("render settings: " + ", ".join(settings))
    lines.append("compositor File Output nodes in the file write where the file says"
                 + (f" ('//' there meaning {process.show(p.get('relative_base'))})"
                    if p.get("relative_base") is not None else ""))
    if p.get("blend_is_copy") is True:
        lines.append(f"WARNING: DELETES {process.show(blend)} once every frame is written "
                     "(blend_is_copy = true)")
    folder = str(Path(blend).parent) if isinstance(blend, str) else "<the .blend's folder>"
    lines.append(f"in the folder {folder}")
    lines += process.describe_env({CHILD_ENV: "1"})
    lines.append(f"writes {process.LOG_NAME} and render-args.json in the job's own folder")
    timeout = p.get("timeout_s")
    lines.append("no timeout of its own: runs until it is done or cancelled" if timeout is None
                 else f"stopped after {process.seconds(timeout)} s (timeout_s), with everything it started")
    known = set(BlenderRender.model_fields)
    for name in sorted(str(k) for k in p if k not in known):
        lines.append(f"unknown param {name} = {process.show(p.get(name))}")
    return lines


# One spec for the shared registry (importing this module registers the kind there)
# and for any other registry a test or a bench passes to register().
SPEC = KindSpec(
    name=KIND,
    handler=render,
    params=BlenderRender,
    resumable=True, out_of_process=True,
    description=(render.__doc__ or "").strip().splitlines()[0],
    describe=describe,
)
shared_registry.register(SPEC)


def register(registry: KindRegistry) -> KindSpec:
    """Add the kind to ``registry`` (importing this module already added it to the
    shared one)."""
    return registry.register(SPEC)
