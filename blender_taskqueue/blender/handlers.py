"""The queue inside the .blend: written on save, restored on open.

On save the whole queue goes into a Scene string property (JSON, the sidecar's
schema). Opening a file restores the jobs this session does not know yet:
unfinished ones come back held (a file from elsewhere must never start jobs by
itself) unless the file is trusted (Blender's Auto Run Python Scripts) and the
auto-resume preference is on. Ids already known are not adopted twice.
"""

from __future__ import annotations

import json
from typing import Any

import bpy
from bpy.app.handlers import persistent

from ..engine.store import SidecarError
from . import preferences, runtime


def file_is_trusted() -> bool:
    prefs = bpy.context.preferences
    return bool(prefs.filepaths.use_scripts_auto_execute) and not bpy.app.autoexec_fail  # type: ignore[union-attr]


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
    hold = not (auto and file_is_trusted())
    name = bpy.path.basename(bpy.data.filepath) or "the opened file"
    for scene in bpy.data.scenes:
        raw = scene.taskqueue_saved  # type: ignore[attr-defined]
        if not raw:
            continue
        try:
            recovery = pump.engine.import_state(json.loads(raw), source=name, hold=hold)
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
