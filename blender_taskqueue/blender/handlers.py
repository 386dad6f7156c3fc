"""The queue inside the .blend: written on save, restored on open.

On save the whole queue goes into a Scene string property (JSON, the sidecar's
schema). Opening a file restores the jobs this session does not know yet:
unfinished ones come back held (a file from elsewhere must never start jobs by
itself) unless the file is trusted (Blender's Auto Run Python Scripts) and the
auto-resume preference is on. Ids already known are not adopted twice.

Trust follows Blender's own rule for the file's path (``trust.is_trusted``: Auto
Run Python Scripts on and the file's folder not in Excluded Paths). A render job
restored from a file that is not trusted also loses any ``trusted: true`` param,
so the .blend it renders opens with its scripts off.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import bpy
from bpy.app.handlers import persistent

from ..engine.store import SidecarError
from ..kinds import render
from . import preferences, runtime, trust


def file_is_trusted() -> bool:
    """Whether Blender's auto-run rule trusts the open file, from its path: Auto Run
    Python Scripts on, the file's folder in none of the Excluded Paths, and no
    --disable-autoexec on Blender's command line. False for a file never saved,
    one whose scripts Blender just blocked, and whenever something cannot be read
    (when in doubt, held)."""
    try:
        prefs = bpy.context.preferences
        if prefs is None or bpy.app.autoexec_fail or _autoexec_disabled_by_command_line():
            return False
        excluded = [(str(entry.path), bool(entry.use_glob)) for entry in prefs.autoexec_paths]
        return trust.is_trusted(
            bpy.data.filepath, bool(prefs.filepaths.use_scripts_auto_execute), excluded,
            windows=sys.platform == "win32",
        )
    except Exception:  # a preference that is not there (an old Blender), say
        return False


def _autoexec_disabled_by_command_line() -> bool:
    """``blender -Y`` / ``--disable-autoexec`` overrides the preference for the session."""
    argv = list(getattr(sys, "argv", None) or [])
    if "--" in argv:
        argv = argv[: argv.index("--")]  # what follows belongs to the script
    return "--disable-autoexec" in argv or "-Y" in argv


@persistent
def save_pre(*_args: Any) -> None:
    pump = runtime.pump()
    if pump is None:
        return
    document = json.dumps(pump.engine.export_state(), separators=(",", ":"))
    for scene in bpy.data.scenes:
        scene.taskqueue_saved = ""  # type: ignore[attr-defined]
    target = bpy.context.scene or (bpy.data.scenes[0] if bpy.data.scenes else None)
    if target is not None:
        target.taskqueue_saved = document  # type: ignore[attr-defined]


@persistent
def load_post(*_args: Any) -> None:
    pump = runtime.pump()
    if pump is None:
        return
    prefs = preferences.preferences()
    auto = bool(prefs.auto_resume) if prefs is not None else False
    trusted = file_is_trusted()
    hold = not (auto and trusted)
    name = bpy.path.basename(bpy.data.filepath) or "the opened file"
    for scene in bpy.data.scenes:
        raw = scene.taskqueue_saved  # type: ignore[attr-defined]
        if not raw:
            continue
        try:
            document = json.loads(raw)
            if not trusted:
                trust.reset_trusted(document, render.KIND)
            recovery = pump.engine.import_state(document, source=name, hold=hold)
        except (ValueError, SidecarError) as exc:
            pump.mirror.notices.append((0.0, "error", f"The queue saved in {name} is damaged: {exc}"))
            continue
        if recovery.adopted:
            pump.mirror.recovery = recovery
    pump.clear_rows()  # loading replaced the WindowManager and its rows
    pump.tick()


def register() -> None:
    if save_pre not in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.append(save_pre)
    if load_post not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(load_post)


def unregister() -> None:
    for handlers, fn in ((bpy.app.handlers.load_post, load_post), (bpy.app.handlers.save_pre, save_pre)):
        while fn in handlers:
            handlers.remove(fn)
