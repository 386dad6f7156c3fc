"""Crash re-attachment of ``comfyui.prompt``: Blender's process (here an engine in a
child process) is SIGKILLed while a generation runs on the server; the restarted
engine finds the prompt by its checkpointed id and never submits it again.
Also the narrow windows around ``POST /prompt``, driven through the kind directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest

from blender_taskqueue.engine import JobCancelled
from blender_taskqueue.kinds import comfyui

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import comfyui_fake  # noqa: E402

CHILD = Path(__file__).with_name("comfyui_crash_child.py")
WORKFLOW = json.loads(comfyui.DEFAULT_WORKFLOW.read_text())
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def server(tmp_path):
    fake = comfyui_fake.FakeComfyUI(root=tmp_path / "comfy", step_s=0.05, steps=4)
    fake.start()
    yield fake
    fake.stop()


class Child:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)

    def expect(self, word: str) -> list[str]:
        """Read protocol lines until one starts with ``word`` (the pytest timeout bounds it)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split(" ", 2)
            if parts[0] == word:
                return [p.strip() for p in parts[1:]]
        raise AssertionError(f"child ended before {word}: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("when", ["running", "queued", "finished"])
def test_a_killed_engine_re_attaches_and_never_submits_again(tmp_path, server, when):
    state = tmp_path / "state"
    if when == "queued":
        server.hold()
    else:
        server.step_s, server.steps = 0.1, 30
    first = Child("--state-dir", str(state), "--submit", server.url)
    try:
        first.expect("SUBMITTED")
        phase, prompt_id = first.expect("CHECKPOINT")
        if phase == "submitting":
            phase, prompt_id = first.expect("CHECKPOINT")
        assert phase == "submitted"
        if when == "running":
            server.wait_until(lambda: server.running() == prompt_id)
        elif when == "finished":
            server.wait_until(lambda: prompt_id in server.history())
        first.kill()  # Blender crashes: no shutdown, no goodbye
    finally:
        first.close()
    if when == "queued":
        server.unhold()
    second = Child("--state-dir", str(state), "--adopt")
    try:
        state_word, detail = second.expect("DONE")
    finally:
        second.close()
    assert state_word == "completed", detail
    result = json.loads(detail)
    assert [s["prompt_id"] for s in server.submissions] == [prompt_id]
    assert result["prompt_id"] == prompt_id
    assert Path(result["files"][0]).read_bytes().startswith(b"\x89PNG")


class FakeCtx:
    """Just enough of JobContext to drive the kind's run directly."""

    def __init__(self, tmp: Path, resume: Optional[dict] = None) -> None:
        self.job_id = "j1"
        self.slot = None
        self.resume_from = resume
        self.checkpoints: list[dict] = []
        self.cancelled = False
        self.stop_reason: Optional[str] = None
        self.workdir = tmp / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)

    def progress(self, *args: Any) -> None:
        pass

    def checkpoint(self, data: dict) -> None:
        self.checkpoints.append(data)

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled("stop")

    def sleep(self, seconds: float) -> None:
        self.raise_if_cancelled()

    def call_on_main(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def params_for(server) -> comfyui.ComfyParams:
    return comfyui.ComfyParams.model_validate({"server": server.url, "workflow": WORKFLOW, "poll_s": 0.05})


def test_the_prompt_id_is_on_disk_before_the_post(tmp_path, server):
    ctx = FakeCtx(tmp_path)
    result = comfyui.run_prompt(ctx, params_for(server))  # type: ignore[arg-type]
    assert [c["phase"] for c in ctx.checkpoints] == ["submitting", "submitted"]
    assert ctx.checkpoints[0]["prompt_id"] == server.submissions[0]["prompt_id"] == result["prompt_id"]


def test_a_crash_during_the_post_that_landed_is_not_submitted_again(tmp_path, server):
    prompt_id, client_id = str(uuid.uuid4()), "taskqueue-crashed"
    import urllib.request
    body = json.dumps({"prompt": WORKFLOW, "client_id": client_id, "prompt_id": prompt_id}).encode()
    urllib.request.urlopen(urllib.request.Request(server.url + "/prompt", data=body, method="POST"))
    resume = {"server": server.url, "prompt_id": prompt_id, "client_id": client_id, "phase": "submitting"}
    result = comfyui.run_prompt(FakeCtx(tmp_path, resume), params_for(server))  # type: ignore[arg-type]
    assert len(server.submissions) == 1 and result["prompt_id"] == prompt_id


def test_a_crash_before_the_post_landed_submits_once_with_the_same_id(tmp_path, server):
    prompt_id = str(uuid.uuid4())
    resume = {"server": server.url, "prompt_id": prompt_id, "client_id": "taskqueue-x", "phase": "submitting"}
    result = comfyui.run_prompt(FakeCtx(tmp_path, resume), params_for(server))  # type: ignore[arg-type]
    assert [s["prompt_id"] for s in server.submissions] == [prompt_id] == [result["prompt_id"]]


def test_a_server_that_forgot_the_prompt_fails_and_never_submits_again(tmp_path, server):
    resume = {"server": server.url, "prompt_id": str(uuid.uuid4()), "client_id": "c", "phase": "submitted"}
    with pytest.raises(comfyui.ComfyUIError, match="no longer known.*not submitted again"):
        comfyui.run_prompt(FakeCtx(tmp_path, resume), params_for(server))  # type: ignore[arg-type]
    assert server.submissions == []


def test_re_attachment_waits_for_a_server_that_is_still_starting(tmp_path, server, monkeypatch):
    prompt_id, client_id = str(uuid.uuid4()), "taskqueue-late"
    import urllib.request
    body = json.dumps({"prompt": WORKFLOW, "client_id": client_id, "prompt_id": prompt_id}).encode()
    urllib.request.urlopen(urllib.request.Request(server.url + "/prompt", data=body, method="POST"))
    server.wait_until(lambda: prompt_id in server.history())
    real_queue, refusals = comfyui.Client.queue, []

    def booting(self):  # the first answers after Blender comes back: connection refused
        if len(refusals) < 3:
            refusals.append(1)
            raise comfyui.ServerUnreachable(f"ComfyUI server {self.server} is not reachable: refused")
        return real_queue(self)
    monkeypatch.setattr(comfyui.Client, "queue", booting)
    resume = {"server": server.url, "prompt_id": prompt_id, "client_id": client_id, "phase": "submitted"}
    params = comfyui.ComfyParams.model_validate(
        {"server": server.url, "workflow": WORKFLOW, "poll_s": 0.05, "unreachable_s": 30})
    result = comfyui.run_prompt(FakeCtx(tmp_path, resume), params)  # type: ignore[arg-type]
    assert len(refusals) == 3
    assert result["prompt_id"] == prompt_id and len(server.submissions) == 1
