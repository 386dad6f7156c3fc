"""The panel's list rows and the queue's copy saved inside the .blend.

Live state stays off the Scene: the UIList rows live on the WindowManager
(never saved, no undo steps, no dirty file) and hold only job ids; everything
else is read from the pump's plain-Python mirror when a row is drawn. The
Scene gets the queue only when the file is saved.
"""

from __future__ import annotations

from typing import Callable

import bpy

STATE_FILTERS = [
    ("ALL", "All", "Every job"),
    ("ACTIVE", "Active", "Queued and running jobs"),
    ("RUNNING", "Running", "Running jobs"),
    ("QUEUED", "Queued", "Queued and held jobs"),
    ("FAILED", "Problems", "Failed and interrupted jobs"),
    ("FINISHED", "Finished", "Completed, failed, cancelled and interrupted jobs"),
]


class TASKQUEUE_PG_job(bpy.types.PropertyGroup):
    """One UIList row: a job id (``name`` holds the label, for the list's name filter)."""

    job_id: bpy.props.StringProperty(name="Job", options={"SKIP_SAVE"})  # type: ignore[valid-type]


class TASKQUEUE_PG_state(bpy.types.PropertyGroup):
    jobs: bpy.props.CollectionProperty(type=TASKQUEUE_PG_job)  # type: ignore[valid-type]
    active_index: bpy.props.IntProperty(name="Selected Job", default=-1)  # type: ignore[valid-type]
    filter_state: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="Show", items=STATE_FILTERS, default="ALL",
    )


classes = (TASKQUEUE_PG_job, TASKQUEUE_PG_state)
_register_classes: Callable[[], None]
_unregister_classes: Callable[[], None]
_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)  # type: ignore[func-returns-value, misc]


def register() -> None:
    _register_classes()
    bpy.types.WindowManager.taskqueue = bpy.props.PointerProperty(type=TASKQUEUE_PG_state)  # type: ignore[attr-defined, func-returns-value]
    bpy.types.Scene.taskqueue_saved = bpy.props.StringProperty(  # type: ignore[attr-defined, func-returns-value]
        name="Saved Task Queue",
        description="The task queue as it was when this file was saved (JSON)",
        options={"HIDDEN"},
    )


def unregister() -> None:
    del bpy.types.Scene.taskqueue_saved  # type: ignore[attr-defined]
    del bpy.types.WindowManager.taskqueue  # type: ignore[attr-defined]
    _unregister_classes()
