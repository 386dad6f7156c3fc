"""Hypothesis against the ComfyUI kind's entries: params from a hostile .blend or
script, and answers from a hostile or broken server. Nothing may raise anything
but a clear InvalidParams (params) or nothing at all (answers), and no output
name may leave the job's folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blender_taskqueue.engine import InvalidParams
from blender_taskqueue.kinds import comfyui

pytestmark = pytest.mark.timeout(120)
WORKFLOW = json.loads(comfyui.DEFAULT_WORKFLOW.read_text())
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
PATHS = st.one_of(
    st.sampled_from(["3.inputs.seed", "6.inputs.text", "3.inputs.sead", "99.inputs.x", "3.seed",
                     ".inputs.", "3.inputs.", "5.inputs.width"]),
    st.text(max_size=30),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    server=st.one_of(st.text(max_size=40), st.lists(st.text(max_size=30), max_size=3),
                     st.sampled_from(["http://127.0.0.1:8188", "https://gpu:1", "http://u:p@h"])),
    overrides=st.dictionaries(PATHS, JSON, max_size=3),
    inputs=st.dictionaries(PATHS, st.text(max_size=30), max_size=2),
    outputs=st.none() | st.lists(st.text(max_size=4), max_size=3),
    workflow=st.one_of(st.just(WORKFLOW), JSON),
)
def test_hostile_params_get_invalid_params_or_pass(server, overrides, inputs, outputs, workflow):
    params = {"server": server, "workflow": workflow, "overrides": overrides, "inputs": inputs}
    if outputs is not None:
        params["outputs"] = outputs
    try:
        stored = comfyui.SPEC.validate_params(params)
    except InvalidParams:
        return
    assert json.loads(json.dumps(stored)) == stored
    comfyui.SPEC.what_it_runs(stored)  # the release dialog never breaks on them
    graph = comfyui.ComfyParams.model_validate(stored).graph()
    for path, value in stored["overrides"].items():
        node, name = comfyui.split_path(path)
        assert graph[node]["inputs"][name] == value


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["executing", "progress", "executed", "execution_cached", "execution_start",
                             "execution_success", "execution_error", "execution_interrupted", "status"])
       | st.text(max_size=10), data=JSON, entry=JSON, answer=JSON)
def test_hostile_server_answers_never_raise(kind, data, entry, answer):
    tracker = comfyui.Tracker(WORKFLOW, "p")
    if isinstance(data, dict) and kind != "status":
        data = {**data, "prompt_id": "p"}
    report = tracker.feed(kind, data)
    if report is not None:
        assert 0.0 <= report[0] <= 1.0
    tracker.error_text()
    if isinstance(entry, dict):
        comfyui.outcome_from_history(entry)
    comfyui.describe_refusal(answer, WORKFLOW, 400)


@settings(max_examples=300, deadline=None)
@given(node=st.text(max_size=20), filename=st.text(max_size=80))
@example(node=".", filename="x.png")
@example(node="..", filename="../../etc/passwd")
def test_output_names_stay_in_the_job_folder(tmp_path_factory, node, filename):
    folder = Path("/jobs/abc")
    name = comfyui._safe_name(node, filename)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".")
    assert name not in (".", "..")
    assert (folder / name).parent == folder
