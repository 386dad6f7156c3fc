"""The ``comfyui.prompt`` kind against the protocol-faithful fake ComfyUI server
(scripts/comfyui_fake.py) on 127.0.0.1: progress, refusals, failures, cancel of a
queued and of a running prompt, a dropped websocket, many servers, secrets.
Crash re-attachment (SIGKILL of the engine's process) is in test_comfyui_crash.py.
Tests wait on the server's and the engine's states, never on sleeps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from blender_taskqueue.engine import InvalidParams, JobState
from blender_taskqueue.kinds import comfyui

from support import wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import comfyui_fake  # noqa: E402

pytestmark = pytest.mark.timeout(60)
WORKFLOW = json.loads(comfyui.DEFAULT_WORKFLOW.read_text())
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def server(tmp_path):
    fake = comfyui_fake.FakeComfyUI(root=tmp_path / "comfy", step_s=0.005, steps=4)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def engine(make_engine, registry, tmp_path):
    comfyui.register(registry)
    return make_engine(max_workers=4, work_dir=tmp_path / "work", state_dir=tmp_path / "state")


def params(server, **more):
    return {"server": server.url, "workflow": WORKFLOW, **more}


def finish(engine, job_id, timeout=30.0):
    assert engine.wait([job_id], timeout=timeout), f"job {job_id} did not finish"
    return engine.get(job_id)


# --- params -----------------------------------------------------------------------


def test_a_bad_override_path_is_refused_naming_the_path(engine, server):
    with pytest.raises(InvalidParams, match=r"'3\.inputs\.sead'.*has no input 'sead'.*seed"):
        engine.submit(comfyui.KIND, params(server, overrides={"3.inputs.sead": 1}))
    with pytest.raises(InvalidParams, match=r"no node '42'"):
        engine.submit(comfyui.KIND, params(server, overrides={"42.inputs.text": "x"}))
    with pytest.raises(InvalidParams, match=r"<node id>\.inputs\.<input name>"):
        engine.submit(comfyui.KIND, params(server, overrides={"3.seed": 1}))
    with pytest.raises(InvalidParams, match="links cannot be overridden"):
        engine.submit(comfyui.KIND, params(server, overrides={"3.inputs.seed": ["4", 0]}))


def test_workflow_files_from_elsewhere_are_checked(engine, server, tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(InvalidParams, match=r"UI-format workflow.*Export \(API\)"):
        engine.submit(comfyui.KIND, {"server": server.url, "workflow_file": str(ui)})
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # opening a FIFO to read would block the main thread forever
    with pytest.raises(InvalidParams, match="not a regular file"):
        engine.submit(comfyui.KIND, {"server": server.url, "workflow_file": str(fifo)})
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"1": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0]}}}))
    with pytest.raises(InvalidParams, match="links to node '9', which is not in the workflow"):
        engine.submit(comfyui.KIND, {"server": server.url, "workflow_file": str(broken)})
    good = tmp_path / "good.json"
    good.write_text(json.dumps(WORKFLOW))
    job_id = engine.submit(comfyui.KIND, {"server": server.url, "workflow_file": str(good)})
    good.write_text("{}")  # changed after submit: what runs is what was read and shown
    assert finish(engine, job_id).state is JobState.COMPLETED
    assert server.submissions[0]["prompt"]["3"]["class_type"] == "KSampler"


def test_urls_with_secrets_and_remote_servers(engine, registry):
    with pytest.raises(InvalidParams, match="no user or password in the URL"):
        engine.submit(comfyui.KIND, {"server": "http://me:hunter2@10.0.0.5:8188", "workflow": WORKFLOW})
    with pytest.raises(InvalidParams, match="must start with http"):
        engine.submit(comfyui.KIND, {"server": "ftp://10.0.0.5", "workflow": WORKFLOW})
    spec = registry.get(comfyui.KIND)
    assert not spec.goes_online({"server": "http://127.0.0.1:8188"})
    assert not spec.goes_online({"server": ["http://localhost:1", "http://[::1]:2"]})
    assert spec.goes_online({"server": "http://gpu-box.studio:8188"})
    assert spec.goes_online({"server": ["http://127.0.0.1:1", "https://10.1.2.3"]})


def test_a_remote_server_is_refused_while_online_access_is_off(engine, registry):
    # The Blender layer's check (blender/runtime.py) is this hook; here it says "off".
    engine.submit_check = lambda spec, p: "Online Access is off" if spec.goes_online(p) else None
    with pytest.raises(Exception, match="Online Access is off"):
        engine.submit(comfyui.KIND, {"server": "http://192.168.1.20:8188", "workflow": WORKFLOW})


# --- running ----------------------------------------------------------------------


def test_a_generation_reports_nodes_and_steps_and_downloads_its_images(engine, server):
    server.step_s, server.steps = 0.05, 8
    job_id = engine.submit(comfyui.KIND, params(server, overrides={"6.inputs.text": "a red fox"}))
    seen = []

    def sampling():
        info = engine.get(job_id)
        seen.append((info.progress, info.stage, info.message))
        return info.stage == "KSampler" and (info.message or "").startswith("step")
    wait_until(sampling, what="the sampler's steps in the job's progress")
    info = finish(engine, job_id)
    assert info.state is JobState.COMPLETED, info.error
    assert info.progress == 1.0
    fractions = [f for f, _s, _m in seen if f is not None]
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1
    sent = server.submissions[0]
    assert sent["prompt"]["6"]["inputs"]["text"] == "a red fox"
    assert sent["prompt_id"] == info.result["prompt_id"]
    files = [Path(f) for f in info.result["files"]]
    assert len(files) == 1 and files[0].read_bytes().startswith(PNG)
    assert files[0].parent == engine.workdir_for(job_id)
    assert files[0].name.startswith("9_")


def test_the_tracker_counts_nodes_and_cached_nodes(server):
    graph = WORKFLOW
    t = comfyui.Tracker(graph, "p1")
    assert len(t.todo) == 7
    t.feed("execution_start", {"prompt_id": "p1"})
    t.feed("execution_cached", {"nodes": ["4", "6", "7"], "prompt_id": "p1"})
    t.feed("executing", {"node": "5", "prompt_id": "p1"})
    assert t.fraction() == 0.0
    t.feed("executing", {"node": "3", "prompt_id": "p1"})
    assert t.fraction() == pytest.approx(1 / 4)
    f, stage, msg = t.feed("progress", {"value": 5, "max": 10, "node": "3", "prompt_id": "p1"})
    assert f == pytest.approx(1.5 / 4) and stage == "KSampler" and msg == "step 5/10"
    assert t.feed("progress", {"value": 1, "max": 2, "node": "3", "prompt_id": "other"}) is None
    t.feed("executing", {"node": "8", "prompt_id": "p1"})
    assert t.stage("6") == "Positive Prompt (CLIPTextEncode)"
    t.feed("executing", {"node": "9", "prompt_id": "p1"})
    t.feed("executed", {"node": "9", "output": {"images": []}, "prompt_id": "p1"})
    assert t.fraction() == 1.0
    assert t.feed("execution_success", {"prompt_id": "p1"})[0] == 1.0


def test_a_refused_prompt_fails_naming_the_node_and_input(engine, server):
    server.fail_next_validation("4", "ckpt_name", "Value not in list")
    info = finish(engine, engine.submit(comfyui.KIND, params(server)))
    assert info.state is JobState.FAILED
    assert "node 4 'Load Checkpoint' (CheckpointLoaderSimple) input 'ckpt_name'" in info.error.message
    assert "Value not in list" in info.error.message
    assert server.submissions == []


def test_an_execution_error_fails_naming_the_node(engine, server):
    server.fail_next_execution("3", "CUDA out of memory")
    info = finish(engine, engine.submit(comfyui.KIND, params(server)))
    assert info.state is JobState.FAILED
    assert info.error.message.startswith("ComfyUI failed at node 3 (KSampler): CUDA out of memory")


def test_cancel_of_a_queued_prompt_deletes_it_from_the_server_queue(engine, server):
    server.hold()
    job_id = engine.submit(comfyui.KIND, params(server))
    wait_until(lambda: len(server.submissions) == 1, what="the prompt on the server")
    prompt_id = server.submissions[0]["prompt_id"]
    assert engine.cancel(job_id)
    info = finish(engine, job_id)
    assert info.state is JobState.CANCELLED
    assert server.deletes == [prompt_id] and server.interrupts == []
    assert "removed prompt" in (info.message or "")
    server.unhold()
    assert prompt_id not in server.history()


def test_cancel_of_a_running_prompt_interrupts_only_ours(engine, server):
    server.step_s, server.steps = 0.2, 50
    job_id = engine.submit(comfyui.KIND, params(server))
    wait_until(lambda: server.running() is not None, what="the prompt running")
    prompt_id = server.running()
    assert engine.cancel(job_id)
    info = finish(engine, job_id)
    assert info.state is JobState.CANCELLED
    assert len(server.interrupts) == 1 and server.deletes == []
    server.wait_until(lambda: server.running() is None)
    assert server.history()[prompt_id]["status"]["status_str"] == "error"


def test_a_running_prompt_that_is_not_ours_is_never_interrupted(engine, server):
    server.step_s, server.steps = 0.2, 50
    server.hold()
    job_id = engine.submit(comfyui.KIND, params(server))
    wait_until(lambda: len(server.submissions) == 1, what="our prompt queued")
    # Somebody else's prompt runs first (front of the queue).
    import urllib.request
    other = json.dumps({"prompt": WORKFLOW, "client_id": "someone-else", "front": True}).encode()
    urllib.request.urlopen(urllib.request.Request(server.url + "/prompt", data=other, method="POST"))
    server.unhold()
    wait_until(lambda: server.running() not in (None, server.submissions[0]["prompt_id"]),
               what="the other prompt running")
    engine.cancel(job_id)
    info = finish(engine, job_id)
    assert info.state is JobState.CANCELLED
    assert server.interrupts == [] and server.deletes == [server.submissions[0]["prompt_id"]]


def test_a_dropped_websocket_falls_back_to_history_and_reconnects(engine, server):
    server.step_s, server.steps = 0.05, 20
    job_id = engine.submit(comfyui.KIND, params(server, poll_s=0.1))
    wait_until(lambda: (engine.get(job_id).message or "").startswith("step"), what="sampling")
    server.drop_websockets()
    info = finish(engine, job_id)
    assert info.state is JobState.COMPLETED, info.error
    assert len(server.submissions) == 1
    assert Path(info.result["files"][0]).read_bytes().startswith(PNG)


def test_many_servers_each_run_one_job_at_a_time(engine, tmp_path):
    fakes = [comfyui_fake.FakeComfyUI(root=tmp_path / f"c{i}", step_s=0.05, steps=6).start()
             for i in range(2)]
    try:
        urls = [f.url for f in fakes]
        ids = [engine.submit(comfyui.KIND, {"server": urls, "workflow": WORKFLOW,
                                            "overrides": {"3.inputs.seed": i}}) for i in range(4)]
        wait_until(lambda: all(f.running() for f in fakes), what="both servers busy")
        assert sum(1 for i in engine.jobs(["running"])) == 2
        for job_id in ids:
            assert finish(engine, job_id).state is JobState.COMPLETED
        assert sorted(len(f.submissions) for f in fakes) == [2, 2]
        for f in fakes:
            assert f.pending() == []
    finally:
        for f in fakes:
            f.stop()


def test_an_unreachable_server_fails_clearly_and_never_submits(engine, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = finish(engine, engine.submit(comfyui.KIND, {
        "server": f"http://127.0.0.1:{port}", "workflow": WORKFLOW, "unreachable_s": 0.5,
        "poll_s": 0.1}))
    assert info.state is JobState.FAILED
    assert f"127.0.0.1:{port} is not reachable" in info.error.message


def test_input_images_are_uploaded_and_wired_in(engine, server, tmp_path):
    picture = tmp_path / "render.png"
    picture.write_bytes(comfyui_fake.png_bytes(8, 8, b"a render"))
    graph = json.loads(json.dumps(WORKFLOW))
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    del graph["5"]
    info = finish(engine, engine.submit(comfyui.KIND, {
        "server": server.url, "workflow": graph, "inputs": {"10.inputs.image": str(picture)}}))
    assert info.state is JobState.COMPLETED, info.error
    assert server.uploads == ["render.png"]
    assert server.submissions[0]["prompt"]["10"]["inputs"]["image"] == "render.png"
    with pytest.raises(InvalidParams, match="must be an image file"):
        engine.submit(comfyui.KIND, {"server": server.url, "workflow": graph,
                                     "inputs": {"10.inputs.image": str(Path.home() / ".ssh" / "id_rsa")}})


def test_a_token_is_sent_but_never_stored(engine, server, tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_TEST_COMFY_TOKEN", "s3cret-token-value")
    job_id = engine.submit(comfyui.KIND, params(server, token_env="TQ_TEST_COMFY_TOKEN"))
    assert finish(engine, job_id).state is JobState.COMPLETED
    assert server.headers_seen and all(
        h.get("Authorization") == "Bearer s3cret-token-value" for h in server.headers_seen)
    assert engine.flush()
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert b"s3cret-token-value" not in path.read_bytes(), path
    exported = json.dumps(engine.export_state()) if hasattr(engine, "export_state") else ""
    assert "s3cret-token-value" not in exported


def test_describe_says_what_will_run(registry):
    spec = comfyui.SPEC
    lines = spec.what_it_runs({"server": ["http://10.0.0.9:8188"], "workflow": WORKFLOW,
                               "overrides": {"6.inputs.text": "x"},
                               "inputs": {"10.inputs.image": "/home/me/secret.png"}})
    text = "\n".join(lines)
    assert "ONLINE" in text and "10.0.0.9" in text
    assert "UPLOADS the local file /home/me/secret.png" in text
    assert 'sets 6.inputs.text = "x"' in text
    assert "KSampler" in text


def test_generation_params_find_prompt_and_seed():
    found = comfyui.find_prompt_inputs(WORKFLOW)
    assert found == {"prompt": "6.inputs.text", "negative": "7.inputs.text", "seed": "3.inputs.seed"}
    batch = comfyui.generation_params(prompt="a cat", seed=10, count=3)
    assert [p["overrides"]["3.inputs.seed"] for p in batch] == [10, 11, 12]
    assert all(p["overrides"]["6.inputs.text"] == "a cat" for p in batch)
    with pytest.raises(ValueError, match="count must be"):
        comfyui.generation_params(count=0)


def test_tq_generate_queues_a_batch_atomically(engine, server):
    import blender_taskqueue as tq

    old = tq.set_engine(engine)
    try:
        ids = tq.generate(prompt="a blue boat", seed=5, count=2, server=server.url, priority="high")
        assert engine.wait(ids, timeout=30)
        assert [engine.get(i).state for i in ids] == [JobState.COMPLETED] * 2
        assert sorted(s["prompt"]["3"]["inputs"]["seed"] for s in server.submissions) == [5, 6]
        assert engine.get(ids[0]).label == "a blue boat · 1/2"
        before = len(engine.jobs())
        with pytest.raises(InvalidParams, match="specs\\[0\\]"):
            tq.generate(prompt="x", count=2, server="http://a:b@h")
        assert len(engine.jobs()) == before
    finally:
        tq.set_engine(old)


def test_closing_blender_leaves_the_generation_running_and_the_next_start_collects_it(
        make_engine, registry, server, tmp_path):
    comfyui.register(registry)
    config = {"max_workers": 2, "work_dir": tmp_path / "w", "state_dir": tmp_path / "s"}
    first = make_engine(**config)
    server.step_s, server.steps = 0.1, 30
    job_id = first.submit(comfyui.KIND, params(server))
    wait_until(lambda: server.running() is not None, what="the prompt running")
    first.shutdown(wait=True, timeout=5.0)
    assert server.interrupts == [] and server.deletes == []
    assert server.running() is not None  # still generating while Blender is closed
    second = make_engine(**config)
    info = finish(second, job_id)
    assert info.state is JobState.COMPLETED, info.error
    assert len(server.submissions) == 1
    assert Path(info.result["files"][0]).read_bytes().startswith(PNG)


# --- pipelines: a render's frames through img2img -----------------------------------


def test_img2img_steps_take_frame_i_of_the_render_they_depend_on(engine, server, registry, tmp_path):
    from blender_taskqueue.engine import KindSpec

    frames = []
    for n in (1, 2):
        frame = tmp_path / f"frame_{n:04d}.png"
        frame.write_bytes(comfyui_fake.png_bytes(8, 8, f"frame {n}".encode()))
        frames.append(str(frame))
    registry.register(KindSpec(name="t.fake_render", handler=lambda ctx, p: {"files": frames}))
    batch = comfyui.generation_params(str(comfyui.IMG2IMG_WORKFLOW), prompt="as watercolour", seed=5,
                                      count=2, server=server.url, input_from_previous=True)
    assert [(p["input_from"], p["input_index"]) for p in batch] == [("10.inputs.image", 0),
                                                                      ("10.inputs.image", 1)]
    ids = engine.submit_many(
        [{"kind": "t.fake_render", "name": "render"}]
        + [{"kind": comfyui.KIND, "params": p, "depends_on": "@render"} for p in batch]
    )
    for job_id in ids:
        assert finish(engine, job_id).state is JobState.COMPLETED, engine.get(job_id).error
    assert sorted(server.uploads) == ["frame_0001.png", "frame_0002.png"]
    sent = sorted(s["prompt"]["10"]["inputs"]["image"] for s in server.submissions)
    assert sent == ["frame_0001.png", "frame_0002.png"]
    lines = comfyui.describe(batch[1])
    assert any("UPLOADS the first image among the results" in line for line in lines)


def test_input_from_without_an_image_fails_naming_the_prerequisite(engine, server, registry):
    from blender_taskqueue.engine import KindSpec

    registry.register(KindSpec(name="t.no_image", handler=lambda ctx, p: {"files": ["/nonexistent.png"]}))
    batch = comfyui.generation_params(str(comfyui.IMG2IMG_WORKFLOW), count=1, server=server.url,
                                      input_from_previous=True)
    first, second = engine.submit_many([
        {"kind": "t.no_image", "name": "r"},
        {"kind": comfyui.KIND, "params": batch[0], "depends_on": "@r"},
    ])
    info = finish(engine, second)
    assert info.state is JobState.FAILED
    assert "input_from" in info.error.message and first in info.error.message
    assert server.submissions == []  # nothing was sent


def test_input_from_must_name_an_input_of_the_workflow(engine, server):
    with pytest.raises(InvalidParams, match="input_from|99"):
        engine.submit(comfyui.KIND, params(server, input_from="99.inputs.image"))
