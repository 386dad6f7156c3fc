"""Trust by path in real Blender 5.0.1 (bpy module): a saved queue comes back held
when the file's folder is in Excluded Paths (as a folder, a string prefix or a
glob, the way Blender matches them) or Auto Run is off, and runs by itself only
from a trusted file with auto-resume on; a render restored from an untrusted file
loses ``trusted: true``. The release operator, called as a script calls it,
releases only the job it names (or only the jobs its dialog showed), and what the
dialog shows is the kind's whole description, wrapped, never cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("bpy_trust.py")
pytestmark = [pytest.mark.blender, pytest.mark.timeout(240)]


def ok(result: dict[str, Any]) -> bool:
    return result == {"result": ["FINISHED"], "error": None}


@pytest.fixture(scope="module")
def saved(run_bpy: Any, linux_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("trust")
    report, _proc = run_bpy(SCRIPT, "save", str(linux_zip), str(folder), timeout=120)
    assert report is not None
    assert ok(report["first_save"]) and ok(report["save"]), report
    return report


@pytest.fixture(scope="module")
def opened(run_bpy: Any, linux_zip: Path, saved: dict[str, Any]) -> Any:
    done: dict[str, dict[str, Any]] = {}

    def open_as(mode: str) -> dict[str, Any]:
        if mode not in done:
            report, _proc = run_bpy(SCRIPT, "open", str(linux_zip), saved["blend"], mode, timeout=120)
            assert report is not None and ok(report["open"]), report
            done[mode] = report
        return done[mode]

    return open_as


@pytest.mark.parametrize("mode", ["folder", "prefix", "glob", "off"])
def test_an_excluded_or_untrusted_file_restores_its_jobs_held(opened: Any, saved: dict[str, Any], mode: str):
    report = opened(mode)
    assert report["file_is_trusted"] is False
    assert set(report["jobs"]) == {*saved["demo"], saved["render"]}
    assert all(job["held"] and job["state"] == "queued" for job in report["jobs"].values()), report["jobs"]
    assert report["render_trusted"] is False, "a render from an untrusted file opens its .blend with scripts off"


@pytest.mark.parametrize("mode", ["folder", "prefix", "glob", "off", "none"])
def test_the_rule_agrees_with_blenders_own_verdict_on_the_file(opened: Any, mode: str):
    # The saved file registers a script on load: Blender runs it only if it trusts the file.
    report = opened(mode)
    assert report["our_rule"] is report["blender_ran_its_script"], report
    assert report["blender_autoexec_fail"] is not report["blender_ran_its_script"]


def test_the_prefix_entry_is_a_string_prefix_as_in_blender(opened: Any):
    report = opened("prefix")
    (path, use_glob), = report["excluded"]
    assert path.endswith("/untrus") and not use_glob  # ".../untrus" excludes ".../untrusted/"


def test_a_trusted_file_with_auto_resume_runs_its_jobs(opened: Any, saved: dict[str, Any]):
    report = opened("none")
    assert report["file_is_trusted"] is True and report["excluded"] == []
    assert not any(report["jobs"][i]["held"] for i in saved["demo"])
    assert report["waited"] and set(report["final"].values()) == {"completed"}
    assert report["jobs"][saved["render"]]["held"], "a job saved held stays held"
    assert report["render_trusted"] is True, "a trusted file keeps its render's trusted"


def test_the_dialog_text_is_the_whole_description(opened: Any, saved: dict[str, Any]):
    report = opened("folder")
    text = "\n".join(report["will_run"])
    # (the bpy module's render child is this Python: use_scripts=False, not --disable-autoexec)
    assert "scripts do not run (autoexec disabled" in text and saved["blend"] in text
    assert "argv[0]" in text
    assert saved["long"] in text, "a long param is shown whole"
    assert any(len(line) > 80 for line in report["will_run"])
    assert report["wrapped_keeps_everything"] and report["wrapped_max"] <= 105
    assert ok(report["details"]) and "autoexec disabled" in report["text"] and saved["long"] in report["text"]


def test_release_without_a_dialog_releases_only_the_named_job(opened: Any, saved: dict[str, Any]):
    report = opened("folder")
    first, second = saved["demo"]
    render = saved["render"]
    assert ok(report["release_one"])
    assert report["held_after_one"] == {first: False, second: True, render: True}
    assert ok(report["release_shown"])
    assert report["held_after_shown"] == {first: False, second: False, render: True}
    assert ok(report["discard_one"]) and report["render_after_discard"] == "cancelled"
    assert "is not held" in (report["discard_not_held"]["error"] or "")
    assert report["waited"] and report["final"] == {first: "completed", second: "completed"}
