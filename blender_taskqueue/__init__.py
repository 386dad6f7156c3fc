"""blender_taskqueue: run long jobs on worker threads and keep Blender responsive.

``import blender_taskqueue as tq`` works in plain Python (no bpy). Importing
starts nothing: no threads, timers or handlers. In Blender, ``register()``
starts the add-on's engine and pump; ``unregister()`` undoes all of it.
"""

from __future__ import annotations

import os

from .api import (
    cancel,
    clear_finished,
    configure,
    drain_events,
    engine,
    flush,
    generate,
    dependents,
    get,
    jobs,
    move,
    on_finished,
    pause,
    pipeline,
    pump,
    release,
    render_and_generate,
    render_current_file,
    resume,
    retry,
    run,
    run_main_calls,
    set_engine,
    stats,
    submit,
    submit_many,
    wait,
)
from .engine import (
    PRIORITY_NAMES,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineStats,
    Event,
    InvalidParams,
    InvalidStateError,
    JobCancelled,
    JobContext,
    JobError,
    JobInfo,
    JobNotFound,
    NotPermitted,
    JobState,
    QueueFull,
    TaskQueueError,
    UnknownKind,
    current_context,
    job_kind,
)

__version__ = "0.1.0"

# Read by Blender 3.4 to 4.1, where this loads as a legacy add-on; Blender 4.2+
# reads blender_manifest.toml instead.
bl_info = {
    "name": "Task Queue",
    "author": "blender_taskqueue developers",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "3D Viewport > Sidebar > Task Queue",
    "description": "Run long jobs in the background and keep Blender responsive",
    "category": "System",
}


# Set in the background Blender that a ``blender.render`` job starts: the add-on
# stays unregistered there, so the child never starts a second queue or adopts
# another session's jobs.
CHILD_ENV = "BLENDER_TASKQUEUE_CHILD"
_registered = False


def register() -> None:
    global _registered
    if os.environ.get(CHILD_ENV) == "1":
        return
    from . import blender

    blender.register()
    _registered = True


def unregister() -> None:
    global _registered
    if not _registered:
        return
    from . import blender

    blender.unregister()
    _registered = False


__all__ = [
    "PRIORITY_NAMES",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "Event",
    "InvalidParams",
    "InvalidStateError",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobInfo",
    "JobNotFound",
    "NotPermitted",
    "JobState",
    "QueueFull",
    "TaskQueueError",
    "UnknownKind",
    "cancel",
    "clear_finished",
    "configure",
    "current_context",
    "dependents",
    "drain_events",
    "engine",
    "flush",
    "generate",
    "get",
    "job_kind",
    "jobs",
    "move",
    "on_finished",
    "pause",
    "pipeline",
    "pump",
    "release",
    "render_and_generate",
    "render_current_file",
    "resume",
    "retry",
    "run",
    "run_main_calls",
    "set_engine",
    "stats",
    "submit",
    "submit_many",
    "wait",
]
