"""Operators of the panel: each acts on one job (``job_id``, default: the selected one)
or on the queue, and answers bad input with a report that names the problem."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from typing import Any, Optional

import bpy

from .. import api
from ..engine import JobInfo, TaskQueueError, registry
from . import runtime


def _engine_or_report(op: bpy.types.Operator) -> Any:
    engine = api.shared_engine_or_none()
    if engine is None:
        op.report({"ERROR"}, "Task Queue is not running (enable the add-on)")
    return engine


def _job_or_report(op: Any) -> Optional[JobInfo]:
    """The job named by ``op.job_id`` or the selected one, as the engine has it now."""
    engine = _engine_or_report(op)
    if engine is None:
        return None
    job_id = op.job_id or runtime.selected_job_id()
    if not job_id:
        op.report({"ERROR"}, "No job selected")
        return None
    try:
        return engine.get(job_id)
    except KeyError as exc:
        op.report({"ERROR"}, str(exc))
        return None


class _JobOperator:
    """Mixin: a ``job_id`` property (Blender collects annotations from mixins)."""

    job_id: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Job", description="Job id (empty: the selected job)", options={"SKIP_SAVE"},
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return api.shared_engine_or_none() is not None


def _run(op: bpy.types.Operator, fn: Any, *args: Any) -> Any:
    """Call the engine; a TaskQueueError / ValueError becomes an error report."""
    try:
        return fn(*args)
    except (TaskQueueError, ValueError, TypeError, KeyError) as exc:
        op.report({"ERROR"}, str(exc))
        return None


def _safe(fn: Any, job_id: str) -> list[str]:
    try:
        return list(fn(job_id))
    except (KeyError, TypeError):
        return []


def _labels(ids: list[str]) -> list[str]:
    """Labels of jobs by id, for a dialog (an id that left the history shows as itself)."""
    out = []
    for job_id in ids:
        try:
            out.append(runtime.engine().get(job_id).label)
        except KeyError:
            out.append(job_id)
    return out


def _draw_dependents(layout: Any, what: str, labels: list[str]) -> None:
    n = len(labels)
    layout.label(text=f"{n} job{'s' if n != 1 else ''} {what}:", icon="LINKED")
    col = layout.column(align=True)
    for label in labels[:8]:
        col.label(text=f"   {label}")
    if n > 8:
        col.label(text=f"   …and {n - 8} more")


class TASKQUEUE_OT_cancel(_JobOperator, bpy.types.Operator):
    """Cancel the job: a queued one at once, a running one as soon as it stops"""

    bl_idname = "taskqueue.cancel"
    bl_label = "Cancel Job"

    with_dependents: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Cancel the jobs that wait for it too",
        description="Cancel its dependents now; otherwise they end failed once it has stopped",
        default=True, options={"SKIP_SAVE"},
    )

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        self.job_id = info.id
        if not runtime.engine().dependents(info.id):
            return self.execute(context)
        return context.window_manager.invoke_props_dialog(self, width=420)  # type: ignore[union-attr, return-value]

    def draw(self, context: bpy.types.Context) -> None:
        _draw_dependents(self.layout, "wait for this job", _labels(_safe(runtime.engine().dependents, self.job_id)))
        self.layout.prop(self, "with_dependents")  # type: ignore[union-attr]

    def execute(self, context: bpy.types.Context) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        done = _run(self, lambda i: runtime.engine().cancel(i, with_dependents=self.with_dependents), info.id)
        if done is None:
            return {"CANCELLED"}
        if not done:
            self.report({"WARNING"}, f"'{info.label}' had already finished")
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_retry(_JobOperator, bpy.types.Operator):
    """Queue the finished job again, as a new job with the same settings"""

    bl_idname = "taskqueue.retry"
    bl_label = "Retry Job"

    with_dependents: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Queue the jobs that failed with it again",
        description="Its dependents that failed because it did not complete run again after it",
        default=True, options={"SKIP_SAVE"},
    )

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        self.job_id = info.id
        if not runtime.engine().dependents(info.id, failed_with=True):
            return self.execute(context)
        return context.window_manager.invoke_props_dialog(self, width=420)  # type: ignore[union-attr, return-value]

    def draw(self, context: bpy.types.Context) -> None:
        failed = _safe(lambda i: runtime.engine().dependents(i, failed_with=True), self.job_id)
        _draw_dependents(self.layout, "failed because this job did not complete", _labels(failed))
        self.layout.prop(self, "with_dependents")  # type: ignore[union-attr]

    def execute(self, context: bpy.types.Context) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        new_id = _run(self, lambda i: runtime.engine().retry(i, with_dependents=self.with_dependents), info.id)
        if new_id is None:
            return {"CANCELLED"}
        runtime.select(new_id)
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_retry_with_changes(_JobOperator, bpy.types.Operator):
    """Queue the finished job again with changed parameters (edited as JSON)"""

    bl_idname = "taskqueue.retry_with_changes"
    bl_label = "Retry with Changes"

    params_json: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Parameters", description="The changed parameters, as JSON", options={"SKIP_SAVE"},
    )

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        self.job_id = info.id
        self.params_json = json.dumps(dict(info.params))
        return context.window_manager.invoke_props_dialog(self, width=500)  # type: ignore[union-attr, return-value]

    def execute(self, context: bpy.types.Context) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        try:
            params = json.loads(self.params_json) if self.params_json.strip() else {}
        except ValueError as exc:
            self.report({"ERROR"}, f"Parameters are not valid JSON: {exc}")
            return {"CANCELLED"}
        if not isinstance(params, dict):
            self.report({"ERROR"}, "Parameters must be a JSON object, e.g. {\"frames\": 24}")
            return {"CANCELLED"}
        new_id = _run(self, runtime.engine().retry, info.id, params)
        if new_id is None:
            return {"CANCELLED"}
        runtime.select(new_id)
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_move(_JobOperator, bpy.types.Operator):
    """Move the queued job within its priority"""

    bl_idname = "taskqueue.move"
    bl_label = "Move Job"

    where: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="Where",
        items=[
            ("top", "Top", "First in its priority"),
            ("up", "Up", "One place earlier"),
            ("down", "Down", "One place later"),
            ("bottom", "Bottom", "Last in its priority"),
        ],
        default="up",
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        if _run(self, runtime.engine().move, info.id, self.where) is None:
            return {"CANCELLED"}
        runtime.poke()
        return {"FINISHED"}


# ---- release: what each held job will run, shown before it runs

RELEASE_DIALOG_WIDTH = 760  # px at 1x; Blender scales it with the UI
RELEASE_DIALOG_CHARS = 105  # characters of the dialog's font that fit in that width
RELEASE_DIALOG_LINES = 44  # more than this and the dialog would leave the screen
RELEASE_TEXT_NAME = "Task Queue: what will run"
_described: dict[str, list[str]] = {}  # shown_ids -> the lines the dialog shows


def held_targets(engine: Any, job_id: str = "") -> list[JobInfo]:
    """The jobs a release would let run: ``job_id``'s (if held), else every held job.

    Raises:
        KeyError: ``job_id`` is unknown.
    """
    if job_id:
        info = engine.get(job_id)
        return [info] if info.held else []
    return [i for i in engine.jobs(["queued"]) if i.held]


def what_will_run(infos: list[JobInfo]) -> list[str]:
    """Everything each job will do once released, in full, as lines a person reads:
    its kind's ``what_it_runs`` (the resolved program, every argument, environment
    changes, files written), and the job's own limits. Never raises."""
    lines: list[str] = []
    for n, info in enumerate(infos, 1):
        if n > 1:
            lines.append("")
        lines.append(f"{n}. '{info.label}': kind {info.kind}, id {info.id}, priority {info.priority}")
        limits = []
        if info.timeout:
            limits.append(f"stopped after {info.timeout:g} s")
        if info.max_retries:
            limits.append(f"tried up to {info.max_retries + 1} times")
        if info.memory_mb:
            limits.append(f"waits for {info.memory_mb} MB of free memory")
        if info.depends_on:
            limits.append("runs after " + ", ".join(str(d) for d in info.depends_on))
        if limits:
            lines.append("   " + "; ".join(limits))
        spec = registry.find(info.kind)
        params = dict(info.params) if isinstance(info.params, Mapping) else {}
        if spec is None:
            lines.append(f"   kind {info.kind!r} is not registered: it stays held until the add-on that "
                         "provides it is enabled. Its params:")
            lines += [f"   {k} = {json.dumps(v, default=repr)}" for k, v in sorted(params.items())]
            continue
        try:
            described = spec.what_it_runs(params)
        except Exception as exc:  # what_it_runs never raises; this is belt and braces for the dialog
            described = [f"(cannot describe it: {type(exc).__name__}: {exc})"]
        lines += ["   " + line for line in described]
    return lines


def wrap_lines(lines: list[str], width: int) -> list[str]:
    """``lines`` cut to ``width`` characters without losing any: a long line goes on
    over as many indented lines as it needs (long paths are broken too)."""
    out: list[str] = []
    for line in lines:
        line = line.replace("\t", "    ").replace("\r", "\\r").replace("\n", "\\n")
        indent = " " * (len(line) - len(line.lstrip(" ")))
        out += textwrap.wrap(line, max(20, width), subsequent_indent=indent + "    ", break_long_words=True,
                             break_on_hyphens=False) or [""]
    return out


def _describe_cached(key: str, engine: Any) -> list[str]:
    lines = _described.get(key)
    if lines is None:
        infos = []
        for job_id in _ids_of(key):
            try:
                infos.append(engine.get(job_id))
            except KeyError:
                continue
        lines = what_will_run(infos)
        if len(_described) > 16:
            _described.clear()
        _described[key] = lines
    return lines


def _ids_of(shown_ids: str) -> list[str]:
    try:
        ids = json.loads(shown_ids) if shown_ids else []
    except ValueError:
        return []
    return [str(i) for i in ids] if isinstance(ids, list) else []


class TASKQUEUE_OT_release(bpy.types.Operator):
    """Let held jobs run: this one, or every held job. From the panel, first shows
    exactly what each will run and asks"""

    bl_idname = "taskqueue.release"
    bl_label = "Release Held Jobs"

    job_id: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Job", description="The held job to release (empty: every held job)", options={"SKIP_SAVE"},
    )
    shown_ids: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Shown Jobs", description="The jobs the confirmation showed (JSON list): only these are released",
        options={"SKIP_SAVE", "HIDDEN"},
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return api.shared_engine_or_none() is not None

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        try:
            infos = held_targets(engine, self.job_id)
        except KeyError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if not infos or context.window is None or bpy.app.background:
            return self.execute(context)  # nothing to show, or nobody to show it to
        self.shown_ids = json.dumps([i.id for i in infos])
        _described.pop(self.shown_ids, None)
        _describe_cached(self.shown_ids, engine)  # resolved once, now: the dialog shows this
        title = f"Release '{infos[0].label}'?" if len(infos) == 1 else f"Release {len(infos)} held jobs?"
        wm: Any = context.window_manager
        try:
            return wm.invoke_props_dialog(self, width=RELEASE_DIALOG_WIDTH, title=title, confirm_text="Release")  # type: ignore[no-any-return]
        except TypeError:  # Blender before 4.1: no title or confirm_text
            return wm.invoke_props_dialog(self, width=RELEASE_DIALOG_WIDTH)  # type: ignore[no-any-return]

    def draw(self, context: bpy.types.Context) -> None:
        layout: Any = self.layout
        engine = api.shared_engine_or_none()
        if engine is None:
            layout.label(text="Task Queue is not running", icon="ERROR")
            return
        lines = wrap_lines(_describe_cached(self.shown_ids, engine), RELEASE_DIALOG_CHARS)
        layout.label(text="Each job runs exactly this once released (nothing has run yet):", icon="INFO")
        col = layout.box().column(align=True)
        col.scale_y = 0.85
        for line in lines[:RELEASE_DIALOG_LINES]:
            sub = col.row(align=True)
            sub.alert = "WARNING" in line
            sub.label(text=line)
        row = layout.row()
        if len(lines) > RELEASE_DIALOG_LINES:
            row.alert = True
            row.label(text=f"{len(lines) - RELEASE_DIALOG_LINES} more lines are not shown here: read them "
                           "in the Text Editor before releasing", icon="ERROR")
            row = layout.row()
        op = row.operator("taskqueue.release_details", text="Write It All to a Text Block", icon="TEXT")
        op.shown_ids = self.shown_ids

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        problems: list[str] = []
        if not self.shown_ids:  # a script, or nothing to confirm: as asked
            count = _run(self, engine.release, self.job_id or None)
            if count is None:
                return {"CANCELLED"}
        else:  # exactly the jobs the dialog showed, each on its own
            count = 0
            for job_id in _ids_of(self.shown_ids):
                try:
                    count += engine.release([job_id])
                except (TaskQueueError, KeyError, ValueError) as exc:
                    problems.append(str(exc))
            _described.pop(self.shown_ids, None)
            if problems:
                self.report({"WARNING"}, f"Released {count} job(s); not released: " + "; ".join(problems))
        if not problems:
            self.report({"INFO"}, f"Released {count} job(s)")
        runtime.dismiss_recovery()
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_release_details(bpy.types.Operator):
    """Write what the held jobs will run, in full, into a text block to read in the Text Editor"""

    bl_idname = "taskqueue.release_details"
    bl_label = "What Held Jobs Will Run"

    job_id: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Job", description="The held job to describe (empty: every held job)", options={"SKIP_SAVE"},
    )
    shown_ids: bpy.props.StringProperty(options={"SKIP_SAVE", "HIDDEN"})  # type: ignore[valid-type]

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return api.shared_engine_or_none() is not None

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        if self.shown_ids:
            lines = _describe_cached(self.shown_ids, engine)
        else:
            try:
                lines = what_will_run(held_targets(engine, self.job_id))
            except KeyError as exc:
                self.report({"ERROR"}, str(exc))
                return {"CANCELLED"}
        if not lines:
            self.report({"WARNING"}, "No held jobs to describe")
            return {"CANCELLED"}
        text = bpy.data.texts.get(RELEASE_TEXT_NAME) or bpy.data.texts.new(RELEASE_TEXT_NAME)
        text.clear()
        text.write("What these held jobs will run once released (nothing has run yet).\n"
                   "Release them from the Task Queue panel, or discard them.\n\n" + "\n".join(lines) + "\n")
        shown = False
        for area in (context.screen.areas if context.screen is not None else ()):
            if area.type == "TEXT_EDITOR":
                area.spaces.active.text = text  # type: ignore[union-attr]
                shown = True
                break
        where = "shown in the Text Editor" if shown else "open it in a Text Editor"
        self.report({"INFO"}, f"Wrote {len(lines)} lines to the text '{RELEASE_TEXT_NAME}' ({where})")
        return {"FINISHED"}


class TASKQUEUE_OT_discard_held(bpy.types.Operator):
    """Cancel a held job, or every held job (e.g. jobs restored from a file you do not want to run)"""

    bl_idname = "taskqueue.discard_held"
    bl_label = "Discard Held Jobs"

    job_id: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Job", description="The held job to discard (empty: every held job)", options={"SKIP_SAVE"},
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        try:
            held = [i.id for i in held_targets(engine, self.job_id)]
        except KeyError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if self.job_id and not held:
            self.report({"ERROR"}, f"job {self.job_id!r} is not held")
            return {"CANCELLED"}
        for job_id in held:
            engine.cancel(job_id)
        self.report({"INFO"}, f"Discarded {len(held)} held job(s)")
        if not self.job_id or not held_targets(engine):
            runtime.dismiss_recovery()
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_dismiss_notice(bpy.types.Operator):
    """Hide the recovery notice"""

    bl_idname = "taskqueue.dismiss_notice"
    bl_label = "Dismiss"

    def execute(self, context: bpy.types.Context) -> set[str]:
        runtime.dismiss_recovery()
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_clear_finished(bpy.types.Operator):
    """Remove finished jobs from the list"""

    bl_idname = "taskqueue.clear_finished"
    bl_label = "Clear Finished"

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        count = engine.clear_finished()
        from . import background

        background.sweep_copies(engine)  # the saved copies of cleared renders
        self.report({"INFO"}, f"Cleared {count} finished job(s)")
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_pause(bpy.types.Operator):
    """Start no new jobs; running jobs go on"""

    bl_idname = "taskqueue.pause"
    bl_label = "Pause Queue"

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        engine.pause()
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_resume(bpy.types.Operator):
    """Start queued jobs again"""

    bl_idname = "taskqueue.resume"
    bl_label = "Resume Queue"

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        engine.resume()
        runtime.poke()
        return {"FINISHED"}


class TASKQUEUE_OT_show_traceback(_JobOperator, bpy.types.Operator):
    """Show the full traceback of the job's error, and copy it to the clipboard"""

    bl_idname = "taskqueue.show_traceback"
    bl_label = "Show Traceback"

    def execute(self, context: bpy.types.Context) -> set[str]:
        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        if not info.errors:
            self.report({"WARNING"}, f"'{info.label}' has no error")
            return {"CANCELLED"}
        text = _traceback_text(info)
        context.window_manager.clipboard = text  # type: ignore[union-attr]
        lines = text.splitlines()

        def draw(menu: Any, _context: Any) -> None:
            for line in lines[-40:]:
                menu.layout.label(text=line.replace("\t", "    "))

        if context.window is not None and not bpy.app.background:  # no popups without a UI
            context.window_manager.popup_menu(draw, title=f"{info.label}: traceback (copied)", icon="ERROR")  # type: ignore[union-attr]
        if bpy.app.background:  # no clipboard, no popup: the console gets it
            print(text)
            self.report({"INFO"}, "Traceback printed to the console")
        else:
            self.report({"INFO"}, "Traceback copied to the clipboard")
        return {"FINISHED"}


def _traceback_text(info: JobInfo) -> str:
    parts = []
    for err in info.errors:
        head = f"Attempt {err.attempt}: {err.type}: {err.message}"
        if err.stage:
            head += f" (stage: {err.stage})"
        parts.append(head + ("\n" + err.traceback.rstrip() if err.traceback else ""))
    return f"Job {info.id} ({info.kind}) '{info.label}'\n\n" + "\n\n".join(parts) + "\n"


class TASKQUEUE_OT_notify(bpy.types.Operator):
    """Report a message in the status bar (used by the pump; never blocks)"""

    bl_idname = "taskqueue.notify"
    bl_label = "Task Queue Notification"
    bl_options = {"INTERNAL"}

    message: bpy.props.StringProperty(options={"SKIP_SAVE"})  # type: ignore[valid-type]
    level: bpy.props.EnumProperty(  # type: ignore[valid-type]
        items=[("INFO", "Info", ""), ("WARNING", "Warning", ""), ("ERROR", "Error", "")],
        default="INFO", options={"SKIP_SAVE"},
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        self.report({self.level}, self.message)
        return {"FINISHED"}


class TASKQUEUE_OT_submit_demo(bpy.types.Operator):
    """Queue a few demo jobs (renders, generation calls, one that fails) to try the queue"""

    bl_idname = "taskqueue.submit_demo"
    bl_label = "Add Demo Jobs"

    def execute(self, context: bpy.types.Context) -> set[str]:
        engine = _engine_or_report(self)
        if engine is None:
            return {"CANCELLED"}
        from ..kinds.demo import DEMO_BATCH

        ids = _run(self, engine.submit_many, DEMO_BATCH)
        if ids is None:
            return {"CANCELLED"}
        self.report({"INFO"}, f"Queued {len(ids)} demo jobs")
        runtime.poke()
        return {"FINISHED"}


def open_path(path: str) -> None:
    """Show ``path`` in the system's file browser or text viewer (tests replace this)."""
    bpy.ops.wm.path_open(filepath=path)


class TASKQUEUE_OT_open_output(_JobOperator, bpy.types.Operator):
    """Open the job's output folder, or its log, with the system's file browser"""

    bl_idname = "taskqueue.open_output"
    bl_label = "Open Job Output"

    what: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="What",
        items=[("FOLDER", "Output Folder", "The folder the job wrote to"),
               ("LOG", "Log", "The job's output log")],
        default="FOLDER", options={"SKIP_SAVE"},
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        from . import background

        info = _job_or_report(self)
        if info is None:
            return {"CANCELLED"}
        engine = runtime.engine()
        if self.what == "LOG":
            path = background.log_path(engine, info)
            missing = f"'{info.label}' has no log (it ran no external program)"
        else:
            path = background.output_dir(engine, info)
            missing = f"'{info.label}' has no output folder yet"
        if path is None:
            self.report({"ERROR"}, missing)
            return {"CANCELLED"}
        open_path(str(path))
        self.report({"INFO"}, f"Opened {path}")
        return {"FINISHED"}


class TASKQUEUE_OT_render_in_background(bpy.types.Operator):
    """Save a copy of this file and render it in a background Blender: this one stays free"""

    bl_idname = "taskqueue.render_in_background"
    bl_label = "Render in Background"

    frames: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="Frames",
        items=[("RANGE", "Scene Range", "The scene's frame range"),
               ("CURRENT", "Current Frame", "Only the current frame")],
        default="RANGE",
    )
    format: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="Format",
        items=[("PNG", "PNG", ""), ("JPEG", "JPEG", ""), ("OPEN_EXR", "OpenEXR", ""),
               ("TIFF", "TIFF", "")],
        default="PNG",
    )
    priority: bpy.props.EnumProperty(  # type: ignore[valid-type]
        name="Priority",
        items=[("urgent", "Urgent", ""), ("high", "High", ""), ("normal", "Normal", ""),
               ("low", "Low", "")],
        default="normal",
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return api.shared_engine_or_none() is not None and context.scene is not None

    def invoke(self, context: bpy.types.Context, event: Any) -> set[str]:
        return context.window_manager.invoke_props_dialog(self)  # type: ignore[union-attr, return-value]

    def execute(self, context: bpy.types.Context) -> set[str]:
        from . import background

        scene = context.scene
        if scene is None:
            self.report({"ERROR"}, "No scene to render")
            return {"CANCELLED"}
        frame = scene.frame_current if self.frames == "CURRENT" else None
        try:
            job = background.render_current_file(
                frame=frame, scene=scene.name, format=self.format, priority=self.priority,
            )
        except (TaskQueueError, ValueError, RuntimeError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        runtime.select(job)
        runtime.poke()
        self.report({"INFO"}, f"Queued a background render of '{scene.name}'")
        return {"FINISHED"}


classes = (
    TASKQUEUE_OT_open_output,
    TASKQUEUE_OT_render_in_background,
    TASKQUEUE_OT_cancel,
    TASKQUEUE_OT_retry,
    TASKQUEUE_OT_retry_with_changes,
    TASKQUEUE_OT_move,
    TASKQUEUE_OT_release,
    TASKQUEUE_OT_release_details,
    TASKQUEUE_OT_discard_held,
    TASKQUEUE_OT_dismiss_notice,
    TASKQUEUE_OT_clear_finished,
    TASKQUEUE_OT_pause,
    TASKQUEUE_OT_resume,
    TASKQUEUE_OT_show_traceback,
    TASKQUEUE_OT_notify,
    TASKQUEUE_OT_submit_demo,
)
register, unregister = bpy.utils.register_classes_factory(classes)  # type: ignore[func-returns-value, misc]
