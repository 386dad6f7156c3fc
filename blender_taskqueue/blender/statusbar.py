"""A compact progress indicator in the status bar while jobs run, as Blender shows its
own render and bake jobs there: "Task Queue: 2 running · 43%" (a bar in Blender 4.0+,
text before), a button that opens the Task Queue tab of the 3D viewport's sidebar.

Drawing reads only the pump's mirror (what the panel draws too), never the engine.
The status bar is redrawn only when Blender or this module asks: a light timer tags
it when what it would draw has changed (checked every REFRESH_S), so a busy queue
costs one small region redraw at that rate at most, and an idle one nothing.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import bpy

from ..engine import JobState
from . import runtime
from .pump import CATEGORY

REFRESH_S = 0.5  # how often the shown text is compared with the mirror
IDLE_REFRESH_S = 1.0
BAR_UNITS = 5  # the bar's width in UI units (about 100 px at 1x)

_last: Optional[tuple] = None  # what the status bar showed at its last draw (or tag)


def summary(mirror: Any) -> Optional[tuple[int, int, float]]:
    """(running, waiting, mean progress of the running jobs), or None when nothing runs
    or waits to run: the indicator is there only while the queue works."""
    stats = mirror.stats
    if stats is None:
        return None
    waiting = 0 if stats.paused else max(0, stats.queued - stats.held)
    if not stats.running and not waiting:
        return None
    progress = []
    for job_id in mirror.order:  # running jobs come first
        info = mirror.info(job_id)
        if info is None or info.state not in (JobState.RUNNING, JobState.DISPATCHED):
            break
        progress.append(info.progress)
    mean = sum(progress) / len(progress) if progress else 0.0
    return stats.running, waiting, mean


def status_text(shown: tuple[int, int, float], with_percent: bool) -> str:
    running, waiting, mean = shown
    parts = [f"Task Queue: {running} running"]
    if waiting:
        parts.append(f"{waiting} queued")
    if with_percent and running:
        parts.append(f"{mean * 100:.0f}%")
    return " · ".join(parts)


def _shown_now() -> Optional[tuple]:
    pump = runtime.pump()
    if pump is None:
        return None
    shown = summary(pump.mirror)
    # Whole percents: a change below what the bar shows never costs a redraw.
    return None if shown is None else (shown[0], shown[1], round(shown[2] * 100))


def draw(self: Any, context: Any) -> None:
    """Appended to STATUSBAR_HT_header: never blocks, draws nothing when idle."""
    global _last
    pump = runtime.pump()
    shown = summary(pump.mirror) if pump is not None else None
    _last = None if shown is None else (shown[0], shown[1], round(shown[2] * 100))
    if shown is None:
        return
    layout = self.layout
    row = layout.row(align=True)
    has_bar = hasattr(layout, "progress")  # Blender 4.0+
    row.operator("taskqueue.show_panel", text=status_text(shown, not has_bar), icon="SORTTIME",
                 emboss=False)
    if has_bar and shown[0]:
        sub = row.row(align=True)
        sub.ui_units_x = BAR_UNITS
        sub.progress(factor=shown[2], type="BAR", text=f"{shown[2] * 100:.0f}%")


def _tag_statusbar() -> None:
    """Have the status bar redrawn. It is a window's global area, which Python cannot
    reach (``screen.areas`` lacks it); setting the workspace's status text (to none, its
    usual value) tags it, as Blender itself does. Skipped while a modal operator runs
    (4.2+ says so), as its hints in the status text are what the bar shows then."""
    context = bpy.context
    window = getattr(context, "window", None)
    workspace = getattr(context, "workspace", None)
    if window is None or workspace is None or getattr(window, "modal_operators", None):
        return
    workspace.status_text_set_internal(None)


def _refresh() -> Optional[float]:
    try:
        shown = _shown_now()
        if shown != _last:
            _tag_statusbar()
        return REFRESH_S if shown is not None or _last is not None else IDLE_REFRESH_S
    except Exception:  # a timer that raises is dropped by Blender: never let it
        return IDLE_REFRESH_S


def _view3d(context: Any) -> Optional[tuple[Any, Any]]:
    """The largest 3D viewport of the window and its sidebar region."""
    screen = context.window.screen if context.window is not None else None
    if screen is None:
        return None
    areas = [a for a in screen.areas if a.type == "VIEW_3D"]
    if not areas:
        return None
    area = max(areas, key=lambda a: a.width * a.height)
    region = next((r for r in area.regions if r.type == "UI"), None)
    return None if region is None else (area, region)


class TASKQUEUE_OT_show_panel(bpy.types.Operator):
    """Open the Task Queue tab in the 3D viewport's sidebar"""

    bl_idname = "taskqueue.show_panel"
    bl_label = "Show Task Queue"
    bl_options = {"INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[Literal["FINISHED", "CANCELLED"]]:  # type: ignore[override]
        found = _view3d(context)
        if found is None:
            self.report({"WARNING"}, "No 3D Viewport in this window to show the Task Queue in")
            return {"CANCELLED"}
        area, region = found
        area.spaces.active.show_region_ui = True
        area.tag_redraw()
        category = getattr(region, "active_panel_category", None)
        if category in (None, CATEGORY):  # ours, or a Blender that does not say (3.x)
            return {"FINISHED"}
        try:  # writable in some Blenders; read-only in 4.2+
            region.active_panel_category = CATEGORY
            return {"FINISHED"}
        except (AttributeError, TypeError, ValueError):
            pass
        # Python cannot choose the tab here (and a popover of the panel crashes 3.4):
        # the sidebar is open, its tab one click away.
        self.report({"INFO"}, "Task Queue: click its tab in the sidebar (or Ctrl+Tab over the sidebar)")
        return {"FINISHED"}


classes = (TASKQUEUE_OT_show_panel,)


def register() -> None:
    global _last
    _last = None
    for cls in classes:
        bpy.utils.register_class(cls)
    header = getattr(bpy.types, "STATUSBAR_HT_header", None)
    if header is not None:
        header.append(draw)
    if not bpy.app.timers.is_registered(_refresh):
        bpy.app.timers.register(_refresh, first_interval=IDLE_REFRESH_S, persistent=True)


def unregister() -> None:
    if bpy.app.timers.is_registered(_refresh):
        bpy.app.timers.unregister(_refresh)
    header = getattr(bpy.types, "STATUSBAR_HT_header", None)
    if header is not None:
        header.remove(draw)
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
    try:  # the indicator goes at once, not at the status bar's next redraw
        _tag_statusbar()
    except Exception:  # quitting: no window manager left
        pass
