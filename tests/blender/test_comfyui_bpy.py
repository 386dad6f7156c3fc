"""ComfyUI generations in real Blender 5.0.1 (bpy module): the Generate section's
operator queues a batch with consecutive seeds, the images come back as image
datablocks, the token reaches the server but no file, a remote server is refused
while Online Access is off, and a bad workflow file is a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("bpy_comfyui.py")
pytestmark = [pytest.mark.blender, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def generated(run_bpy: Any, linux_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("comfy")
    report, _proc = run_bpy(SCRIPT, "generate", str(linux_zip), str(folder), timeout=180)
    assert report is not None
    return report


def test_the_generate_operator_queues_a_batch_with_consecutive_seeds(generated):
    assert generated["generate"] == {"result": ["FINISHED"], "error": None}
    assert generated["waited"] is True
    assert generated["states"] == ["completed"] * 3, generated["errors"]
    assert generated["seeds"] == [40, 41, 42]
    assert generated["texts"] == ["a red barn"]
    assert generated["panel_newest"] == generated["last_id"]


def test_finished_generations_are_image_datablocks(generated):
    assert len(generated["datablocks"]) == 3
    for name, size in generated["images"].items():
        assert size[0] > 0 and size[1] > 0, name
    assert all(Path(f).is_file() or f for f in generated["image_files"])
    assert generated["open_image"] is not None


def test_the_token_is_sent_and_stored_nowhere(generated):
    assert generated["auth"] == ["Bearer tq-secret-7f3a9c"]
    assert generated["secret_in_blend"] is False
    assert generated["secret_in_state"] == []
    assert generated["secret_in_params"] is False


def test_a_remote_server_is_refused_while_online_access_is_off(generated):
    assert generated["remote_offline"].startswith("NotPermitted"), generated["remote_offline"]
    assert "Online Access" in generated["remote_offline"]


def test_a_ui_format_workflow_is_a_clear_error_and_queues_nothing(generated):
    assert generated["bad_workflow"]["result"] is None
    assert "UI-format workflow" in generated["bad_workflow"]["error"]
    assert generated["bad_workflow_queued"] == 0


@pytest.fixture(scope="module")
def pipeline(run_bpy: Any, linux_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("pipeline")
    report, _proc = run_bpy(SCRIPT, "pipeline", str(linux_zip), str(folder), timeout=200)
    assert report is not None
    return report


def test_the_generations_of_a_pipeline_wait_for_the_render_and_say_so(pipeline):
    assert pipeline["held_depends"] == [True, True]
    assert pipeline["waiting_texts"] == ["waiting for 1 job", "waiting for 1 job"]
    assert pipeline["waiting_short"] == "after 1"
    assert pipeline["row_label"].startswith("› ")


def test_cancelling_the_render_with_its_dependents_cancels_the_whole_chain(pipeline):
    assert pipeline["cancel"] == {"result": ["FINISHED"], "error": None}
    assert pipeline["cancelled"] == ["cancelled"] * 3


def test_render_frames_then_img2img_each_frame_then_images_in_blender(pipeline):
    assert pipeline["generate"]["result"] == ["FINISHED"], pipeline["generate"]
    assert pipeline["waited"] is True
    assert pipeline["kinds"] == ["blender.render", "comfyui.prompt", "comfyui.prompt"]
    assert pipeline["states"] == ["completed"] * 3, pipeline["errors"]
    assert len(pipeline["uploads"]) == 2 and all(u.startswith("shot_") for u in pipeline["uploads"])
    assert len(pipeline["datablocks"]) == 2 and all(pipeline["loaded"])
