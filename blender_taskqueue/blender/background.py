"""Render the open file in the background, and find a job's output on disk.

``render_current_file`` saves a copy of the open file (``copy=True``: the user's
file, its path and its unsaved state are untouched) and queues a
``blender.render`` job on that copy, so Blender stays free while a background
Blender renders. The frames go where the scene's output path says, as a render
from Blender would. The copy is made before the job exists, because the kind
checks at submit that its file exists: it goes to ``copies/`` beside the jobs'
work folders, the job's params name it, and it is deleted once every frame is
written (or swept once no listed job renders it). The copy's own scripts may
run in the background Blender only when Blender's rule trusts the open file
(``handlers.file_is_trusted``: the job's ``trusted`` param); otherwise it renders
with ``--disable-autoexec``.

The job's log and output folder, and the tail of the log, are what the panel's
details show for jobs that run external programs.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import bpy

from ..kinds import process, render
from . import runtime

MB = 1024 * 1024
TAIL_LINES = 6
TAIL_BYTES = 8192
TAIL_REFRESH_S = 0.5
_BUFFERS = 8  # float RGBA buffers a render keeps per pixel (combined, passes, display)

_tails: dict[str, tuple[float, int, int, list[str]]] = {}  # "lines:path" -> (checked, mtime, size, lines)
EXISTS_REFRESH_S = 1.0
_checked: dict[str, tuple[float, bool]] = {}  # "file:/path" -> (checked, exists)


def estimate_memory_mb(scene: Any) -> int:
    """What a background Blender rendering ``scene`` will need, roughly: what this
    Blender uses now (it holds the same data) plus the render's float buffers."""
    import psutil

    used = psutil.Process().memory_info().rss / MB
    r = scene.render
    scale = r.resolution_percentage / 100.0
    pixels = r.resolution_x * scale * r.resolution_y * scale
    return int(used + pixels * 4 * 4 * _BUFFERS / MB) + 1


def save_copy(engine: Any, name: Optional[str] = None) -> Path:
    """Save a copy of the open file to the work folder's ``copies/``; return its path."""
    current = bpy.data.filepath
    stem = Path(current).stem if current else "untitled"
    folder = engine.workdir_for("copies")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{name or stem}-{stamp}-{secrets.token_hex(2)}.blend"
    result = bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True, check_existing=False)
    if "FINISHED" not in (result or ()) or not path.is_file():
        raise RuntimeError(f"could not save a copy of the open file to {path}")
    return path


def render_current_file(
    *,
    frame: Optional[int] = None,
    frame_start: Optional[int] = None,
    frame_end: Optional[int] = None,
    scene: Optional[str] = None,
    output_dir: Optional[str] = None,
    format: Optional[str] = "PNG",
    engine: Optional[str] = None,
    samples: Optional[int] = None,
    resolution_percentage: Optional[int] = None,
    label: Optional[str] = None,
    priority: Union[int, str] = "normal",
    memory_mb: Union[int, str, None] = "auto",
    trusted: Optional[bool] = None,
    **options: Any,
) -> str:
    """Queue a background render of the open file; return the job id.

    Takes ``blender.render``'s params (``frame``, ``frame_start``/``frame_end``,
    ``scene``, ``output_dir``, ``format``, ...). ``memory_mb="auto"`` reserves this
    Blender's memory plus the render buffers, so two big renders never start
    together; None reserves nothing. ``trusted=None`` lets the file's own scripts
    run in the background Blender only if Blender trusts the open file (Auto Run
    Python Scripts on, its folder not excluded); True or False decides it. Other
    keywords go to ``submit`` (``timeout``, ``max_retries``, ``held``).
    """
    queue = runtime.engine()
    scene_obj = bpy.data.scenes.get(scene) if scene else bpy.context.scene
    if scene_obj is None:
        names = ", ".join(repr(s.name) for s in bpy.data.scenes)
        raise ValueError(f"no scene named {scene!r} in the open file (it has {names})")
    prefix = None
    if output_dir is None:
        output_dir, prefix = scene_output(scene_obj)
    elif output_dir.startswith("//"):
        # '//' means next to the user's file, not next to the copy.
        if not bpy.data.filepath:
            raise ValueError("output_dir '//...' needs the file to be saved first")
        output_dir = os.path.abspath(bpy.path.abspath(output_dir))
    if memory_mb == "auto":
        memory_mb = estimate_memory_mb(scene_obj)
    elif isinstance(memory_mb, str):
        raise ValueError(f"memory_mb must be 'auto', a number of MB or None, got {memory_mb!r}")
    params: dict[str, Any] = {
        "frame": frame, "frame_start": frame_start, "frame_end": frame_end,
        "scene": scene_obj.name, "output_dir": output_dir, "format": format, "engine": engine,
        "samples": samples, "resolution_percentage": resolution_percentage,
        "blend_is_copy": True,
        "trusted": _file_is_trusted() if trusted is None else trusted is True,
        # '//' in the copy (a compositor File Output node, say) means the user's folder.
        "relative_base": os.path.dirname(bpy.data.filepath) if bpy.data.filepath else None,
    }
    if prefix:
        params["file_prefix"] = prefix
    name = Path(bpy.data.filepath).stem if bpy.data.filepath else "untitled"
    copy = save_copy(queue, name)
    try:
        job = queue.submit(
            render.KIND, {**params, "blend_file": str(copy)},
            priority=priority, label=label or f"Render {name} ({_frames_text(params, scene_obj)})",
            memory_mb=memory_mb, **options,
        )
    except BaseException:
        copy.unlink(missing_ok=True)  # bad params or a full queue: no copy left behind
        raise
    runtime.poke()
    return job


def _file_is_trusted() -> bool:
    from . import handlers

    return handlers.file_is_trusted()


def scene_output(scene: Any) -> tuple[Optional[str], Optional[str]]:
    """The folder and file name prefix of the scene's own output path (Output
    Properties > Output), where a render from Blender would go; (None, None) when it
    has none, or when it is relative ('//') to a file never saved (then the job's
    work folder is used)."""
    path = scene.render.filepath
    if not path or (path.startswith("//") and not bpy.data.filepath):
        return None, None
    absolute = bpy.path.abspath(path)
    if absolute.endswith(("/", "\\")):  # a folder (Blender's default "/tmp/"): no prefix of its own
        folder, name = absolute, ""
    else:
        folder, name = os.path.split(absolute)
    folder = os.path.abspath(folder)  # "/tmp\\" on Windows gets its drive
    prefix = "".join(c for c in name if c not in '#/\\\0:*?"<>|')
    return (folder or None), (prefix or None)


def _frames_text(params: dict, scene: Any) -> str:
    if params["frame"] is not None:
        return f"frame {params['frame']}"
    start = scene.frame_start if params["frame_start"] is None else params["frame_start"]
    end = scene.frame_end if params["frame_end"] is None else params["frame_end"]
    return f"frames {start}-{end}"


# ---- a job's files


def _exists(path: Path, kind: str) -> bool:
    """``path.is_file()`` / ``is_dir()`` for a redraw: cached for a second, and False
    instead of an error for a folder that cannot be read or a share that is gone."""
    key = f"{kind}:{path}"
    now = time.monotonic()
    cached = _checked.get(key)
    if cached is not None and now - cached[0] < EXISTS_REFRESH_S:
        return cached[1]
    try:
        found = path.is_file() if kind == "file" else path.is_dir()
    except OSError:
        found = False
    if len(_checked) > 256:
        _checked.clear()
    _checked[key] = (now, found)
    return found


def log_path(engine: Any, info: Any) -> Optional[Path]:
    """The job's output log, if it has one."""
    path = engine.workdir_for(info.id) / process.LOG_NAME
    return path if _exists(path, "file") else None


def output_dir(engine: Any, info: Any) -> Optional[Path]:
    """Where the job's output is: the ``output_dir`` its result or checkpoint names,
    else its work folder, if either exists."""
    for data in (info.result, info.partial_result):
        if isinstance(data, dict) and isinstance(data.get("output_dir"), str):
            path = Path(data["output_dir"])
            if _exists(path, "dir"):
                return path
    path = engine.workdir_for(info.id)
    return path if _exists(path, "dir") else None


def sweep_copies(engine: Any, min_age_s: float = 60.0) -> int:
    """Delete the saved copies in ``copies/`` that no job the engine still lists
    renders (a cancelled or failed render keeps its copy for a retry until it is
    cleared). A copy younger than ``min_age_s`` may belong to a job being submitted,
    so it stays. Returns how many were deleted."""
    folder = engine.workdir_for("copies")
    try:
        candidates = [p for p in folder.iterdir() if p.suffix == ".blend"]
    except OSError:
        return 0
    wanted = set()
    for info in engine.jobs():
        blend = info.params.get("blend_file") if isinstance(info.params, Mapping) else None
        if isinstance(blend, str):
            wanted.add(os.path.normcase(os.path.abspath(blend)))
    removed = 0
    now = time.time()
    for path in candidates:
        if os.path.normcase(os.path.abspath(path)) in wanted:
            continue
        try:
            if now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of ``path``; re-read at most twice a second
    and only when the file changed (the panel asks on every redraw)."""
    key = f"{lines}:{path}"
    now = time.monotonic()
    cached = _tails.get(key)
    if cached is not None and now - cached[0] < TAIL_REFRESH_S:
        return cached[3]
    try:
        st = path.stat()
    except OSError:
        _tails.pop(key, None)
        return []
    if cached is not None and (cached[1], cached[2]) == (st.st_mtime_ns, st.st_size):
        _tails[key] = (now, cached[1], cached[2], cached[3])
        return cached[3]
    try:
        with open(path, "rb") as f:
            f.seek(max(0, st.st_size - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    found = [line.rstrip() for line in text.split("\n") if line.strip()]
    if st.st_size > TAIL_BYTES and found:
        found = found[1:]  # the first line was cut
    found = found[-lines:]
    if len(_tails) > 64:
        _tails.clear()
    _tails[key] = (now, st.st_mtime_ns, st.st_size, found)
    return found
