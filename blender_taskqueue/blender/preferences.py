"""Add-on preferences: worker and memory limits, queue bounds, state folder, logging.

Every change applies live through ``Engine.configure``, except the state folder,
which the next start uses (moving a live queue between folders would split it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import bpy

from .. import api
from ..engine import EngineConfig

BASE_PACKAGE = __package__.rpartition(".")[0]  # "bl_ext.<repo>.blender_taskqueue"


def default_state_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("blender_taskqueue", appauthor=False))


def preferences(context: Optional[Any] = None) -> Optional["TASKQUEUE_AddonPreferences"]:
    ctx = context or bpy.context
    addon = ctx.preferences.addons.get(BASE_PACKAGE)  # type: ignore[union-attr]
    return addon.preferences if addon is not None else None  # type: ignore[return-value]


def _apply(self: "TASKQUEUE_AddonPreferences", context: Any) -> None:
    self.apply_addon_settings()
    engine = api.shared_engine_or_none()
    if engine is None:
        return
    try:
        engine.configure(**self.engine_changes())
    except ValueError as exc:  # a bad combination: keep the engine as it was, say why
        print(f"blender_taskqueue: preferences not applied: {exc}")


class TASKQUEUE_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = BASE_PACKAGE

    workers: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Workers", description="Jobs that run at the same time",
        default=4, min=1, max=8, update=_apply,
    )
    min_free_memory_mb: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Keep Free (MB)",
        description="New jobs wait while the machine has less free memory than this (0: off)",
        default=1024, min=0, soft_max=65536, update=_apply,
    )
    max_memory_mb: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Blender Memory Limit (MB)",
        description="New jobs wait while Blender uses more memory than this (0: off)",
        default=0, min=0, soft_max=262144, update=_apply,
    )
    max_queued: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Queue Limit", description="Queued jobs before new submissions are refused",
        default=10_000, min=1, max=1_000_000, update=_apply,
    )
    history_limit: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="History", description="Finished jobs kept in the list",
        default=500, min=0, max=100_000, update=_apply,
    )
    auto_resume: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Resume Automatically",
        description=(
            "Run recovered jobs without asking: after a crash, and from trusted .blend files "
            "(Blender's Auto Run Python Scripts). Otherwise they wait for Release"
        ),
        default=True, update=_apply,
    )
    state_dir: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="State Folder",
        description="Where the queue is kept between sessions (empty: your user state folder). "
        "Used from the next start",
        subtype="DIR_PATH", default="",
    )
    blender_path: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Blender for Renders",
        description="The Blender that background renders run (empty: this Blender)",
        subtype="FILE_PATH", default="", update=_apply,
    )
    comfyui_servers: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="ComfyUI Servers",
        description="ComfyUI server URLs, comma-separated; generations spread over them, "
        "one at a time on each (empty: http://127.0.0.1:8188)",
        default="",
    )
    comfyui_token: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="ComfyUI Token",
        description="Bearer token for servers behind an authenticating proxy. Kept in the "
        "preferences only: never in a job, the queue's files or a .blend",
        subtype="PASSWORD", default="", update=_apply,
    )
    cluster: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Dask Cluster",
        description="Scheduler address (tcp://host:8786) for kinds that may run remotely; empty: "
        "this machine only. Needs the dask extra (pip install dask[distributed]) here and on the "
        "workers, which must have this package installed",
        default="", update=_apply,
    )
    cluster_fallback_local: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Run Locally When Unreachable",
        description="While the cluster cannot be reached, run its jobs here instead of failing them",
        default=False, update=_apply,
    )
    cluster_tls_ca_file: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Cluster CA", description="TLS: the certificate authority file (empty: no TLS)",
        subtype="FILE_PATH", default="", update=_apply,
    )
    cluster_tls_cert: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Cluster Certificate", description="TLS: this client's certificate file",
        subtype="FILE_PATH", default="", update=_apply,
    )
    cluster_tls_key: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Cluster Key", description="TLS: this client's private key file",
        subtype="FILE_PATH", default="", update=_apply,
    )
    refresh_hz: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Progress Refresh (Hz)",
        description=(
            "How often the panel redraws for progress alone; state changes always show at "
            "once. Lower it if the viewport stutters while jobs run (software drawing)"
        ),
        default=10, min=1, max=10, update=_apply,
    )
    log_level: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="Log Level",
        items=[(x, x.title(), f"Log {x.lower()} and above") for x in ("DEBUG", "INFO", "WARNING", "ERROR")],
        default="INFO", update=_apply,
    )

    def engine_changes(self) -> dict[str, Any]:
        """The live-changeable EngineConfig fields these preferences set."""
        return {
            "max_workers": int(self.workers),
            "min_free_memory_mb": int(self.min_free_memory_mb) or None,
            "max_memory_mb": int(self.max_memory_mb) or None,
            "max_queued": int(self.max_queued),
            "history_limit": int(self.history_limit),
            "auto_resume": bool(self.auto_resume),
            "log_level": str(self.log_level),
            "cluster": self.cluster.strip() or None,
            "cluster_fallback_local": bool(self.cluster_fallback_local),
            "cluster_tls_ca_file": bpy.path.abspath(self.cluster_tls_ca_file) or None,
            "cluster_tls_cert": bpy.path.abspath(self.cluster_tls_cert) or None,
            "cluster_tls_key": bpy.path.abspath(self.cluster_tls_key) or None,
        }

    def apply_addon_settings(self) -> None:
        """The settings that belong to the add-on, not the engine: the Blender that
        renders, and the panel's refresh rate."""
        from ..kinds import comfyui, render
        from . import runtime

        comfyui.set_default_token(self.comfyui_token or None)
        render.set_default_blender(bpy.path.abspath(self.blender_path) if self.blender_path else None)
        pump = runtime.pump()
        if pump is not None:
            pump.progress_interval_s = 1.0 / max(1, int(self.refresh_hz))

    def engine_config(self) -> EngineConfig:
        state = Path(bpy.path.abspath(self.state_dir)) if self.state_dir else default_state_dir()
        changes = self.engine_changes()
        try:
            return EngineConfig(state_dir=state, **changes)
        except ValueError as exc:  # e.g. a mistyped cluster address: start without the cluster
            print(f"blender_taskqueue: cluster settings not applied: {exc}")
            return EngineConfig(state_dir=state, **{k: v for k, v in changes.items()
                                                    if not k.startswith("cluster")})

    def draw(self, context: Any) -> None:
        layout = self.layout
        layout.use_property_split = True
        col = layout.column(heading="Limits")
        col.prop(self, "workers")
        col.prop(self, "max_queued")
        col.prop(self, "history_limit")
        col = layout.column(heading="Memory")
        col.prop(self, "min_free_memory_mb")
        col.prop(self, "max_memory_mb")
        col = layout.column(heading="Recovery")
        col.prop(self, "auto_resume")
        col.prop(self, "state_dir")
        engine = api.shared_engine_or_none()
        if engine is not None and engine.sidecar_path is not None:
            col.label(text=f"Now: {engine.sidecar_path.parent}", icon="FILE_FOLDER")
        col = layout.column(heading="Panel")
        col.prop(self, "refresh_hz")
        col = layout.column(heading="Renders")
        col.prop(self, "blender_path")
        col = layout.column(heading="Scale-Out")
        col.prop(self, "cluster")
        if self.cluster:
            col.prop(self, "cluster_fallback_local")
            col.prop(self, "cluster_tls_ca_file")
            col.prop(self, "cluster_tls_cert")
            col.prop(self, "cluster_tls_key")
        col = layout.column(heading="Generation")
        col.prop(self, "comfyui_servers")
        col.prop(self, "comfyui_token")
        layout.prop(self, "log_level")
        if engine is not None and engine.log_path is not None:
            layout.label(text=f"Log: {engine.log_path}", icon="TEXT")


classes = (TASKQUEUE_AddonPreferences,)
register, unregister = bpy.utils.register_classes_factory(classes)  # type: ignore[func-returns-value, misc]
