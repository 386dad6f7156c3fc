"""The add-on in the real ``bpy`` module: registration, operators, the .blend queue,
enable/disable cycles, the pump, quitting, and online access.

Each scenario of ``bpy_scenarios.py`` runs once per session in its own bpy
process (a fresh Blender profile and fresh XDG folders, see conftest.py) with
the extension zip installed by Blender's own installer; the tests here assert
on the JSON report it prints. Several tests share one scenario's report, so a
broken scenario fails every test that reads it, each naming what it checks.

Needs ``TASKQUEUE_BPY_PYTHON`` (``bash scripts/setup_bpy.sh``); skipped without it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest

Scenario = Callable[..., dict[str, Any]]  # the `scenario` fixture of conftest.py
SCENARIOS_SCRIPT = Path(__file__).with_name("bpy_scenarios.py")

pytestmark = [pytest.mark.blender, pytest.mark.timeout(180)]

MODULE = "bl_ext.user_default.blender_taskqueue"
OPERATORS = {
    "cancel", "retry", "retry_with_changes", "move", "release", "release_details", "discard_held", "dismiss_notice",
    "clear_finished", "pause", "resume", "show_traceback", "notify", "submit_demo",
    "open_output", "render_in_background", "generate", "open_image", "show_panel",
}
ACTIVE_S = 0.1
IDLE_S = 0.5


def ok(result: dict[str, Any]) -> bool:
    return result == {"result": ["FINISHED"], "error": None}


def error_of(result: dict[str, Any]) -> str:
    assert result["result"] is None and result["error"], f"expected an error report, got {result}"
    return str(result["error"])


# ---------------------------------------------------------------------------
# 1. Registration surface


@pytest.fixture(scope="module")
def surface(scenario: Scenario) -> dict[str, Any]:
    return scenario("surface")


def test_importing_the_addon_starts_nothing(surface: dict[str, Any]) -> None:
    before = surface["import_only"]
    assert before["package_file"].endswith("/extensions/user_default/blender_taskqueue/__init__.py")
    assert before == {**before, "threads": [], "engine": False, "alias": False, "operators": False}
    assert ok(surface["enable"])


def test_preferences_class_and_ranges(surface: dict[str, Any]) -> None:
    assert surface["prefs_bl_idname"] == MODULE
    assert surface["prefs_class"] == "TASKQUEUE_AddonPreferences"
    prefs = surface["prefs"]
    assert prefs["workers"] == {"type": "INT", "default": 4, "min": 1, "max": 8, "value": 4}
    assert prefs["max_queued"] == {"type": "INT", "default": 10_000, "min": 1, "max": 1_000_000, "value": 10_000}
    assert prefs["history_limit"] == {"type": "INT", "default": 500, "min": 0, "max": 100_000, "value": 500}
    for name in ("min_free_memory_mb", "max_memory_mb"):
        assert prefs[name]["type"] == "INT" and prefs[name]["min"] == 0, prefs[name]
    assert prefs["min_free_memory_mb"]["default"] == 1024 and prefs["max_memory_mb"]["default"] == 0
    assert prefs["auto_resume"] == {"type": "BOOLEAN", "default": True, "value": True}
    assert prefs["state_dir"] == {"type": "STRING", "default": "", "subtype": "DIR_PATH", "value": ""}
    assert prefs["blender_path"] == {"type": "STRING", "default": "", "subtype": "FILE_PATH", "value": ""}
    assert prefs["refresh_hz"] == {"type": "INT", "default": 10, "min": 1, "max": 10, "value": 10}
    assert prefs["log_level"]["items"] == ["DEBUG", "INFO", "WARNING", "ERROR"]
    assert prefs["log_level"]["default"] == "INFO"
    # The engine starts from the preferences (0 MB means "no limit").
    assert surface["engine_config"] == {
        "max_workers": 4, "max_queued": 10_000, "history_limit": 500, "min_free_memory_mb": 1024,
        "max_memory_mb": None, "auto_resume": True, "log_level": "INFO",
    }


def test_preferences_apply_live(surface: dict[str, Any]) -> None:
    live = surface["live"]
    assert live["workers_2"] == 2 and live["workers_8"] == 8
    assert live["running_at_8"] == 8 and live["blockers_done"], "eight workers run eight jobs at once"
    assert live["workers_99"] == [8, 8] and live["workers_0"] == [1, 1], "out-of-range values are clamped"
    assert live["history_limit"] == 7
    assert live["auto_resume"] is False
    assert live["log_level"] == "DEBUG"
    assert live["min_free_memory_mb_0"] is None and live["max_memory_mb"] == 4096
    assert live["max_queued"] == 2 and live["third_submit"].startswith("QueueFull:")
    assert live["progress_interval_s"] == 0.25, "Progress Refresh 4 Hz redraws progress every 0.25 s"
    assert live["render_blender"] == "/opt/blender-for-renders/blender"
    assert live["render_blender_cleared"] is None


def test_queue_and_log_live_in_the_user_state_folder(surface: dict[str, Any]) -> None:
    state = Path(surface["xdg_state_home"])
    assert Path(surface["sidecar_path"]).parent == state / "blender_taskqueue"
    assert Path(surface["log_path"]).is_relative_to(state / "blender_taskqueue")
    assert "/extensions/" not in surface["sidecar_path"], "writable data must stay out of the add-on folder"


def test_state_folder_change_leaves_the_running_queue_where_it_is(surface: dict[str, Any]) -> None:
    assert Path(surface["state_dir_now"]) == Path(surface["sidecar_path"])
    assert Path(surface["state_dir_config"]) == Path(surface["sidecar_path"]).parent


def test_panels_list_and_property_groups_are_registered(surface: dict[str, Any]) -> None:
    main, details = surface["panels"]["VIEW3D_PT_taskqueue"], surface["panels"]["VIEW3D_PT_taskqueue_details"]
    assert main == {"registered": True, "space": "VIEW_3D", "region": "UI", "category": "Task Queue", "parent": ""}
    assert details == {**main, "parent": "VIEW3D_PT_taskqueue"}
    assert surface["uilist"] is True
    assert surface["property_groups"] == {"TASKQUEUE_PG_job": True, "TASKQUEUE_PG_state": True}
    assert surface["wm_property"] and surface["scene_property"]


def test_every_operator_is_registered_under_taskqueue(surface: dict[str, Any]) -> None:
    ops = surface["ops"]
    assert set(ops) == OPERATORS
    for name, entry in ops.items():
        assert entry == {"class": f"TASKQUEUE_OT_{name}", "registered": True, "poll": True}, name
    classes = surface["op_classes"]
    assert set(classes) == {f"TASKQUEUE_OT_{name}" for name in OPERATORS}
    for cls, (idname, registered) in classes.items():
        assert idname == "taskqueue." + cls.removeprefix("TASKQUEUE_OT_") and registered, cls


def test_console_alias_handlers_and_one_timer(surface: dict[str, Any]) -> None:
    assert surface["alias_is_package"], "`import blender_taskqueue` must give the add-on's package"
    assert surface["tq_jobs_callable"] and surface["tq_engine_callable"], (
        "tq.jobs / tq.engine must be the API functions, not sub-packages of the same name"
    )
    assert surface["handlers"] == {"save_pre": 1, "save_post": 0, "load_pre": 0, "load_post": 1,
                                   "depsgraph_update_post": 0}
    assert surface["timer_registered"] == ["_timer"], "exactly one pump timer"


# ---------------------------------------------------------------------------
# 2. ctx.call_on_main


@pytest.fixture(scope="module")
def main_calls(scenario: Scenario) -> dict[str, Any]:
    return scenario("main_calls")


def test_jobs_create_objects_through_the_main_thread(main_calls: dict[str, Any]) -> None:
    assert main_calls["waited"]
    one = main_calls["one"]
    assert one["state"] == "completed"
    assert one["result"] == {"name": "TQCube", "on_main": True, "worker_on_main": False}
    assert main_calls["object_exists"]
    assert main_calls["many_states"] == ["completed"] and main_calls["many_objects"] == 40
    assert main_calls["main_calls_left"] == 0


def test_an_exception_on_the_main_thread_is_the_jobs_error(main_calls: dict[str, Any]) -> None:
    err = main_calls["error_job"]
    assert err["state"] == "failed"
    assert err["error"]["type"] == "KeyError" and "no such object" in err["error"]["message"]
    assert "in broken" in err["error"]["traceback"], "the traceback shows the main-thread function"
    assert main_calls["caught_job"]["result"] == {"caught": "ValueError", "message": "bad collection name"}


def test_completion_callbacks_run_on_the_main_thread(main_calls: dict[str, Any]) -> None:
    assert main_calls["on_finished_calls"] == 43
    assert main_calls["on_finished_all_on_main"]


# ---------------------------------------------------------------------------
# 3. Operators on real jobs


@pytest.fixture(scope="module")
def operators(scenario: Scenario) -> dict[str, Any]:
    return scenario("operators")


def test_pause_and_resume_operators(operators: dict[str, Any]) -> None:
    assert ok(operators["pause"]) and operators["paused_after_pause"] == [True, True]
    assert ok(operators["resume"]) and operators["paused_after_resume"] == [False, False]


def test_cancel_operator_on_queued_and_running_jobs(operators: dict[str, Any]) -> None:
    assert ok(operators["cancel_queued"]) and operators["cancel_queued_state"] == "cancelled"
    assert ok(operators["cancel_running"]) and operators["cancel_running_waited"]
    assert operators["cancel_running_info"]["state"] == "cancelled"
    # A job that ignores the request keeps running, shows it, and its result is discarded.
    assert ok(operators["cancel_stubborn"])
    pending = operators["cancel_stubborn_pending"]
    assert pending["state"] == "running" and pending["cancel_pending"] is True
    final = operators["cancel_stubborn_final"]
    assert operators["cancel_stubborn_waited"]
    assert final["state"] == "cancelled" and final["result"] is None and not final["cancel_pending"]
    assert ok(operators["cancel_finished_again"]), "cancelling a finished job is a warning, not an error"


def test_retry_operator_queues_a_new_selected_job(operators: dict[str, Any]) -> None:
    failed = operators["failed_info"]
    assert failed["state"] == "failed" and failed["error"]["type"] == "RuntimeError"
    assert ok(operators["retry"])
    (new,) = operators["retry_new"]
    assert new["id"] != failed["id"]
    assert (new["kind"], new["params"], new["label"]) == (failed["kind"], failed["params"], failed["label"])
    assert operators["retry_selected_row"] == new["id"], "the new job is selected in the list"
    assert "only finished jobs" in error_of(operators["retry_running"])


def test_retry_from_the_selected_row_selects_the_new_job(operators: dict[str, Any]) -> None:
    assert ok(operators["retry_selected"])
    (new,) = operators["retry_selected_new"]
    assert new["kind"] == "t.fail" and new["id"] != operators["failed_info"]["id"]
    assert operators["retry_selected_row_after"] == new["id"]


def test_retry_with_changes_operator(operators: dict[str, Any]) -> None:
    assert "not valid JSON" in error_of(operators["rwc_bad_json"])
    assert "must be a JSON object" in error_of(operators["rwc_not_object"])
    assert "frames" in error_of(operators["rwc_invalid_params"])
    assert "only finished jobs" in error_of(operators["rwc_running"])
    assert operators["rwc_count_unchanged"], "a refused retry must queue nothing"
    assert ok(operators["rwc_ok"])
    (new,) = operators["rwc_new"]
    assert new["params"]["frames"] == 2 and new["params"]["seconds_per_frame"] == 0, "changes merge into the params"
    assert new["label"] == "to change"
    assert operators["rwc_waited"] and operators["rwc_final"][0]["result"] == {"frames": 2, "resumed_from": 0}


def test_move_operators_reorder_within_the_priority(operators: dict[str, Any]) -> None:
    assert operators["move_start"] == ["urgent", "m0", "m1", "m2", "m3"]
    expected = [
        ("m3", "top", ["urgent", "m3", "m0", "m1", "m2"]),
        ("m3", "down", ["urgent", "m0", "m3", "m1", "m2"]),
        ("m0", "bottom", ["urgent", "m3", "m1", "m2", "m0"]),
        ("m0", "up", ["urgent", "m3", "m1", "m0", "m2"]),
        ("m2", "top", ["urgent", "m2", "m3", "m1", "m0"]),
    ]
    for move, (job, where, order) in zip(operators["moves"], expected, strict=True):
        assert (move["job"], move["where"]) == (job, where)
        assert ok({"result": move["result"], "error": move["error"]}), move
        assert move["order"] == order, f"{job} {where}"
        assert move["rows"] == order, f"the list rows follow the order after {job} {where}"
    # Without job_id the operator acts on the selected row (m1).
    assert ok({k: operators["move_selected"][k] for k in ("result", "error")})
    assert operators["move_selected"]["order"] == ["urgent", "m1", "m2", "m3", "m0"]
    assert "sideways" in error_of(operators["move_bad_where"])
    assert "only queued jobs" in error_of(operators["move_finished"])
    assert operators["move_priorities"] == [5], "moving never changes the priority"


def test_release_and_discard_held_operators(operators: dict[str, Any]) -> None:
    assert operators["held_before"] == [True, True, True, True]
    assert ok(operators["release_one"]) and operators["held_after_one"] == [False, True, True, True]
    assert "only queued jobs" in error_of(operators["release_finished"])
    assert ok(operators["discard_held"])
    assert operators["after_discard"] == ["queued", "cancelled", "cancelled", "cancelled"]
    assert ok(operators["release_all"]) and operators["held_after_all"] == [False, False]
    assert operators["released_waited"] and operators["released_states"] == ["completed"] * 3


def test_notify_and_submit_demo_operators(operators: dict[str, Any]) -> None:
    assert ok(operators["notify"])
    notices = operators["notices"]
    # One report a second at most: a batch names its first job and counts the rest.
    assert any(
        level == "warning" and text.startswith("'failing' failed: RuntimeError: boom: first try")
        for level, text in notices
    ), notices
    assert any(level == "info" and " completed" in text for level, text in notices), notices
    assert ok(operators["submit_demo"])
    assert [job[:2] for job in operators["demo_jobs"]] == operators["demo_expected"]
    assert {job[2] for job in operators["demo_jobs"]} == {"queued"}


def test_clear_finished_operator(operators: dict[str, Any]) -> None:
    assert operators["finished_before_clear"] > 10
    assert ok(operators["clear_finished"])
    assert operators["after_clear"] == {"jobs": 0, "rows": 0, "stats_finished_kept": 0}
    assert ok(operators["dismiss_notice"])


def test_bad_job_ids_and_no_selection_are_errors_that_change_nothing(operators: dict[str, Any]) -> None:
    for name, result in operators["bad_id"].items():
        assert "unknown job id 'no-such-job'" in error_of(result), name
    assert set(operators["bad_id"]) == {"cancel", "retry", "retry_with_changes", "move", "release",
                                        "show_traceback"}
    for name, result in operators["no_selection"].items():
        assert "No job selected" in error_of(result), name
    assert operators["bad_input_changed_nothing"]


def test_show_traceback_operator(run_bpy: Any, linux_zip: Path) -> None:
    # Its own process: a popup in background mode once took Blender down (SIGSEGV).
    report, proc = run_bpy(SCENARIOS_SCRIPT, "show_traceback", str(linux_zip), timeout=120, check=False)
    assert proc.returncode == 0 and report is not None, (
        f"Blender died (exit {proc.returncode}) in taskqueue.show_traceback\n{proc.stdout[-2000:]}"
    )
    assert report["show_traceback_no_error"] == {"result": ["CANCELLED"], "error": None}
    assert ok(report["show_traceback"])
    error = report["failed_info"]["error"]
    if report["clipboard_roundtrip"] == "before":  # a working clipboard holds the traceback
        assert "RuntimeError: boom: for the traceback" in report["clipboard"]
        assert error["traceback"].rstrip().splitlines()[-1] in report["clipboard"]
    else:  # background mode has no clipboard: nothing to check but that it did not fail
        assert report["background"] and report["clipboard"] == ""


# ---------------------------------------------------------------------------
# 4. The queue inside the .blend


@pytest.fixture(scope="module")
def saved(scenario: Scenario, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    blend = str(tmp_path_factory.mktemp("blend") / "queue.blend")
    return blend, scenario("persist_save", blend)


@pytest.fixture(scope="module")
def opened_untrusted(scenario: Scenario, saved: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return scenario("persist_open", saved[0], "untrusted", "on")


def test_saving_writes_the_queue_into_the_file(saved: tuple[str, dict[str, Any]]) -> None:
    blend, report = saved
    assert ok(report["save"]) and Path(blend).is_file()
    assert report["saved_ids"] == sorted([report["finished"], *report["queued"]])
    assert report["saved_in_scenes"] == [True]


def test_reopening_in_the_same_session_adopts_nothing_twice(saved: tuple[str, dict[str, Any]]) -> None:
    _, report = saved
    assert ok(report["reopen"])
    assert report["ids_after_reopen"] == report["saved_ids"]
    assert report["order_after_reopen"] == report["order"]
    assert {state for state, _held in report["states_after_reopen"].values()} == {"queued", "completed"}
    assert not any(held for _state, held in report["states_after_reopen"].values()), "known jobs stay as they are"
    assert report["recovery_after_reopen"] is None


def test_fresh_profile_restores_untrusted_jobs_held(
    saved: tuple[str, dict[str, Any]], opened_untrusted: dict[str, Any]
) -> None:
    _, before = saved
    after = opened_untrusted
    assert after["jobs_before_open"] == 0 and ok(after["open"])
    queued = before["queued"]
    assert set(after["jobs"]) == set(before["saved_ids"]), "the same ids come back"
    for job_id in queued:
        assert after["jobs"][job_id]["state"] == "queued" and after["jobs"][job_id]["held"], job_id
    assert after["jobs"][before["finished"]] == {"state": "completed", "held": False,
                                                 "label": "finished before save", "priority": 5}
    assert after["order"] == before["order"], "the saved dispatch order is kept"
    assert after["rows"] == after["order"], "the restored jobs appear in the list"
    recovery = after["recovery"]
    assert recovery is not None and recovery["sources"] == ["queue.blend"]
    assert (recovery["requeued"], recovery["held"], recovery["finished"]) == (4, 4, 1)
    assert after["stats_held"] == 4
    # Opening it again adds nothing.
    assert ok(after["reopen"]) and after["ids_after_reopen"] == sorted(before["saved_ids"])
    assert after["held_after_reopen"] == sorted(queued)
    # Released (the notice's Resume button), they run, and the notice goes away.
    assert after["held_before_release"] == 4 and ok(after["release_op"]) and after["held_after_release"] == 0
    assert after["recovery_after_release"] is None
    assert after["waited"]
    assert after["final_states"] == {job_id: "completed" for job_id in before["saved_ids"]}


def test_trusted_file_with_auto_resume_runs_its_jobs(
    scenario: Scenario, saved: tuple[str, dict[str, Any]]
) -> None:
    blend, before = saved
    after = scenario("persist_open", blend, "trusted", "on")
    assert set(after["jobs"]) == set(before["saved_ids"])
    assert not any(job["held"] for job in after["jobs"].values())
    assert after["recovery"]["held"] == 0 and after["held_before_release"] == 0
    assert after["waited"]
    assert after["final_states"] == {job_id: "completed" for job_id in before["saved_ids"]}


def test_trusted_file_without_auto_resume_holds_its_jobs(
    scenario: Scenario, saved: tuple[str, dict[str, Any]]
) -> None:
    blend, before = saved
    after = scenario("persist_open", blend, "trusted", "off")
    assert [job_id for job_id, job in after["jobs"].items() if job["held"]] == [
        job_id for job_id in after["order"] if job_id in before["queued"]
    ]
    assert after["held_before_release"] == 4 and after["held_after_release"] == 0 and after["waited"]
    assert after["final_states"] == {job_id: "completed" for job_id in before["saved_ids"]}


def test_running_jobs_do_not_write_into_the_scene(opened_untrusted: dict[str, Any], capsys: Any) -> None:
    after = opened_untrusted
    assert after["scene_property_untouched"], "progress ticks must not write the Scene property"
    with capsys.disabled():
        print(f"\n[blender] bpy.data.is_dirty after opening a saved file: {after['is_dirty_after_open']}, "
              f"after running its jobs: {after['is_dirty_after_jobs']}")
    if not after["is_dirty_after_open"]:  # the bpy module reports every file dirty; a real Blender does not
        assert not after["is_dirty_after_jobs"], "running jobs made the file dirty"


def test_a_damaged_queue_in_a_file_is_reported_and_changes_nothing(saved: tuple[str, dict[str, Any]]) -> None:
    _, report = saved
    assert ok(report["save_damaged"]) and ok(report["open_damaged"])
    assert report["damaged_notices"] and report["damaged_notices"][0][0] == "error", report["damaged_notices"]
    assert "damaged.blend" in report["damaged_notices"][0][1]
    assert report["damaged_changed_nothing"]


def test_list_rows_follow_the_queue_after_reopening_a_file(
    saved: tuple[str, dict[str, Any]], opened_untrusted: dict[str, Any]
) -> None:
    _, report = saved
    assert report["rows_before_reopen"] == report["order"]
    assert report["rows_after_reopen_tick"] == report["order_after_reopen"]
    assert opened_untrusted["rows_final"] == opened_untrusted["order_final"]


# ---------------------------------------------------------------------------
# 5. Enable / disable ten times


CYCLES = 10


@pytest.fixture(scope="module")
def cycles(scenario: Scenario) -> list[dict[str, Any]]:
    report = scenario("cycles", str(CYCLES))
    assert len(report["cycles"]) == CYCLES
    return report["cycles"]


def test_enable_disable_cycles_leave_nothing_behind(cycles: list[dict[str, Any]], capsys: Any) -> None:
    for n, cycle in enumerate(cycles, 1):
        assert ok(cycle["enable"]) and ok(cycle["disable"]), n
        assert cycle["job_ran"], f"cycle {n}: the re-enabled add-on did not run a job"
        assert cycle["threads"] == [], f"cycle {n}: threads left behind: {cycle['threads']}"
        assert not cycle["alias"], f"cycle {n}: sys.modules['blender_taskqueue'] outlived the add-on"
        assert not cycle["shared_engine"] and not cycle["shared_pump"] and not cycle["runtime_pump"], n
        assert set(cycle["handlers"].values()) == {0}, f"cycle {n}: handlers left: {cycle['handlers']}"
        assert not (cycle["wm_property"] or cycle["scene_property"] or cycle["operators"] or cycle["panel"]), n
    rss = [c["rss_mb"] for c in cycles]
    objects = [c["gc_objects"] for c in cycles]
    with capsys.disabled():
        print(f"\n[blender] {CYCLES} enable/disable cycles: RSS {rss[0]:.1f} -> {rss[-1]:.1f} MB, "
              f"gc objects {objects[0]} -> {objects[-1]}")
    assert rss[-1] - rss[1] < 25.0, f"memory grows over enable/disable cycles: {rss}"
    assert objects[-1] - objects[1] < 20_000, f"objects pile up over enable/disable cycles: {objects}"


def test_disable_unregisters_the_pump_timer(cycles: list[dict[str, Any]]) -> None:
    for n, cycle in enumerate(cycles, 1):
        assert cycle["timers_of_old_pumps"] == 0, f"cycle {n}: {cycle['timers_of_old_pumps']} pump timers registered"
        assert cycle["old_pumps_alive"] == 0 and cycle["old_engines_alive"] == 0, (
            f"cycle {n}: {cycle['old_pumps_alive']} pumps, {cycle['old_engines_alive']} engines still alive"
        )


# ---------------------------------------------------------------------------
# 6. Pump tick cost


def test_pump_tick_cost_and_interval(scenario: Scenario, capsys: Any) -> None:
    report = scenario("pump")

    def fmt(stats: dict[str, Any]) -> str:
        return f"p50 {stats['p50_ms']:.3f} ms, p99 {stats['p99_ms']:.3f} ms, max {stats['max_ms']:.3f} ms, " \
               f"own CPU p99 {stats['cpu_p99_ms']:.3f} ms ({stats['ticks']} ticks)"

    with capsys.disabled():
        print(
            "\n[blender] pump tick cost (no speed bound asserted; see the benchmarks):"
            f"\n  submit_many(1000): {report['submit_1000_ms']:.1f} ms; first tick after it "
            f"(1000 new rows): {report['first_tick_1000']['ms']:.1f} ms"
            f"\n  1000 queued, paused, nothing changed: {fmt(report['paused_1000_stats'])}"
            f"\n  1000 queued, paused, counts refreshed: {fmt(report['paused_1000_stats_refresh'])}"
            f"\n  1000 queued, after a reorder: {fmt(report['paused_1000_reorder'])}"
            f"\n  8 running jobs flooding progress ({report['flood_progress_calls']} calls): "
            f"{fmt(report['flood_stats'])}"
        )
    assert report["empty_tick"] == [IDLE_S] * 3
    assert report["shows_panel"] == {
        "our_tab": True, "other_tab": False, "hidden": False, "unsupported": True,
        "old_blender": True, "has_attribute": True,
    }, "a hidden sidebar, or one on another tab, is never redrawn for the queue"
    assert report["first_tick_1000"]["returned"] == IDLE_S, "a paused queue is idle"
    assert report["rows_1000"] == 1000
    assert report["paused_1000_returns"] == [IDLE_S]
    assert report["paused_1000_stats_refresh_returns"] == [IDLE_S]
    assert report["paused_1000_stats"]["ticks"] == 300 and report["paused_1000_reorder"]["ticks"] == 30
    assert report["rows_follow_reorder"]
    assert report["held_only_returns"] == [IDLE_S], "held jobs alone keep the pump idle"
    assert report["flood_running_seen"] == 8
    assert report["flood_returns"] == [ACTIVE_S] and report["flood_stats"]["ticks"] == 150
    throttled = report["throttled"]
    assert 1 <= throttled["redraws"] <= throttled["seconds"] / 0.5 + 1, (
        f"progress alone redraws at most every 0.5 s at 2 Hz: {throttled}"
    )
    assert report["urgent_redraws"] == 1, "a state change redraws at once, whatever the rate"
    assert report["flood_waited"] and report["after_flood_returns"] == [IDLE_S, IDLE_S]
    assert report["main_calls_left"] == 0


# ---------------------------------------------------------------------------
# 7. Quitting with a stuck job


def test_quitting_with_a_stuck_job_does_not_hang(
    run_bpy: Any, linux_zip: Path, tmp_path: Path, capsys: Any
) -> None:
    started = time.monotonic()
    report, _proc = run_bpy(SCENARIOS_SCRIPT, "stuck_exit", str(linux_zip), home=tmp_path, timeout=60)
    ended = time.time()
    took = time.monotonic() - started
    assert report is not None and report["state"] == "running"
    exit_latency = ended - report["ended_at"]
    with capsys.disabled():
        print(f"\n[blender] script with a stuck job: process took {took:.1f} s, "
              f"{exit_latency:.1f} s from the script's end to the exit")
    assert took < 20.0 and exit_latency < 15.0, f"quitting took {took:.1f} s"
    sidecar = Path(report["sidecar"])
    assert sidecar.is_relative_to(tmp_path), "the queue must be kept in the throw-away profile"
    document = json.loads(sidecar.read_text(encoding="utf-8"))
    assert document["closed"] is True
    (job,) = [j for j in document["jobs"] if j["id"] == report["job"]]
    assert job["state"] == "interrupted", job
    assert "did not stop" in (job.get("message") or ""), job


# ---------------------------------------------------------------------------
# 8. Online access


def test_network_kinds_respect_online_access(scenario: Scenario) -> None:
    report = scenario("online")
    assert report["bpy_online_access"] is False, "the bpy module starts offline; the test relies on it"
    assert report["pump_online_access"] is False
    refused = report["net_offline"]
    assert refused["accepted"] is None and refused["is_not_permitted"], refused
    assert "Allow Online Access" in refused["message"]
    assert report["many_offline"] == "NotPermitted" and report["offline_queue_unchanged"], "all or nothing"
    assert report["local_offline"]["result"] == "local", "kinds that stay offline are not affected"
    assert report["bpy_online_access_on"] is True and report["pump_online_access_on"] is True
    assert report["net_online"]["result"] == "fetched"
    assert report["bpy_online_access_off"] is False and report["pump_online_access_off"] is False
    assert report["net_off_again"]["is_not_permitted"]


# ---------------------------------------------------------------------------
# 9. render the open file in the background


@pytest.fixture(scope="module")
def background_render(scenario: Scenario, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return scenario("background_render", str(tmp_path_factory.mktemp("user")), timeout=240.0)


def test_render_in_background_renders_a_copy(background_render: dict[str, Any]) -> None:
    r = background_render
    assert ok(r["op_range"]) and ok(r["op_current"]) and r["waited"]
    rng, cur = r["range"], r["current"]
    assert rng["state"] == "completed", rng["error"]
    assert rng["kind"] == "blender.render" and rng["label"].startswith("Render user (frames 1-3)")
    assert rng["result"]["frames"] == [1, 2, 3] and r["files_exist"] == [True, True, True]
    assert rng["result"]["engine"] == "BLENDER_WORKBENCH"
    assert rng["result"]["blender"].startswith("5.0"), "the bpy module renders with itself"
    assert cur["state"] == "completed", cur["error"]
    assert cur["result"]["frames"] == [2] and cur["result"]["files"][0].endswith("shot_0002.jpg")
    # The frames go where the scene's output path says, relative to the user's file.
    renders = Path(r["filepath_after"]).parent / "renders"
    assert rng["result"]["files"] == [str(renders / f"shot_{n:04d}.png") for n in (1, 2, 3)]
    assert cur["priority"] < rng["priority"], "the dialog's priority is used"
    console = r["console"]
    assert console["state"] == "completed" and console["label"] == "from the console", console["error"]
    assert console["result"]["frames"] == [1] and console["params"]["blend_file"] != rng["params"]["blend_file"]
    assert console["result"]["output_dir"] == str(Path(r["filepath_after"]).parent / "console")
    # A copy was rendered; the user's file, path and unsaved state are untouched.
    assert Path(rng["params"]["blend_file"]).parent == Path(r["work_dir"]) / "copies"
    assert not r["copy_exists"], "the copy is removed once every frame is written"
    assert r["filepath_after"].endswith("user.blend")
    assert r["dirty_before"] and r["dirty_after"]
    assert r["user_file_mtime_after"] == r["user_file_mtime"]


def test_background_render_reserves_its_memory_estimate(background_render: dict[str, Any]) -> None:
    r = background_render
    assert r["memory_mb"] is not None and r["memory_mb"] > 50, "Blender's own memory at the least"
    assert abs(r["memory_mb"] - r["estimate"]) < 200


def test_details_show_output_and_open_folder_and_log(background_render: dict[str, Any]) -> None:
    r = background_render
    assert r["log"] and r["log"].endswith("output.log")
    assert r["tail"] and any('"event": "done"' in line for line in r["tail"]), r["tail"]
    assert ok(r["open_folder"]) and ok(r["open_log"])
    assert r["opened"] == [r["output_dir"], r["log"]]
    assert r["output_dir"] == r["range"]["result"]["output_dir"]
    assert "has no log" in error_of(r["open_log_plain"])


def test_render_in_background_refuses_bad_input(background_render: dict[str, Any]) -> None:
    r = background_render
    assert r["bad_scene"].startswith("ValueError: no scene named 'Nope'")
    assert r["bad_memory"].startswith("ValueError: memory_mb must be 'auto'")
    assert r["bad_format"].startswith("InvalidParams:") and "format" in r["bad_format"]
    assert r["queued_after_bad"] == 0 and r["copies_after_bad"], "no job and no copy left by bad input"


def test_saved_copies_live_as_long_as_their_jobs(background_render: dict[str, Any]) -> None:
    r = background_render
    assert r["sweep_while_listed"] == 1, "only the stray copy no job renders is swept"
    assert r["held_copy_kept"], "a cancelled render keeps its copy for a retry"
    assert ok(r["clear"])
    assert not r["held_copy_after_clear"] and not r["stray_after_clear"]


def test_the_scene_output_path_gives_folder_and_prefix(background_render: dict[str, Any]) -> None:
    outputs = background_render["scene_outputs"]
    folder = str(Path(background_render["filepath_after"]).parent)
    assert outputs["/tmp/"] == ["/tmp", None], "a folder keeps its name; the files get the default prefix"
    assert outputs["//renders/shot_"] == [str(Path(folder) / "renders"), "shot_"]
    assert outputs[str(Path(folder) / "out" / "take_##_")] == [str(Path(folder) / "out"), "take__"]
    assert outputs["empty"] == [None, None]
