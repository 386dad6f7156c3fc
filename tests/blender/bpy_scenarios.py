"""Scenarios run inside the real ``bpy`` module, one per process, for test_addon.py.

Run by a Python that has ``bpy`` (not by pytest):

    python bpy_scenarios.py SCENARIO EXTENSION.zip [ARGS...]

Each scenario installs the extension zip with Blender's own installer into the
throw-away profile the caller made (``BLENDER_USER_RESOURCES`` and the XDG
folders must point into a temporary folder: the script refuses to run
otherwise), drives the add-on the way a user or script would (``bpy.ops``,
``import blender_taskqueue as tq``), and prints one line
``TASKQUEUE-REPORT {json}`` with what it observed. The test decides what is
right; a scenario only raises when it cannot go on.

There is no event loop in the bpy module, so timers never fire: ``tq.wait``
(which pumps on the main thread) and explicit ``pump().tick()`` calls stand in
for Blender's 10 Hz timer. Waits are on events and job states, never sleeps.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Optional

REPORT_PREFIX = "TASKQUEUE-REPORT "
REPO = "user_default"
MODULE = f"bl_ext.{REPO}.blender_taskqueue"
ISOLATED_VARS = ("BLENDER_USER_RESOURCES", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")
WAIT_S = 30.0  # generous bound for anything that should take milliseconds

ZIP = ""
bpy: Any = None
tq: Any = None


# ---------------------------------------------------------------------------
# helpers


def boot(*, enable: bool = True, memory_gate_off: bool = True) -> None:
    """Import bpy and install the zip (enabled unless told otherwise)."""
    global bpy, tq
    missing = [v for v in ISOLATED_VARS if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"refusing to run outside a throw-away profile: {', '.join(missing)} unset")
    import bpy as _bpy

    bpy = _bpy
    result = bpy.ops.extensions.package_install_files(filepath=ZIP, repo=REPO, enable_on_install=enable)
    if result != {"FINISHED"}:
        raise SystemExit(f"install failed: {result}")
    if enable:
        attach(memory_gate_off=memory_gate_off)


def attach(*, memory_gate_off: bool = True) -> None:
    """After enabling: bind ``tq`` (the console alias) and keep the memory gate out of the way."""
    global tq
    import blender_taskqueue as _tq  # the alias the add-on puts in sys.modules

    tq = _tq
    if memory_gate_off:
        prefs().min_free_memory_mb = 0  # a small CI machine must not hold jobs back


def sync_wheels() -> None:
    """Extract the bundled wheels without enabling the add-on: the two calls Blender
    makes for enabled extensions at start-up (as in bpy_install_extension.py)."""
    import inspect

    import addon_utils
    import bl_pkg

    repo = next(r for r in bpy.context.preferences.extensions.repos if r.module == REPO)
    wheel_list: list = []
    error = bl_pkg.manifest_compatible_with_wheel_data_or_error(
        os.path.join(repo.directory, "blender_taskqueue", "blender_manifest.toml"),
        REPO, "blender_taskqueue", repo.directory, wheel_list,
    )
    if error:
        raise SystemExit(f"manifest not compatible: {error}")
    local_dir = os.path.join(bpy.utils.user_resource("EXTENSIONS"), ".local")
    kwargs = {"debug": False, "error_fn": print}
    accepted = inspect.signature(addon_utils._extension_sync_wheels).parameters
    addon_utils._extension_sync_wheels(
        local_dir=local_dir, wheel_list=wheel_list, **{k: v for k, v in kwargs.items() if k in accepted}
    )


def sub(name: str) -> Any:
    return importlib.import_module(f"{MODULE}.{name}")


def runtime() -> Any:
    return sub("blender.runtime")


def pump() -> Any:
    return runtime().pump()


def prefs() -> Any:
    return bpy.context.preferences.addons[MODULE].preferences


def rows() -> list[str]:
    return [r.job_id for r in bpy.context.window_manager.taskqueue.jobs]


def snapshot() -> list[list[Any]]:
    """Every job as (id, state, held, priority), in the engine's display order."""
    return [[i.id, i.state.value, i.held, i.priority] for i in tq.engine().jobs()]


def op(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run an operator; its result set, or the error Blender raised for an ERROR report."""
    try:
        return {"result": sorted(fn(*args, **kwargs)), "error": None}
    except (RuntimeError, TypeError) as exc:
        return {"result": None, "error": str(exc)}


def info(job_id: str) -> dict[str, Any]:
    i = tq.get(job_id)
    return {
        "id": i.id, "kind": i.kind, "label": i.label, "params": dict(i.params), "priority": i.priority,
        "state": i.state.value, "held": i.held, "cancel_pending": i.cancel_pending, "result": i.result,
        "error": None if i.error is None else {"type": i.error.type, "message": i.error.message,
                                                 "traceback": i.error.traceback},
        "message": i.message,
    }


class Gates:
    """Per-job events: ``started(id)`` set by the handler, ``gate(id)`` lets it return."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[str, threading.Event] = {}
        self._gates: dict[str, threading.Event] = {}

    def _get(self, table: dict[str, threading.Event], job_id: str) -> threading.Event:
        with self._lock:
            return table.setdefault(job_id, threading.Event())

    def started(self, job_id: str) -> threading.Event:
        return self._get(self._started, job_id)

    def gate(self, job_id: str) -> threading.Event:
        return self._get(self._gates, job_id)

    def wait_started(self, job_id: str) -> None:
        if not self.started(job_id).wait(WAIT_S):
            raise TimeoutError(f"job {job_id} never started: {tq.get(job_id)}")


GATES = Gates()


def register_test_kinds() -> None:
    """Kinds the scenarios use. ``t.block`` runs until its gate opens (or it is cancelled,
    unless ``stubborn``); ``t.fail`` raises; ``t.ok`` returns at once."""

    @tq.job_kind("t.block")
    def block(ctx: Any, params: dict) -> dict:
        GATES.started(ctx.job_id).set()
        gate = GATES.gate(ctx.job_id)
        if params.get("stubborn"):
            gate.wait(WAIT_S)  # ignores cancellation
        else:
            while not gate.is_set():
                ctx.sleep(0.05)  # wakes at once (JobCancelled) when cancelled
        return {"gate": "opened"}

    @tq.job_kind("t.fail")
    def fail(ctx: Any, params: dict) -> None:
        raise RuntimeError(f"boom: {params.get('why', 'no reason')}")

    @tq.job_kind("t.ok")
    def ok(ctx: Any, params: dict) -> dict:
        return {"echo": params}


def taskqueue_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("taskqueue-") and t.is_alive())


def registered_timer_methods(obj: Any) -> list[str]:
    """Bound methods of ``obj`` that Blender still holds as timers.

    ``bpy.app.timers.is_registered`` compares the very function object that was
    registered, so a fresh ``obj.method`` never matches; the objects Blender
    holds are found through the garbage collector instead.
    """
    gc.collect()
    held = []
    for ref in gc.get_referrers(obj):
        if getattr(ref, "__self__", None) is obj and bpy.app.timers.is_registered(ref):
            held.append(ref.__func__.__name__)
    return held


def addon_handlers() -> dict[str, int]:
    counts = {}
    for name in ("save_pre", "save_post", "load_pre", "load_post", "depsgraph_update_post"):
        handlers = getattr(bpy.app.handlers, name)
        counts[name] = sum(1 for fn in handlers if getattr(fn, "__module__", "").startswith(MODULE))
    return counts


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


def demo_batch() -> list[dict]:
    return list(sub("kinds.demo").DEMO_BATCH)


# ---------------------------------------------------------------------------
# 1. registration surface, preferences applied live, nothing at import time


def scenario_surface() -> dict[str, Any]:
    boot(enable=False)
    out: dict[str, Any] = {}
    sync_wheels()
    package = importlib.import_module(MODULE)  # imported, not enabled
    shared = sys.modules.get("_blender_taskqueue_shared")
    out["import_only"] = {
        "threads": taskqueue_threads(),
        "engine": getattr(shared, "engine", None) is not None,
        "alias": "blender_taskqueue" in sys.modules,
        "operators": hasattr(bpy.types, "TASKQUEUE_OT_cancel"),
        "package_file": package.__file__,
    }
    out["enable"] = op(bpy.ops.preferences.addon_enable, module=MODULE)
    attach(memory_gate_off=False)

    p = prefs()
    cls = type(p)
    out["prefs_bl_idname"] = cls.bl_idname
    out["prefs_class"] = cls.__name__
    props = {}
    for prop in cls.bl_rna.properties:
        if prop.identifier in ("rna_type", "bl_idname"):
            continue
        entry: dict[str, Any] = {"type": prop.type, "default": getattr(prop, "default", None)}
        if prop.type == "INT":
            entry.update(min=prop.hard_min, max=prop.hard_max)
        if prop.type == "ENUM":
            entry["items"] = [i.identifier for i in prop.enum_items]
        if prop.type == "STRING":
            entry["subtype"] = prop.subtype
        entry["value"] = getattr(p, prop.identifier)
        props[prop.identifier] = entry
    out["prefs"] = props

    eng = tq.engine()
    out["engine_config"] = {
        "max_workers": eng.config.max_workers,
        "max_queued": eng.config.max_queued,
        "history_limit": eng.config.history_limit,
        "min_free_memory_mb": eng.config.min_free_memory_mb,
        "max_memory_mb": eng.config.max_memory_mb,
        "auto_resume": eng.config.auto_resume,
        "log_level": eng.config.log_level,
    }
    out["sidecar_path"] = str(eng.sidecar_path)
    out["log_path"] = str(eng.log_path)
    out["xdg_state_home"] = os.environ["XDG_STATE_HOME"]

    # Preferences apply live.
    live: dict[str, Any] = {}
    p.min_free_memory_mb = 0  # also keeps the memory gate out of the way below
    live["min_free_memory_mb_0"] = eng.config.min_free_memory_mb
    p.workers = 2
    live["workers_2"] = eng.config.max_workers
    p.workers = 8
    live["workers_8"] = eng.config.max_workers
    register_test_kinds()  # eight jobs that wait for their gates: do eight run at once?
    blockers = [tq.submit("t.block") for _ in range(8)]
    for job_id in blockers:
        GATES.wait_started(job_id)
    live["running_at_8"] = tq.stats().running
    for job_id in blockers:
        GATES.gate(job_id).set()
    live["blockers_done"] = tq.wait(blockers, timeout=WAIT_S)
    p.workers = 99  # clamped by the property's range
    live["workers_99"] = [p.workers, eng.config.max_workers]
    p.workers = 0
    live["workers_0"] = [p.workers, eng.config.max_workers]
    p.history_limit = 7
    live["history_limit"] = eng.config.history_limit
    p.auto_resume = False
    live["auto_resume"] = eng.config.auto_resume
    p.log_level = "DEBUG"
    live["log_level"] = eng.config.log_level
    p.max_memory_mb = 4096
    live["max_memory_mb"] = eng.config.max_memory_mb
    p.refresh_hz = 4
    live["progress_interval_s"] = pump().progress_interval_s
    p.refresh_hz = 10
    p.blender_path = "/opt/blender-for-renders/blender"
    live["render_blender"] = sub("kinds.render")._default_blender
    p.blender_path = ""
    live["render_blender_cleared"] = sub("kinds.render")._default_blender
    p.max_queued = 2
    live["max_queued"] = eng.config.max_queued
    tq.pause()
    ids = [tq.submit("demo.render", {"frames": 1}), tq.submit("demo.render", {"frames": 1})]
    try:
        tq.submit("demo.render", {"frames": 1})
        live["third_submit"] = "accepted"
    except tq.QueueFull as exc:
        live["third_submit"] = f"QueueFull: {exc}"
    for job_id in ids:
        tq.cancel(job_id)
    tq.resume()
    out["live"] = live

    # The state folder applies from the next start, not to the running queue. (The next
    # start cannot be had here: Blender drops an add-on's preferences when it is disabled,
    # and the bpy module reads no saved preferences.)
    p.state_dir = os.path.join(os.environ["XDG_DATA_HOME"], "elsewhere")
    out["state_dir_now"] = str(eng.sidecar_path)
    out["state_dir_config"] = str(eng.config.state_dir)

    # What is registered.
    types = bpy.types
    out["panels"] = {}
    for name in ("VIEW3D_PT_taskqueue", "VIEW3D_PT_taskqueue_details"):
        cls_ = getattr(types, name, None)
        out["panels"][name] = None if cls_ is None else {
            "registered": bool(cls_.is_registered),
            "space": cls_.bl_space_type, "region": cls_.bl_region_type,
            "category": cls_.bl_category, "parent": getattr(cls_, "bl_parent_id", ""),
        }
    ul = getattr(types, "TASKQUEUE_UL_jobs", None)
    out["uilist"] = ul is not None and bool(ul.is_registered)
    out["property_groups"] = {c.__name__: bool(c.is_registered) for c in sub("blender.props").classes}
    out["ops"] = {}
    for name in sorted(dir(bpy.ops.taskqueue)):
        fn = getattr(bpy.ops.taskqueue, name)
        cls_name = fn.idname()
        out["ops"][name] = {"class": cls_name, "registered": hasattr(types, cls_name),
                            "poll": bool(fn.poll())}
    operators = sub("blender.operators")
    generate = sub("blender.generate")
    statusbar = sub("blender.statusbar")
    out["op_classes"] = {c.__name__: [c.bl_idname, bool(c.is_registered)]
                         for c in (*operators.classes, *generate.classes, *statusbar.classes)
                         if c.__name__.startswith("TASKQUEUE_OT_")}
    out["wm_property"] = hasattr(bpy.types.WindowManager, "taskqueue") and hasattr(
        bpy.context.window_manager, "taskqueue")
    out["scene_property"] = hasattr(bpy.context.scene, "taskqueue_saved")
    out["alias_is_package"] = sys.modules.get("blender_taskqueue") is sys.modules[MODULE]
    out["tq_jobs_callable"] = callable(getattr(tq, "jobs", None))
    out["tq_engine_callable"] = callable(getattr(tq, "engine", None))
    out["handlers"] = addon_handlers()
    out["timer_registered"] = registered_timer_methods(pump())
    out["threads"] = taskqueue_threads()
    return out


# ---------------------------------------------------------------------------
# 2. jobs that touch bpy through ctx.call_on_main


def scenario_main_calls() -> dict[str, Any]:
    boot()
    out: dict[str, Any] = {}
    main = threading.main_thread()

    @tq.job_kind("t.cube")
    def cube(ctx: Any, params: dict) -> dict:
        def make() -> dict:
            obj = bpy.data.objects.new(params["name"], None)
            return {"name": obj.name, "on_main": threading.current_thread() is main}

        made = ctx.call_on_main(make)
        return {**made, "worker_on_main": threading.current_thread() is main}

    @tq.job_kind("t.main_error")
    def main_error(ctx: Any, params: dict) -> None:
        def broken() -> None:
            bpy.data.objects["no such object"]  # KeyError raised on the main thread

        ctx.call_on_main(broken)

    @tq.job_kind("t.main_error_caught")
    def main_error_caught(ctx: Any, params: dict) -> dict:
        def broken() -> None:
            raise ValueError("bad collection name")

        try:
            ctx.call_on_main(broken)
        except ValueError as exc:
            return {"caught": type(exc).__name__, "message": str(exc)}
        return {"caught": None}

    finished_on_main: list[bool] = []
    tq.on_finished(lambda info: finished_on_main.append(threading.current_thread() is main))

    one = tq.submit("t.cube", {"name": "TQCube"})
    many = tq.submit_many([{"kind": "t.cube", "params": {"name": f"TQMany{i:02d}"}} for i in range(40)])
    err = tq.submit("t.main_error")
    caught = tq.submit("t.main_error_caught")
    out["waited"] = tq.wait([one, *many, err, caught], timeout=WAIT_S)
    out["one"] = info(one)
    out["object_exists"] = "TQCube" in bpy.data.objects
    out["many_states"] = sorted({tq.get(i).state.value for i in many})
    out["many_objects"] = sum(1 for i in range(40) if f"TQMany{i:02d}" in bpy.data.objects)
    out["error_job"] = info(err)
    out["caught_job"] = info(caught)
    out["on_finished_calls"] = len(finished_on_main)
    out["on_finished_all_on_main"] = all(finished_on_main)
    out["main_calls_left"] = tq.engine().pending_main_calls
    return out


# ---------------------------------------------------------------------------
# 3. every operator on real jobs


def scenario_operators() -> dict[str, Any]:
    boot()
    register_test_kinds()
    ops = bpy.ops.taskqueue
    out: dict[str, Any] = {}
    wm_state = bpy.context.window_manager.taskqueue

    # pause / resume
    out["pause"] = op(ops.pause)
    out["paused_after_pause"] = [tq.engine().paused, tq.stats().paused]
    out["resume"] = op(ops.resume)
    out["paused_after_resume"] = [tq.engine().paused, tq.stats().paused]

    # cancel: queued (paused queue), then running (cooperative and stubborn)
    tq.pause()
    queued = tq.submit("t.ok", label="queued one")
    out["cancel_queued"] = op(ops.cancel, job_id=queued)
    out["cancel_queued_state"] = info(queued)["state"]
    tq.resume()
    running = tq.submit("t.block", label="cooperative")
    GATES.wait_started(running)
    out["cancel_running"] = op(ops.cancel, job_id=running)
    out["cancel_running_waited"] = tq.wait([running], timeout=WAIT_S)
    out["cancel_running_info"] = info(running)
    stubborn = tq.submit("t.block", {"stubborn": True}, label="stubborn")
    GATES.wait_started(stubborn)
    out["cancel_stubborn"] = op(ops.cancel, job_id=stubborn)
    out["cancel_stubborn_pending"] = info(stubborn)
    GATES.gate(stubborn).set()  # it returns a result, which the cancel discards
    out["cancel_stubborn_waited"] = tq.wait([stubborn], timeout=WAIT_S)
    out["cancel_stubborn_final"] = info(stubborn)
    out["cancel_finished_again"] = op(ops.cancel, job_id=stubborn)  # a warning, not an error

    # retry: a failed job; the new one is selected in the list
    failed = tq.submit("t.fail", {"why": "first try"}, label="failing")
    tq.wait([failed], timeout=WAIT_S)
    out["failed_info"] = info(failed)
    before = {i.id for i in tq.jobs()}
    out["retry"] = op(ops.retry, job_id=failed)
    new = sorted({i.id for i in tq.jobs()} - before)
    out["retry_new"] = [info(i) for i in new]
    out["retry_selected_row"] = rows()[wm_state.active_index] if 0 <= wm_state.active_index < len(rows()) else None
    tq.wait(new, timeout=WAIT_S)
    # As in the panel: select the failed job's row, press Retry (no job_id).
    tq.pump()
    wm_state.active_index = rows().index(failed)
    before = {i.id for i in tq.jobs()}
    out["retry_selected"] = op(ops.retry)
    new = sorted({i.id for i in tq.jobs()} - before)
    out["retry_selected_new"] = [info(i) for i in new]
    out["retry_selected_row_after"] = (
        rows()[wm_state.active_index] if 0 <= wm_state.active_index < len(rows()) else None
    )
    tq.wait(new, timeout=WAIT_S)
    busy = tq.submit("t.block", label="busy")
    GATES.wait_started(busy)
    out["retry_running"] = op(ops.retry, job_id=busy)

    # retry_with_changes (executed with params_json, as the dialog's OK button does)
    done = tq.submit("demo.render", {"frames": 1, "seconds_per_frame": 0}, label="to change")
    tq.wait([done], timeout=WAIT_S)
    count = len(tq.jobs())
    out["rwc_bad_json"] = op(ops.retry_with_changes, job_id=done, params_json="{frames: 2")
    out["rwc_not_object"] = op(ops.retry_with_changes, job_id=done, params_json="[1, 2]")
    out["rwc_invalid_params"] = op(ops.retry_with_changes, job_id=done, params_json='{"frames": 0}')
    out["rwc_running"] = op(ops.retry_with_changes, job_id=busy, params_json='{"x": 1}')
    out["rwc_count_unchanged"] = len(tq.jobs()) == count
    before = {i.id for i in tq.jobs()}
    out["rwc_ok"] = op(ops.retry_with_changes, job_id=done, params_json='{"frames": 2}')
    new = sorted({i.id for i in tq.jobs()} - before)
    out["rwc_new"] = [info(i) for i in new]
    out["rwc_waited"] = tq.wait(new, timeout=WAIT_S)
    out["rwc_final"] = [info(i) for i in new]
    GATES.gate(busy).set()
    tq.wait([busy], timeout=WAIT_S)

    # move: four jobs in one priority band, one urgent job ahead of them
    tq.pause()
    urgent = tq.submit("t.ok", label="urgent", priority="urgent")
    m = [tq.submit("t.ok", label=f"m{i}") for i in range(4)]
    names = {urgent: "urgent", **{j: f"m{i}" for i, j in enumerate(m)}}

    def order() -> list[str]:
        return [names.get(i.id, i.id) for i in tq.jobs(["queued"])]

    def row_order() -> list[str]:
        return [names.get(r, r) for r in rows() if r in names]

    out["move_start"] = order()
    moves = []
    for job, where in ((m[3], "top"), (m[3], "down"), (m[0], "bottom"), (m[0], "up"), (m[2], "top")):
        result = op(ops.move, job_id=job, where=where)
        moves.append({"job": names[job], "where": where, **result, "order": order(), "rows": row_order()})
    out["moves"] = moves
    # The selected row is the default target.
    wm_state.active_index = rows().index(m[1])
    result = op(ops.move, where="top")
    out["move_selected"] = {**result, "order": order()}
    out["move_bad_where"] = op(ops.move, job_id=m[0], where="sideways")
    out["move_finished"] = op(ops.move, job_id=failed, where="top")
    out["move_priorities"] = sorted({tq.get(j).priority for j in m})
    for job in [urgent, *m]:
        tq.cancel(job)
    tq.resume()

    # release / discard_held
    tq.pause()
    held = [tq.submit("t.ok", {"n": i}, label=f"held{i}", held=True) for i in range(4)]
    out["held_before"] = [tq.get(i).held for i in held]
    out["release_one"] = op(ops.release, job_id=held[0])
    out["held_after_one"] = [tq.get(i).held for i in held]
    out["release_finished"] = op(ops.release, job_id=failed)
    out["discard_held"] = op(ops.discard_held)
    out["after_discard"] = [info(i)["state"] for i in held]
    more = [tq.submit("t.ok", {"n": i}, held=True) for i in range(2)]
    out["release_all"] = op(ops.release)
    out["held_after_all"] = [tq.get(i).held for i in more]
    tq.resume()
    out["released_waited"] = tq.wait([held[0], *more], timeout=WAIT_S)
    out["released_states"] = [info(i)["state"] for i in [held[0], *more]]

    # notify
    out["notify"] = op(ops.notify, message="hello from the test", level="WARNING")
    out["notices"] = [list(n[1:]) for n in pump().mirror.notices]

    # submit_demo (paused, so the demo jobs stay queued), then clear everything
    tq.pause()
    before = {i.id for i in tq.jobs()}
    out["submit_demo"] = op(ops.submit_demo)
    demo = [tq.get(i) for i in sorted({i.id for i in tq.jobs()} - before)]
    out["demo_jobs"] = sorted([d.label, d.kind, d.state.value] for d in demo)
    out["demo_expected"] = sorted([s.get("label"), s["kind"]] for s in demo_batch())
    for d in demo:
        tq.cancel(d.id)
    tq.resume()

    # clear_finished
    tq.wait(None, timeout=WAIT_S)
    out["finished_before_clear"] = len(tq.jobs(["completed", "failed", "cancelled", "interrupted"]))
    out["clear_finished"] = op(ops.clear_finished)
    tq.pump()
    out["after_clear"] = {"jobs": len(tq.jobs()), "rows": len(rows()), "stats_finished_kept": tq.stats().finished_kept}

    # Bad input: unknown ids and no selection are errors that change nothing.
    tq.pause()
    keep = [tq.submit("t.ok", label="bystander"), tq.submit("t.ok", label="bystander 2")]
    tq.pump()
    before_snapshot = snapshot()
    before_rows = rows()
    bad = {}
    for name, kwargs in (
        ("cancel", {}), ("retry", {}), ("retry_with_changes", {"params_json": "{}"}),
        ("move", {"where": "top"}), ("release", {}), ("show_traceback", {}),
    ):
        bad[name] = op(getattr(ops, name), job_id="no-such-job", **kwargs)
    wm_state.active_index = -1
    no_selection = {}
    for name in ("cancel", "retry", "move", "show_traceback"):
        no_selection[name] = op(getattr(ops, name))
    out["bad_id"] = bad
    out["no_selection"] = no_selection
    out["bad_input_changed_nothing"] = snapshot() == before_snapshot and rows() == before_rows
    for job in keep:
        tq.cancel(job)
    tq.resume()

    # dismiss_notice
    out["dismiss_notice"] = op(ops.dismiss_notice)
    out["threads_before_exit"] = len(taskqueue_threads())
    return out


# ---------------------------------------------------------------------------
# 3b. show_traceback (its own process: it may take Blender down)


def scenario_show_traceback() -> dict[str, Any]:
    boot()
    register_test_kinds()
    ops = bpy.ops.taskqueue
    out: dict[str, Any] = {}
    failed = tq.submit("t.fail", {"why": "for the traceback"}, label="failing")
    done = tq.submit("t.ok", label="fine")
    tq.wait([failed, done], timeout=WAIT_S)
    out["failed_info"] = info(failed)
    out["background"] = bool(bpy.app.background)
    out["has_window"] = bpy.context.window is not None
    wm = bpy.context.window_manager
    wm.clipboard = "before"
    out["clipboard_roundtrip"] = wm.clipboard
    out["show_traceback_no_error"] = op(ops.show_traceback, job_id=done)
    print("show_traceback: calling it on a failed job", flush=True)
    out["show_traceback"] = op(ops.show_traceback, job_id=failed)
    out["clipboard"] = wm.clipboard
    return out


# ---------------------------------------------------------------------------
# 4. the queue inside the .blend


def _queue_for_saving() -> dict[str, Any]:
    finished = tq.submit("demo.render", {"frames": 1, "seconds_per_frame": 0}, label="finished before save")
    tq.wait([finished], timeout=WAIT_S)
    tq.pause()
    queued = [
        tq.submit("demo.render", {"frames": 2, "seconds_per_frame": 0}, label="saved low", priority="low"),
        tq.submit("demo.render", {"frames": 2, "seconds_per_frame": 0}, label="saved A"),
        tq.submit("demo.render", {"frames": 2, "seconds_per_frame": 0}, label="saved B"),
        tq.submit("demo.generate", {"prompt": "a teapot", "steps": 1, "seconds_per_step": 0}, label="saved gen",
                  priority="high"),
    ]
    tq.pump()
    return {"finished": finished, "queued": queued}


def scenario_persist_save(blend: str) -> dict[str, Any]:
    boot()
    out: dict[str, Any] = _queue_for_saving()
    out["order"] = [i.id for i in tq.jobs()]
    out["save"] = op(bpy.ops.wm.save_as_mainfile, filepath=blend)
    saved = json.loads(bpy.context.scene.taskqueue_saved or "{}")
    out["saved_ids"] = sorted(j["id"] for j in saved.get("jobs", []))
    out["saved_in_scenes"] = [bool(s.taskqueue_saved) for s in bpy.data.scenes]
    out["rows_before_reopen"] = rows()

    # Reopen the same file in the same session: nothing is adopted twice.
    out["reopen"] = op(bpy.ops.wm.open_mainfile, filepath=blend)
    out["ids_after_reopen"] = sorted(i.id for i in tq.jobs())
    out["states_after_reopen"] = {i.id: [i.state.value, i.held] for i in tq.jobs()}
    out["recovery_after_reopen"] = _recovery()
    out["rows_after_reopen"] = rows()
    tq.pump()
    out["rows_after_reopen_tick"] = rows()
    out["order_after_reopen"] = [i.id for i in tq.jobs()]

    # A file whose saved queue is damaged: reported, nothing else changes.
    damaged = os.path.join(os.path.dirname(blend), "damaged.blend")
    handlers = sub("blender.handlers")
    bpy.app.handlers.save_pre.remove(handlers.save_pre)  # keep the damaged text as it is
    try:
        bpy.context.scene.taskqueue_saved = '{"app": "blender_taskqueue", "jobs": [oops'
        out["save_damaged"] = op(bpy.ops.wm.save_as_mainfile, filepath=damaged)
    finally:
        bpy.app.handlers.save_pre.append(handlers.save_pre)
    before = snapshot()
    out["open_damaged"] = op(bpy.ops.wm.open_mainfile, filepath=damaged)
    out["damaged_notices"] = [list(n[1:]) for n in pump().mirror.notices if "damaged" in n[2]]
    out["damaged_changed_nothing"] = snapshot() == before
    return out


def _recovery() -> Optional[dict[str, Any]]:
    rec = pump().mirror.recovery
    if rec is None:
        return None
    return {"sources": list(rec.sources), "requeued": rec.requeued, "held": rec.held, "finished": rec.finished,
            "duplicates": rec.duplicates, "summary": rec.summary}


def scenario_persist_open(blend: str, trusted: str, auto_resume: str) -> dict[str, Any]:
    boot()
    register_test_kinds()
    out: dict[str, Any] = {}
    prefs().auto_resume = auto_resume == "on"
    bpy.context.preferences.filepaths.use_scripts_auto_execute = trusted == "trusted"
    out["jobs_before_open"] = len(tq.jobs())
    out["open"] = op(bpy.ops.wm.open_mainfile, filepath=blend)
    out["autoexec_fail"] = bool(bpy.app.autoexec_fail)
    recovered = tq.jobs()
    out["jobs"] = {i.id: {"state": i.state.value, "held": i.held, "label": i.label, "priority": i.priority}
                   for i in recovered}
    out["order"] = [i.id for i in recovered]
    out["rows"] = rows()
    out["recovery"] = _recovery()
    out["stats_held"] = tq.stats().held

    # The same file again: nothing doubles.
    out["reopen"] = op(bpy.ops.wm.open_mainfile, filepath=blend)
    out["ids_after_reopen"] = sorted(i.id for i in tq.jobs())
    out["held_after_reopen"] = sorted(i.id for i in tq.jobs() if i.held)

    # The file is now "clean": running jobs must not write into the Scene.
    scene_before = [s.taskqueue_saved for s in bpy.data.scenes]
    out["is_dirty_after_open"] = bool(bpy.data.is_dirty)
    out["held_before_release"] = tq.stats().held
    out["release_op"] = op(bpy.ops.taskqueue.release)  # the notice's Resume button
    out["held_after_release"] = tq.stats().held
    out["recovery_after_release"] = _recovery()
    out["waited"] = tq.wait(None, timeout=WAIT_S)  # every unfinished job
    for _ in range(3):
        tq.pump()
    out["final_states"] = {i.id: i.state.value for i in tq.jobs()}
    out["is_dirty_after_jobs"] = bool(bpy.data.is_dirty)
    out["scene_property_untouched"] = [s.taskqueue_saved for s in bpy.data.scenes] == scene_before
    out["rows_final"] = rows()
    out["order_final"] = [i.id for i in tq.jobs()]
    return out


# ---------------------------------------------------------------------------
# 5. enable / disable ten times


def scenario_cycles(n: str) -> dict[str, Any]:
    boot()
    cycles = int(n)
    out: dict[str, Any] = {"cycles": []}
    shared = sys.modules["_blender_taskqueue_shared"]
    old_pumps: list[weakref.ref] = []
    old_engines: list[weakref.ref] = []
    for k in range(cycles):
        if k:
            enable = op(bpy.ops.preferences.addon_enable, module=MODULE)
            attach()
        else:
            enable = {"result": ["FINISHED"], "error": None}
        job = tq.submit("demo.render", {"frames": 1, "seconds_per_frame": 0})
        ran = tq.wait([job], timeout=WAIT_S) and tq.get(job).state.value == "completed"
        the_pump = pump()
        old_pumps.append(weakref.ref(the_pump))
        old_engines.append(weakref.ref(tq.engine()))
        del the_pump
        disable = op(bpy.ops.preferences.addon_disable, module=MODULE)
        gc.collect()
        cycle = {
            "enable": enable, "disable": disable, "job_ran": ran,
            "threads": taskqueue_threads(),
            "alias": "blender_taskqueue" in sys.modules,
            "shared_engine": shared.engine is not None,
            "shared_pump": shared.pump is not None,
            "runtime_pump": runtime().pump() is not None,
            "handlers": addon_handlers(),
            "wm_property": hasattr(bpy.types.WindowManager, "taskqueue"),
            "scene_property": hasattr(bpy.types.Scene, "taskqueue_saved"),
            "operators": hasattr(bpy.types, "TASKQUEUE_OT_cancel"),
            "panel": hasattr(bpy.types, "VIEW3D_PT_taskqueue"),
            "timers_of_old_pumps": sum(
                len(registered_timer_methods(p)) for p in (r() for r in old_pumps) if p is not None
            ),
            "old_pumps_alive": sum(1 for r in old_pumps if r() is not None),
            "old_engines_alive": sum(1 for r in old_engines if r() is not None),
            "rss_mb": round(rss_mb(), 1),
            "gc_objects": len(gc.get_objects()),
        }
        out["cycles"].append(cycle)
    return out


# ---------------------------------------------------------------------------
# 6. pump tick cost


def scenario_pump() -> dict[str, Any]:
    boot()
    out: dict[str, Any] = {}
    p = pump()
    eng = tq.engine()

    # Idle, nothing at all.
    out["empty_tick"] = [p.tick() for _ in range(3)]

    # Which sidebars a change redraws (plain stand-ins: the bpy module has no windows).
    from types import SimpleNamespace as NS

    shows = sub("blender.pump").shows_panel
    out["shows_panel"] = {
        "our_tab": shows(NS(show_region_ui=True), NS(active_panel_category="Task Queue")),
        "other_tab": shows(NS(show_region_ui=True), NS(active_panel_category="Item")),
        "hidden": shows(NS(show_region_ui=False), NS(active_panel_category="Task Queue")),
        "unsupported": shows(NS(show_region_ui=True), NS(active_panel_category="UNSUPPORTED")),
        "old_blender": shows(NS(show_region_ui=True), NS()),
        "has_attribute": "active_panel_category" in bpy.types.Region.bl_rna.properties.keys(),
    }

    # 1,000 queued jobs, paused.
    tq.pause()
    started = time.perf_counter()
    ids = tq.submit_many([{"kind": "demo.render", "params": {"frames": 1, "seconds_per_frame": 0}}] * 1000)
    out["submit_1000_ms"] = (time.perf_counter() - started) * 1000
    t0 = time.perf_counter()
    first = p.tick()
    out["first_tick_1000"] = {"returned": first, "ms": (time.perf_counter() - t0) * 1000}
    out["rows_1000"] = len(rows())
    p.tick_times.clear()
    out["paused_1000_returns"] = sorted({p.tick() for _ in range(300)})
    out["paused_1000_stats"] = p.tick_stats_ms()
    # At 10 Hz every fifth tick also refreshes the counts (every 0.5 s): measure that tick.
    p.tick_times.clear()
    returns = set()
    for _ in range(100):
        p._stats_at = 0.0  # due now
        returns.add(p.tick())
    out["paused_1000_stats_refresh_returns"] = sorted(returns)
    out["paused_1000_stats_refresh"] = p.tick_stats_ms()
    # A reorder makes the next tick re-read the order and rewrite the rows.
    p.tick_times.clear()
    for k in range(30):
        eng.move(ids[k * 7], "top")
        returns.add(p.tick())
    out["paused_1000_reorder"] = p.tick_stats_ms()
    out["rows_follow_reorder"] = rows()[:30] == [ids[k * 7] for k in reversed(range(30))]

    # Held jobs only: idle too.
    for job_id in ids:
        eng.cancel(job_id)
    tq.clear_finished()
    held = tq.submit("demo.render", {"frames": 1}, held=True)
    tq.resume()
    out["held_only_returns"] = sorted({p.tick() for _ in range(5)})
    tq.cancel(held)
    tq.clear_finished()

    # 8 running jobs flooding progress.
    prefs().workers = 8
    gate = threading.Event()
    cond = threading.Condition()
    counter = [0]
    started = [0]

    @tq.job_kind("t.flood")
    def flood(ctx: Any, params: dict) -> int:
        with cond:
            started[0] += 1
            cond.notify_all()
        n = 0
        while not gate.is_set():
            n += 1
            ctx.progress((n % 1000) / 1000, stage=f"step {n}")
            with cond:
                counter[0] += 1
                if counter[0] % 50 == 0:
                    cond.notify_all()
        return n

    flood_ids = tq.submit_many([{"kind": "t.flood"}] * 8)

    with cond:
        if not cond.wait_for(lambda: started[0] == 8, timeout=WAIT_S):
            raise TimeoutError(f"only {started[0]} of 8 flood jobs started")
    p.tick()
    p.tick_times.clear()
    returns = set()
    batch = 8 * 50  # progress calls between two ticks
    for _ in range(150):
        with cond:
            target = counter[0] + batch
            if not cond.wait_for(lambda target=target: counter[0] >= target, timeout=WAIT_S):
                raise TimeoutError("the flood jobs stopped reporting progress")
        returns.add(p.tick())
    out["flood_returns"] = sorted(returns)
    out["flood_stats"] = p.tick_stats_ms()
    out["flood_progress_calls"] = counter[0]
    out["flood_running_seen"] = p.mirror.stats.running if p.mirror.stats else None

    # A lower refresh rate: progress alone redraws at most that often...
    p.progress_interval_s = 0.5
    p.tick()
    before, t0 = p.redraws, time.monotonic()
    ticks = 0
    while time.monotonic() - t0 < 1.2:  # the throttle is about time: tick for 1.2 s
        ticks += 1
        with cond:
            target = counter[0] + batch
            if not cond.wait_for(lambda target=target: counter[0] >= target, timeout=WAIT_S):
                raise TimeoutError("the flood jobs stopped reporting progress")
        p.tick()
    out["throttled"] = {"redraws": p.redraws - before, "seconds": time.monotonic() - t0, "ticks": ticks}
    # ... but a state change shows at once.
    before = p.redraws
    quick = tq.submit("demo.render", {"frames": 1, "seconds_per_frame": 0}, label="state change")
    p.tick()
    out["urgent_redraws"] = p.redraws - before
    p.progress_interval_s = 0.1
    gate.set()
    out["flood_waited"] = tq.wait([*flood_ids, quick], timeout=WAIT_S)
    out["after_flood_returns"] = [p.tick() for _ in range(2)]
    out["main_calls_left"] = eng.pending_main_calls
    return out


# ---------------------------------------------------------------------------
# 7. the script ends while a job ignores cancellation


def scenario_stuck_exit() -> dict[str, Any]:
    boot()
    started = threading.Event()

    @tq.job_kind("t.stuck")
    def stuck(ctx: Any, params: dict) -> None:
        started.set()
        threading.Event().wait()  # never returns, never looks at ctx.cancelled

    job = tq.submit("t.stuck", label="stuck forever")
    if not started.wait(WAIT_S):
        raise TimeoutError("the stuck job never started")
    out = {"job": job, "state": tq.get(job).state.value, "sidecar": str(tq.engine().sidecar_path),
           "ended_at": time.time()}
    return out  # the script ends here, without disabling the add-on


# ---------------------------------------------------------------------------
# 8. Blender's "Allow Online Access"


def scenario_online() -> dict[str, Any]:
    boot()
    out: dict[str, Any] = {"bpy_online_access": bool(getattr(bpy.app, "online_access", True))}
    p = pump()
    system = bpy.context.preferences.system

    @tq.job_kind("t.net", network=True)
    def net(ctx: Any, params: dict) -> str:
        return "fetched"

    @tq.job_kind("t.local")
    def local(ctx: Any, params: dict) -> str:
        return "local"

    def try_submit(kind: str) -> dict[str, Any]:
        try:
            job_id = tq.submit(kind)
        except Exception as exc:  # report whatever was raised; the test checks the type
            return {"accepted": None, "error_type": type(exc).__name__,
                    "is_not_permitted": isinstance(exc, tq.NotPermitted), "message": str(exc)}
        tq.wait([job_id], timeout=WAIT_S)
        return {"accepted": job_id, "error_type": None, "result": tq.get(job_id).result}

    def set_online(value: bool) -> None:
        system.use_online_access = value
        p.tick()  # the pump re-reads bpy.app.online_access on every tick

    # As the bpy module starts: offline (check, since a test would prove nothing otherwise).
    p.tick()
    out["pump_online_access"] = p.online_access
    before = snapshot()
    out["net_offline"] = try_submit("t.net")
    try:
        tq.submit_many([{"kind": "t.local"}, {"kind": "t.net"}])
        out["many_offline"] = "accepted"
    except Exception as exc:
        out["many_offline"] = type(exc).__name__
    out["offline_queue_unchanged"] = snapshot() == before
    out["local_offline"] = try_submit("t.local")

    # "Allow Online Access" turned on in the preferences.
    set_online(True)
    out["bpy_online_access_on"] = bool(bpy.app.online_access)
    out["pump_online_access_on"] = p.online_access
    out["net_online"] = try_submit("t.net")

    # ... and off again.
    set_online(False)
    out["bpy_online_access_off"] = bool(bpy.app.online_access)
    out["pump_online_access_off"] = p.online_access
    out["net_off_again"] = try_submit("t.net")
    return out


# ---------------------------------------------------------------------------
# 9. render the open file in the background, and the job's output in the panel


def scenario_background_render(folder: str) -> dict[str, Any]:
    boot()
    out: dict[str, Any] = {}
    scene = bpy.context.scene
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.frame_start, scene.frame_end, scene.frame_current = 1, 3, 2
    scene.render.filepath = "//renders/shot_"  # where F12 would write: the job writes there too
    user_file = os.path.join(folder, "user.blend")
    bpy.ops.wm.save_as_mainfile(filepath=user_file)
    bpy.ops.mesh.primitive_monkey_add()  # an unsaved change the copy must carry
    out["dirty_before"] = bpy.data.is_dirty
    out["user_file_mtime"] = os.path.getmtime(user_file)
    background = sub("blender.background")
    operators = sub("blender.operators")
    opened: list[str] = []
    operators.open_path = opened.append  # no file browser in a test

    out["op_range"] = op(bpy.ops.taskqueue.render_in_background, frames="RANGE", format="PNG")
    job = runtime().selected_job_id()
    out["op_current"] = op(bpy.ops.taskqueue.render_in_background, frames="CURRENT", format="JPEG",
                           priority="high")
    current = runtime().selected_job_id()
    console = tq.render_current_file(frame=1, label="from the console", memory_mb=None,
                                     output_dir=os.path.join(folder, "console"))
    out["waited"] = tq.wait([job, current, console], timeout=120)
    out["range"], out["current"], out["console"] = info(job), info(current), info(console)
    copy = out["range"]["params"]["blend_file"]
    out["copy_exists"] = os.path.isfile(copy)
    out["work_dir"] = str(tq.engine().workdir_for(job).parent)
    # The copy holds the unsaved monkey; the user's file and its state are untouched.
    out["filepath_after"] = bpy.data.filepath
    out["dirty_after"] = bpy.data.is_dirty
    out["user_file_mtime_after"] = os.path.getmtime(user_file)
    out["files_exist"] = [os.path.isfile(f) for f in (out["range"]["result"] or {}).get("files", [])]
    out["memory_mb"] = tq.get(job).memory_mb
    out["estimate"] = background.estimate_memory_mb(scene)

    # The details' output: the log's last lines, and the buttons' targets.
    i = tq.get(job)
    log = background.log_path(tq.engine(), i)
    out["log"] = str(log) if log else None
    out["tail"] = background.tail(log) if log else []
    out["output_dir"] = str(background.output_dir(tq.engine(), i))
    out["open_folder"] = op(bpy.ops.taskqueue.open_output, job_id=job, what="FOLDER")
    out["open_log"] = op(bpy.ops.taskqueue.open_output, job_id=job, what="LOG")
    plain = tq.submit("demo.render", {"frames": 1, "seconds_per_frame": 0}, label="no program")
    tq.wait([plain], timeout=WAIT_S)
    out["open_log_plain"] = op(bpy.ops.taskqueue.open_output, job_id=plain, what="LOG")
    out["opened"] = opened

    # Bad input: a scene that does not exist, a bad memory_mb; nothing queued, no copy left.
    before = len(tq.jobs())
    copies = sorted(os.listdir(tq.engine().workdir_for("copies")))
    for name, kwargs in {"bad_scene": {"scene": "Nope"}, "bad_memory": {"memory_mb": "lots"},
                         "bad_format": {"format": "GIF"}}.items():
        try:
            background.render_current_file(**kwargs)
            out[name] = "accepted"
        except Exception as exc:  # noqa: BLE001
            out[name] = f"{type(exc).__name__}: {exc}"
    out["queued_after_bad"] = len(tq.jobs()) - before
    out["copies_after_bad"] = sorted(os.listdir(tq.engine().workdir_for("copies"))) == copies

    # Where the scene's output path sends the frames (the default is the folder "/tmp/").
    outputs = {}
    for path in ("/tmp/", "//renders/shot_", os.path.join(folder, "out", "take_##_"), ""):
        scene.render.filepath = path
        outputs[path or "empty"] = list(background.scene_output(scene))
    out["scene_outputs"] = outputs

    # A cancelled render keeps its copy (for a retry) until it is cleared.
    held = tq.render_current_file(frame=1, held=True, memory_mb=None)
    held_copy = tq.get(held).params["blend_file"]
    tq.cancel(held)
    stray = os.path.join(str(tq.engine().workdir_for("copies")), "left-by-a-crash.blend")
    with open(stray, "wb") as fh:
        fh.write(b"BLENDER")
    for path in (held_copy, stray):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    out["sweep_while_listed"] = sub("blender.background").sweep_copies(tq.engine())
    out["held_copy_kept"] = os.path.isfile(held_copy)
    out["clear"] = op(bpy.ops.taskqueue.clear_finished)
    out["held_copy_after_clear"] = os.path.isfile(held_copy)
    out["stray_after_clear"] = os.path.isfile(stray)
    return out


# ---------------------------------------------------------------------------


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main(argv: list[str]) -> int:
    global ZIP
    name, ZIP, *args = argv
    report = SCENARIOS[name](*args)
    report["_pid"] = os.getpid()
    print(REPORT_PREFIX + json.dumps(report, default=repr), flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(2)  # do not hang in the add-on's exit handlers after a failure
    sys.exit(code)
