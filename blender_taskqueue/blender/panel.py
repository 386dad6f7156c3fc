"""The sidebar tab "Task Queue": counts, the job list, and the selected job's details.

Drawing reads only the pump's mirror (plain Python, refreshed on the main thread),
never the engine's lock, so a busy queue cannot slow a redraw.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import bpy

from ..engine import JobInfo, JobState, registry
from ..kinds import render
from . import background, runtime
from .pump import CATEGORY

_S = JobState
STATE_ICONS = {
    _S.SUBMITTED: "TIME",
    _S.QUEUED: "SORTTIME",
    _S.DISPATCHED: "PLAY",
    _S.RUNNING: "PLAY",
    _S.COMPLETED: "CHECKMARK",
    _S.FAILED: "ERROR",
    _S.CANCELLED: "CANCEL",
    _S.INTERRUPTED: "UNLINKED",
}
FILTERS = {
    "ALL": None,
    "ACTIVE": {_S.SUBMITTED, _S.QUEUED, _S.DISPATCHED, _S.RUNNING},
    "RUNNING": {_S.DISPATCHED, _S.RUNNING},
    "QUEUED": {_S.SUBMITTED, _S.QUEUED},
    "FAILED": {_S.FAILED, _S.INTERRUPTED},
    "FINISHED": {_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.INTERRUPTED},
}
NOTICE_SECONDS = 30.0
# A narrow row's share for its bar: room for a stage and an ETA ("frame 6/48 · 7s").
NARROW_BAR_SHARE = 0.5
NARROW_BAR_CHARS = 0.4  # of a sidebar line's characters: what the bar's text has room for


def state_icon(info: JobInfo) -> str:
    if info.held:
        return "PAUSE"
    if info.state is _S.QUEUED and info.waiting_for:
        return "LINKED"
    if info.state is _S.QUEUED and starts_later(info):
        return "TIME"
    return STATE_ICONS[info.state]


def starts_later(info: JobInfo, now: Optional[float] = None) -> bool:
    """A queued job whose ``not_before`` has not come yet."""
    return info.not_before is not None and info.not_before > (time.time() if now is None else now)


def clock_text(at: float, now: Optional[float] = None) -> str:
    """A start time as a person reads it: "14:05" today, "Tue 14:05" this week, else the date."""
    now = time.time() if now is None else now
    when = time.localtime(at)
    if time.strftime("%Y%m%d", when) == time.strftime("%Y%m%d", time.localtime(now)):
        return time.strftime("%H:%M", when)
    if at - now < 6 * 86400:
        return time.strftime("%a %H:%M", when)
    return time.strftime("%Y-%m-%d %H:%M", when)


def waiting_text(info: JobInfo, short: bool = False) -> Optional[str]:
    """Why a queued job waits on its pipeline: "waiting for 2 jobs", "starts 14:05"."""
    if info.waiting_for:
        n = len(info.waiting_for)
        if short:
            return f"after {n}"
        return f"waiting for {n} job" + ("s" if n > 1 else "")
    if starts_later(info):
        assert info.not_before is not None
        return clock_text(info.not_before) if short else f"starts {clock_text(info.not_before)}"
    return None


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None or seconds <= 0:
        return ""
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


def progress_text(info: JobInfo) -> str:
    """What the row's progress bar says: the stage, or the percentage, and the ETA."""
    if info.held:
        return "held"
    if info.state is _S.QUEUED:
        if (info.message or "").startswith("waiting for memory"):
            return "waiting for memory"
        return waiting_text(info) or "queued"
    if info.cancel_pending:
        return "cancelling…"
    if info.state.is_terminal:
        return info.state.value
    parts = [info.stage or f"{info.progress * 100:.0f}%"]
    eta = format_eta(info.eta_seconds)
    if eta:
        parts.append(eta)
    return " · ".join(parts)


def short_progress_text(info: JobInfo) -> str:
    """For a narrow row: the percentage, or one word for what the job waits on."""
    if info.held:
        return "held"
    if info.cancel_pending:
        return "stopping"
    if info.state is _S.QUEUED:
        if (info.message or "").startswith("waiting for memory"):
            return "memory"
        return waiting_text(info, short=True) or "queued"
    if info.state is _S.COMPLETED:
        return "done"
    if info.state.is_terminal:
        return info.state.value
    return f"{info.progress * 100:.0f}%"


def row_label(info: JobInfo) -> str:
    label = info.label
    if info.max_retries and info.attempt:
        label = f"{label} ({info.attempt}/{info.max_retries + 1})"
    return f"› {label}" if info.depends_on else label  # a step of a chain: after another job


_chars_per_line = 28  # updated from the sidebar's width at each draw


def _measure(context: Any) -> int:
    """Characters that fit on one line of the sidebar (about 7 px each at 1x)."""
    global _chars_per_line
    region = getattr(context, "region", None)
    if region is not None and region.width > 1:
        scale = context.preferences.system.ui_scale or 1.0
        _chars_per_line = max(14, int(region.width / (8.0 * scale)) - 5)
    return _chars_per_line


_PATH = re.compile(r"(?<![\w:/\\])(?:[A-Za-z]:)?[\\/][^\s'\"]*[\\/][^\s'\"]*[\\/][^\s'\"]+")


def short_paths(text: str) -> str:
    """Absolute paths cut to their last two parts: the sidebar has room for no more,
    and the Folder and Log buttons open the whole path."""
    return _PATH.sub(lambda m: "…/" + "/".join(re.split(r"[\\/]", m.group(0))[-2:]), text)


def _wrapped(layout: Any, text: str, width: int = 0, icon: str = "NONE", limit: int = 6) -> None:
    lines = textwrap.wrap(text, width or _chars_per_line) or [""]
    for i, line in enumerate(lines[:limit]):
        layout.label(text=line + ("…" if i == limit - 1 and len(lines) > limit else ""),
                     icon=icon if i == 0 else "BLANK1" if icon != "NONE" else "NONE")


def narrow_bar_text(info: JobInfo, chars: int) -> str:
    """A running job's bar in a narrow row: the bar's fill already shows how far, so
    its text says the stage and the ETA ("frame 6/48 · 7s"), or the percentage instead
    of a stage that does not fit."""
    eta = format_eta(info.eta_seconds)
    stage = info.stage or ""
    if not stage or len(stage) + (len(eta) + 3 if eta else 0) > chars:
        stage = f"{info.progress * 100:.0f}%"  # a cut stage reads worse than none
    return f"{stage} · {eta}" if eta else stage


def _progress(layout: Any, info: JobInfo, short: bool = False) -> None:
    factor = 1.0 if info.state is _S.COMPLETED else info.progress
    text = short_progress_text(info) if short else progress_text(info)
    running = info.state in (_S.RUNNING, _S.DISPATCHED) and not info.cancel_pending and not info.held
    if short and running and hasattr(layout, "progress"):
        text = narrow_bar_text(info, int(_chars_per_line * NARROW_BAR_CHARS))
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=factor, type="BAR", text=text)
    elif info.state.is_terminal or info.state is _S.QUEUED or short:  # 3.4-3.6: no bars
        layout.label(text=text)
    else:
        layout.label(text=f"{factor * 100:.0f}% {text}")


class TASKQUEUE_UL_jobs(bpy.types.UIList):
    """The job list: state icon, label (attempt n/m), progress bar with stage and ETA."""

    def draw_item(self, context: Any, layout: Any, data: Any, item: Any, icon: Any,
                  active_data: Any, active_propname: Optional[str], index: Optional[int] = 0,
                  flt_flag: Optional[int] = 0) -> None:
        pump = runtime.pump()
        info = pump.mirror.info(item.job_id) if pump is not None else None
        if info is None:
            layout.label(text=item.name or item.job_id, icon="QUESTION")
            return
        # A narrow row (the sidebar's default width) keeps its width for the label: the
        # right column says the state in a word ("42%", "queued", "failed"), so the state
        # icon goes. A wide sidebar has room for the icon, the stage and the ETA.
        narrow = _measure(context) < 48
        split = layout.split(factor=(1.0 - NARROW_BAR_SHARE) if narrow else 0.5, align=True)
        left = split.row(align=True)
        left.alert = info.state in (_S.FAILED, _S.INTERRUPTED)
        left.label(text=row_label(info), icon="NONE" if narrow else state_icon(info))
        right = split.row(align=True)
        right.alert = left.alert
        _progress(right, info, short=narrow)
        if info.held and info.state is _S.QUEUED:  # each held job can be let go (after a look) or dropped
            right.operator("taskqueue.release", text="", icon="PLAY", emboss=False).job_id = info.id
            right.operator("taskqueue.discard_held", text="", icon="TRASH", emboss=False).job_id = info.id

    def filter_items(self, context: Any, data: Any, propname: str) -> tuple[list[int], list[int]]:  # type: ignore[override]
        rows = getattr(data, propname)
        pump = runtime.pump()
        wanted = FILTERS.get(data.filter_state)
        needle = self.filter_name.lower()
        flags = []
        for row in rows:
            info = pump.mirror.info(row.job_id) if pump is not None else None
            show = info is not None and (wanted is None or info.state in wanted)
            if show and needle and info is not None:
                show = needle in info.label.lower() or needle in info.kind.lower()
            flags.append(self.bitflag_filter_item if show else 0)
        return flags, []


class VIEW3D_PT_taskqueue(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = CATEGORY
    bl_label = "Task Queue"

    def draw(self, context: Any) -> None:
        layout: Any = self.layout
        pump = runtime.pump()
        if pump is None:
            layout.label(text="The queue is not running", icon="ERROR")
            return
        mirror = pump.mirror
        stats = mirror.stats
        state = context.window_manager.taskqueue
        _measure(context)
        if stats is not None:
            self._draw_counts(layout, stats)
        if mirror.recovery is not None:
            self._draw_recovery(layout, mirror.recovery, stats)
        now = time.time()
        for at, level, message in list(mirror.notices)[-2:]:
            if now - at < NOTICE_SECONDS and level in ("warning", "error"):
                box = layout.box()
                box.alert = True
                _wrapped(box, message, icon="ERROR", limit=3)
        if not mirror.order:
            box = layout.box()
            box.label(text="No jobs yet", icon="INFO")
            box.label(text="In the Python console:")
            box.label(text="import blender_taskqueue")
            box.label(text="    as tq")
            box.operator("taskqueue.submit_demo", icon="ADD")
            layout.operator("taskqueue.render_in_background", icon="RENDER_ANIMATION")
            return
        row = layout.row(align=True)
        row.prop(state, "filter_state", text="")
        row = layout.row()
        row.template_list("TASKQUEUE_UL_jobs", "", state, "jobs", state, "active_index", rows=8)
        side = row.column(align=True)
        side.operator("taskqueue.move", text="", icon="TRIA_UP_BAR").where = "top"
        side.operator("taskqueue.move", text="", icon="TRIA_UP").where = "up"
        side.operator("taskqueue.move", text="", icon="TRIA_DOWN").where = "down"
        side.operator("taskqueue.move", text="", icon="TRIA_DOWN_BAR").where = "bottom"
        side.separator()
        side.operator("taskqueue.cancel", text="", icon="X")
        side.operator("taskqueue.retry", text="", icon="FILE_REFRESH")
        row = layout.row(align=True)
        if stats is not None and stats.held:
            row.operator("taskqueue.release", text=f"Release {stats.held} Held", icon="PLAY")
        row.operator("taskqueue.clear_finished", text="Clear Finished", icon="TRASH")
        layout.operator("taskqueue.render_in_background", icon="RENDER_ANIMATION")

    @staticmethod
    def _draw_counts(layout: Any, stats: Any) -> None:
        # Numbers first, and no icons: two columns of "1000 queued" fit the sidebar's
        # default width only without them. Finished jobs are counted as the list has
        # them (cleared ones are gone from both).
        col = layout.column(align=True)
        grid = col.grid_flow(row_major=True, columns=2, even_columns=True, align=True)
        pump = runtime.pump()
        finished = pump.mirror.finished if pump is not None else {}
        grid.label(text=f"{stats.running}/{stats.max_workers} running")
        waiting = stats.queued - stats.held
        grid.label(text=f"{waiting} queued")
        grid.label(text=f"{finished.get(_S.COMPLETED, 0)} done")
        failed = finished.get(_S.FAILED, 0) + finished.get(_S.INTERRUPTED, 0)
        sub = grid.row(align=True)
        sub.alert = failed > 0
        sub.label(text=f"{failed} failed")
        cancelled = finished.get(_S.CANCELLED, 0)
        if stats.held or cancelled:
            grid.label(text=f"{stats.held} held")
            grid.label(text=f"{cancelled} cancelled")
        col.label(text=f"{stats.available_memory_mb / 1024:.1f} GB memory free")
        row = col.row(align=True)
        if stats.paused:
            row.alert = True
            row.operator("taskqueue.resume", text="Paused: Resume", icon="PLAY")
        else:
            row.operator("taskqueue.pause", text="Pause Queue", icon="PAUSE")
        if stats.waiting_for_memory:
            pump = runtime.pump()
            waiting = [
                info for info in (pump.mirror.info(i) for i in pump.mirror.order) if info is not None
                and info.state is _S.QUEUED and (info.message or "").startswith("waiting for memory")
            ] if pump is not None else []
            box = col.box()
            if waiting:
                _wrapped(box, f"'{waiting[0].label}' is {waiting[0].message}", icon="SORTTIME", limit=6)
            else:
                box.label(text="Waiting for free memory", icon="SORTTIME")
        if stats.write_error:
            box = col.box()
            box.alert = True
            _wrapped(box, f"Cannot save the queue: {stats.write_error}", icon="ERROR", limit=3)
        if getattr(stats, "thread_error", None):
            box = col.box()
            box.alert = True
            _wrapped(box, f"Engine error (please report it): {stats.thread_error}", icon="ERROR", limit=3)
        if getattr(stats, "cluster_error", None):
            box = col.box()
            box.alert = True
            _wrapped(box, f"Dask cluster: {stats.cluster_error}", icon="NETWORK_DRIVE", limit=3)

    @staticmethod
    def _draw_recovery(layout: Any, recovery: Any, stats: Any) -> None:
        box = layout.box()
        _wrapped(box, recovery.summary[0].upper() + recovery.summary[1:], icon="RECOVER_LAST", limit=5)
        row = box.row(align=True)
        if stats is not None and stats.held:
            row.operator("taskqueue.release", text="Resume", icon="PLAY")
            row.operator("taskqueue.discard_held", text="Discard", icon="TRASH")
        row.operator("taskqueue.dismiss_notice", text="OK", icon="CHECKMARK")


class VIEW3D_PT_taskqueue_details(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = CATEGORY
    bl_label = "Selected Job"
    bl_parent_id = "VIEW3D_PT_taskqueue"

    @classmethod
    def poll(cls, context: Any) -> bool:
        return runtime.pump() is not None and bool(runtime.selected_job_id())

    def draw(self, context: Any) -> None:
        layout: Any = self.layout
        pump = runtime.pump()
        _measure(context)
        info = pump.mirror.info(runtime.selected_job_id()) if pump is not None else None
        if info is None:
            layout.label(text="The job left the history")
            return
        col = layout.column(align=True)
        _wrapped(col, info.label, icon=state_icon(info), limit=2)
        col.separator()
        if info.error is not None:  # first: it is why a user looks here
            box = layout.box()
            box.alert = True
            err = info.error
            _wrapped(box, f"{err.type}: {err.message}", icon="ERROR", limit=5)
            if err.stage:
                box.label(text=f"Stage: {err.stage}")
            if len(info.errors) > 1:
                box.label(text=f"{len(info.errors)} attempts failed")
            box.operator("taskqueue.show_traceback", icon="TEXT").job_id = info.id
        col = layout.column(align=True)
        col.label(text=f"{info.state.value.title()}" + (" (held)" if info.held else "")
                  + (", cancelling" if info.cancel_pending else ""))
        col.label(text=f"Kind: {info.kind}")
        col.label(text=f"Id: {info.id}")
        col.label(text=f"Priority {info.priority}")
        if pump is not None:
            _pipeline_lines(layout, pump.engine, info)
        attempts = f"attempt {info.attempt} of {info.max_retries + 1}" if info.attempt else "not started"
        col.label(text=attempts + (f" · timeout {info.timeout:g} s" if info.timeout else ""))
        if info.started_at:
            end = info.finished_at or time.time()
            col.label(text=f"Ran {format_eta(end - info.started_at) or '0s'}")
        if not info.state.is_terminal and info.state is not _S.QUEUED:
            _progress(layout, info)
        if info.message and not (info.error is not None and info.state.is_terminal):
            _wrapped(layout.column(align=True), short_paths(info.message), icon="INFO", limit=4)
        if pump is not None:  # what its program printed, and its files: above the params
            _output(layout, pump.engine, info)
        shown = _set_params(info)
        if shown:
            box = layout.box()
            box.label(text="Parameters")
            pcol = box.column(align=True)
            for key, value in shown[:10]:
                pcol.label(text=f"{key}: {_value_text(value)}"[:80])
        if info.result is not None:
            box = layout.box()
            box.label(text="Result", icon="CHECKMARK")
            _result_lines(box, info.result)
        elif info.partial_result:
            box = layout.box()
            box.label(text="Partial result", icon="CHECKMARK")
            _result_lines(box, info.partial_result)
        row = layout.row(align=True)
        if info.state.is_terminal:
            col = layout.column(align=True)
            col.operator("taskqueue.retry", icon="FILE_REFRESH").job_id = info.id
            col.operator("taskqueue.retry_with_changes", text="Retry with Changes…",
                         icon="GREASEPENCIL").job_id = info.id
        elif info.held:
            _will_run_box(layout, info)
            row = layout.row(align=True)
            row.operator("taskqueue.release", text="Release…", icon="PLAY").job_id = info.id
            row.operator("taskqueue.discard_held", text="Discard", icon="TRASH").job_id = info.id
        else:
            row.operator("taskqueue.cancel", icon="X").job_id = info.id


_will_run: dict[str, list[str]] = {}  # job id -> what it runs (resolving the program once, not per redraw)
WILL_RUN_LINES = 12


def _will_run_box(layout: Any, info: JobInfo) -> None:
    """A held job's details: what it will run once released, as much as the sidebar
    has room for; the whole text is a click away (and in the Release dialog)."""
    from . import operators

    lines = _will_run.get(info.id)
    if lines is None:
        if len(_will_run) > 32:
            _will_run.clear()
        lines = _will_run[info.id] = operators.what_will_run([info])[1:]  # the header is above already
    wrapped = operators.wrap_lines([line.strip() for line in lines], _chars_per_line)
    box = layout.box()
    box.label(text="Runs when released", icon="CONSOLE")
    col = box.column(align=True)
    col.scale_y = 0.8
    for line in wrapped[:WILL_RUN_LINES]:
        sub = col.row(align=True)
        sub.alert = "WARNING" in line
        sub.label(text=line)
    more = len(wrapped) - WILL_RUN_LINES
    text = f"All of It ({more} more lines)" if more > 0 else "As Text"
    box.operator("taskqueue.release_details", text=text, icon="TEXT").job_id = info.id


def _pipeline_lines(layout: Any, engine: Any, info: JobInfo) -> None:
    """Where the job stands in its chain: what it runs after (each prerequisite's
    label and state) and when it may start; the jobs waiting on it."""
    col = layout.column(align=True)
    waiting = set(info.waiting_for)
    for pid in info.depends_on[:6]:
        try:
            pre = engine.get(pid)
            text, icon = f"After: {pre.label} ({pre.state.value})", state_icon(pre)
        except KeyError:
            text, icon = f"After: {pid} (gone from history)", "CHECKMARK"
        col.label(text=text, icon="LINKED" if pid in waiting else icon)
    if len(info.depends_on) > 6:
        col.label(text=f"…and {len(info.depends_on) - 6} more prerequisites")
    if info.not_before is not None:
        word = "Starts" if starts_later(info) else "Not before"
        col.label(text=f"{word}: {clock_text(info.not_before)}", icon="TIME")
    if not info.state.is_terminal:
        try:
            after = engine.dependents(info.id)
        except KeyError:
            after = []
        if after:
            col.label(text=f"{len(after)} job" + ("s" if len(after) > 1 else "") + " wait for this one",
                      icon="DECORATE_LINKED")


def _value_text(value: Any) -> str:
    """A param or result value for one line: a path as its file name (the sidebar has
    no room for more; the Folder and Log buttons open the whole path)."""
    if isinstance(value, str) and ("/" in value or "\\" in value) and Path(value).is_absolute():
        return Path(value).name or value
    return str(value)


def _set_params(info: JobInfo) -> list[tuple[str, Any]]:
    """The params a job was given, without the ones left at their kind's default."""
    spec = registry.find(info.kind)
    fields = getattr(spec.params, "model_fields", {}) if spec is not None and spec.params else {}
    shown = []
    for key, value in (info.params or {}).items():
        field = fields.get(key)
        if value is None or (field is not None and not field.is_required()
                             and field.get_default(call_default_factory=True) == value):
            continue
        shown.append((key, value))
    return shown


def _result_lines(layout: Any, result: Any) -> None:
    col = layout.column(align=True)
    if isinstance(result, dict):
        shown = [(k, v) for k, v in result.items() if v not in (None, "", [], {})]
        for key, value in shown[:8]:
            if isinstance(value, list) and len(value) > 1:
                # A list of files says most in its count and its last entry.
                last = value[-1]
                last = Path(last).name if isinstance(last, str) else last
                value = f"{len(value)} items, last {last}"
            col.label(text=f"{key}: {_value_text(value)}"[:80])
    else:
        _wrapped(col, repr(result), limit=4)


def _output(layout: Any, engine: Any, info: Any) -> None:
    """The last lines a job's program printed, and buttons to its log and folder."""
    log = background.log_path(engine, info)
    folder = background.output_dir(engine, info) if log is not None or info.kind == render.KIND else None
    if log is None and folder is None:
        return
    box = layout.box()
    box.label(text="Output", icon="CONSOLE")
    if log is not None:
        col = box.column(align=True)
        col.scale_y = 0.8
        for line in output_lines(log):
            col.label(text=line[:200])  # Blender elides the middle of a long label
    row = box.row(align=True)
    if folder is not None:
        op = row.operator("taskqueue.open_output", text="Folder", icon="FILE_FOLDER")
        op.job_id, op.what = info.id, "FOLDER"
    if log is not None:
        op = row.operator("taskqueue.open_output", text="Log", icon="TEXT")
        op.job_id, op.what = info.id, "LOG"


def _driver_line(data: str) -> str:
    """A render driver's protocol line in words, or "" for one the stage already says."""
    try:
        event = json.loads(data)
    except ValueError:
        return ""
    if not isinstance(event, dict):
        return ""
    kind, path = event.get("event"), event.get("path")
    if kind in ("saved", "skip") and isinstance(path, str):
        return f"{'Saved' if kind == 'saved' else 'Kept'} {Path(path).name}"
    if kind == "error":
        return f"Error: {event.get('message', '')}".splitlines()[0]
    return ""


def output_lines(log: Path) -> list[str]:
    """The log's last lines as the Output box shows them: of the render driver's
    protocol lines only the saved frames (the job's stage and progress say the rest),
    paths shortened."""
    lines = []
    for line in background.tail(log, background.TAIL_LINES * 3):
        if line.startswith(render.TAG):
            line = _driver_line(line[len(render.TAG):])
            if not line:
                continue
        lines.append(short_paths(line))
    return lines[-background.TAIL_LINES:]


classes = (TASKQUEUE_UL_jobs, VIEW3D_PT_taskqueue, VIEW3D_PT_taskqueue_details)
register, unregister = bpy.utils.register_classes_factory(classes)  # type: ignore[func-returns-value, misc]
