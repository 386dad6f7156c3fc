"""The fake ComfyUI server (scripts/comfyui_fake.py): its routes, websocket messages and
test hooks, checked with a tiny client (urllib + websocket-client) as a real one would."""

from __future__ import annotations

import copy
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import websocket

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import comfyui_fake  # noqa: E402

pytestmark = pytest.mark.timeout(60)

WORKFLOW = json.loads((ROOT / "blender_taskqueue" / "kinds" / "workflows" / "txt2img.json").read_text())
NOISE = ("status", "progress_state")  # messages a client may ignore


# --------------------------------------------------------------------------- client


def http(method: str, url: str, body: Optional[bytes] = None, headers: Optional[dict[str, str]] = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def get_json(url: str) -> Any:
    status, body, _ = http("GET", url)
    assert status == 200, (status, body)
    return json.loads(body)


def post_json(url: str, obj: Any) -> tuple[int, Any]:
    status, body, _ = http("POST", url, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    return status, (json.loads(body) if body else None)


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data = value
            out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
            out += b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"
        else:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos, size, idat = 8, (0, 0), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, chunk = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + chunk) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    w, h = size
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    return w, h


class WsClient:
    """A websocket client that records every message a reader thread receives."""

    def __init__(self, base_url: str, client_id: Optional[str] = None) -> None:
        url = base_url.replace("http://", "ws://", 1) + "/ws"
        if client_id is not None:
            url += "?clientId=" + urllib.parse.quote(client_id)
        self.ws = websocket.create_connection(url, timeout=10)
        self.ws.settimeout(None)
        self.messages: list[dict[str, Any]] = []
        self.pongs: list[bytes] = []
        self.closed = False
        self.close_frame = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, name="test-ws-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except Exception:
                break
            with self.cond:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self.messages.append(json.loads(data))
                elif opcode == websocket.ABNF.OPCODE_PONG:
                    self.pongs.append(data)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.close_frame = True
                    break
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}; got {[m['type'] for m in self.messages]}")

    def wait_for(self, type_: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def found() -> Optional[dict[str, Any]]:
            for m in self.messages:
                if m["type"] == type_ and all(m["data"].get(k) == v for k, v in match.items()):
                    return m
            return None

        self.wait(lambda: found() is not None, f"{type_} {match}", timeout)
        message = found()
        assert message is not None
        return message

    def done(self, prompt_id: str) -> None:
        """Wait for ComfyUI's end-of-prompt message: executing with node None."""
        self.wait_for("executing", node=None, prompt_id=prompt_id)

    def of(self, prompt_id: str) -> list[dict[str, Any]]:
        with self.cond:
            return [m for m in self.messages if m["type"] not in NOISE and m["data"].get("prompt_id") == prompt_id]

    def close(self) -> None:
        try:
            self.ws.send_close()
            self.wait(lambda: self.closed, "close")
        except Exception:
            pass
        self.ws.shutdown()
        self.thread.join(5)


# ------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[comfyui_fake.FakeComfyUI]:
    before = {t for t in threading.enumerate() if t.name.startswith("comfyui-fake")}
    server = comfyui_fake.FakeComfyUI(root=tmp_path / "comfy", step_s=0.005, steps=4).start()
    yield server
    server.stop()
    leaked = [t for t in threading.enumerate() if t.name.startswith("comfyui-fake") and t not in before and t.is_alive()]
    assert not leaked, f"threads left behind: {leaked}"


@pytest.fixture
def clients() -> Iterator[Callable[..., WsClient]]:
    made: list[WsClient] = []

    def connect(base_url: str, client_id: Optional[str] = None) -> WsClient:
        c = WsClient(base_url, client_id)
        made.append(c)
        return c

    yield connect
    for c in made:
        c.close()


def submit(fake: comfyui_fake.FakeComfyUI, prompt: Optional[dict[str, Any]] = None, client_id: Optional[str] = "c1", **extra: Any) -> str:
    body: dict[str, Any] = {"prompt": copy.deepcopy(prompt or WORKFLOW), **extra}
    if client_id is not None:
        body["client_id"] = client_id
    status, answer = post_json(fake.url + "/prompt", body)
    assert status == 200, answer
    assert answer["node_errors"] == {}
    return str(answer["prompt_id"])


def done(fake: comfyui_fake.FakeComfyUI, prompt_id: str) -> dict[str, Any]:
    fake.wait_until(lambda: prompt_id in fake.history(), what=f"{prompt_id} in history")
    return get_json(f"{fake.url}/history/{prompt_id}")[prompt_id]


def event_types(fake: comfyui_fake.FakeComfyUI, prompt_id: str) -> list[str]:
    return [t for _, t, d in list(fake.events) if d.get("prompt_id") == prompt_id and t not in NOISE]


# ---------------------------------------------------------------------------- tests


def test_status_on_connect(fake, clients) -> None:
    named = clients(fake.url, "abc")
    first = named.wait_for("status")
    assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}}
    anonymous = clients(fake.url)
    sid = anonymous.wait_for("status")["data"]["sid"]
    assert re.fullmatch(r"[0-9a-f]{32}", sid)
    assert set(fake.connected()) == {"abc", sid}


def test_default_workflow_message_order(fake, clients) -> None:
    c = clients(fake.url, "c1")
    c.wait_for("status")
    status, answer = post_json(fake.url + "/prompt", {"prompt": WORKFLOW, "client_id": "c1", "extra_data": {"x": 1}})
    assert status == 200
    assert set(answer) == {"prompt_id", "number", "node_errors"} and answer["number"] == 0
    pid = answer["prompt_id"]
    c.done(pid)
    got = [(m["type"], m["data"].get("node"), m["data"].get("value")) for m in c.of(pid)]
    expect: list[tuple[str, Optional[str], Optional[int]]] = [("execution_start", None, None), ("execution_cached", None, None)]
    expect += [("executing", n, None) for n in ("4", "5", "7", "6", "3")]
    expect += [("progress", "3", v) for v in (1, 2, 3, 4)]
    expect += [("executing", "8", None), ("executing", "9", None), ("executed", "9", None)]
    expect += [("execution_success", None, None), ("executing", None, None)]
    assert got == expect
    by_type = {m["type"]: m["data"] for m in c.of(pid)}
    assert set(by_type["execution_start"]) == {"prompt_id", "timestamp"}
    assert by_type["execution_cached"]["nodes"] == []
    progress = [m["data"] for m in c.of(pid) if m["type"] == "progress"][0]
    assert progress == {"value": 1, "max": 4, "prompt_id": pid, "node": "3"}
    executing = [m["data"] for m in c.of(pid) if m["type"] == "executing"][0]
    assert executing == {"node": "4", "display_node": "4", "prompt_id": pid}
    images = by_type["executed"]["output"]["images"]
    assert images == [{"filename": "taskqueue_00001_.png", "subfolder": "", "type": "output"}]
    assert by_type["executed"]["display_node"] == "9"
    # the queue status went back to 0, and progress_state came along (ignorable)
    statuses = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in c.messages if m["type"] == "status"]
    assert statuses[-1] == 0 and 1 in statuses
    states = [m["data"] for m in c.messages if m["type"] == "progress_state"]
    assert states and states[-1]["nodes"]["9"]["state"] == "finished"
    assert fake.submissions[-1]["extra_data"] == {"x": 1, "client_id": "c1"}


def test_history_after_success_and_view(fake, clients) -> None:
    pid = submit(fake)
    entry = done(fake, pid)
    assert list(entry) == ["prompt", "outputs", "status", "meta"]
    number, prompt_id, prompt, extra_data, outputs = entry["prompt"]
    assert (number, prompt_id, extra_data, outputs) == (0, pid, {"client_id": "c1"}, ["9"])
    assert prompt == WORKFLOW
    assert entry["outputs"] == {"9": {"images": [{"filename": "taskqueue_00001_.png", "subfolder": "", "type": "output"}]}}
    assert entry["meta"] == {"9": {"node_id": "9", "display_node": "9", "parent_node": None, "real_node_id": "9"}}
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"] is True
    assert [m[0] for m in status["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert pid in get_json(fake.url + "/history")
    assert get_json(fake.url + "/history/no-such-prompt") == {}
    assert get_json(fake.url + "/queue") == {"queue_running": [], "queue_pending": []}

    code, body, headers = http("GET", fake.url + "/view?filename=taskqueue_00001_.png&subfolder=&type=output")
    assert code == 200 and body.startswith(b"\x89PNG")
    assert headers["Content-Type"] == "image/png"
    assert png_size(body) == (16, 16)
    assert (fake.output_dir / "taskqueue_00001_.png").read_bytes() == body
    # a second run with another seed: the next counter, another colour
    wf = copy.deepcopy(WORKFLOW)
    wf["3"]["inputs"]["seed"] = 1
    entry2 = done(fake, submit(fake, wf))
    assert entry2["outputs"]["9"]["images"][0]["filename"] == "taskqueue_00002_.png"
    assert (fake.output_dir / "taskqueue_00002_.png").read_bytes() != body
    # the /api prefix serves the same routes
    assert pid in get_json(fake.url + "/api/history?max_items=5")
    assert list(get_json(fake.url + "/history?max_items=1")) == [entry2["prompt"][1]]


def test_view_refuses_path_traversal(fake) -> None:
    (fake.root / "secret.txt").write_text("no")
    base = fake.url + "/view?"
    q = urllib.parse.urlencode
    assert http("GET", base + q({"filename": "../secret.txt", "type": "output"}))[0] == 400
    assert http("GET", base + q({"filename": "/etc/passwd"}))[0] == 400
    assert http("GET", base + q({"filename": "secret.txt", "subfolder": "..", "type": "output"}))[0] == 403
    assert http("GET", base + q({"filename": "secret.txt", "subfolder": "../../..", "type": "input"}))[0] == 403
    assert http("GET", base + q({"filename": "x.png", "type": "bogus"}))[0] == 400
    assert http("GET", base + q({"filename": "missing.png"}))[0] == 404
    assert http("GET", fake.url + "/view")[0] == 404


def test_upload_then_load_image(fake, clients) -> None:
    data = comfyui_fake.png_bytes(8, 8, b"upload")
    body, ctype = multipart({"image": ("in.png", data), "overwrite": "false"})
    status, answer, _ = http("POST", fake.url + "/upload/image", body, {"Content-Type": ctype})
    assert status == 200 and json.loads(answer) == {"name": "in.png", "subfolder": "", "type": "input"}
    assert (fake.input_dir / "in.png").read_bytes() == data
    # the same bytes again: a duplicate keeps its name; other bytes get a new one
    status, answer, _ = http("POST", fake.url + "/upload/image", body, {"Content-Type": ctype})
    assert json.loads(answer)["name"] == "in.png"
    other, ctype2 = multipart({"image": ("in.png", comfyui_fake.png_bytes(8, 8, b"other"))})
    assert json.loads(http("POST", fake.url + "/upload/image", other, {"Content-Type": ctype2})[1])["name"] == "in (1).png"
    sub, ctype3 = multipart({"image": ("s.png", data), "subfolder": "pics", "type": "input"})
    assert json.loads(http("POST", fake.url + "/upload/image", sub, {"Content-Type": ctype3})[1]) == {"name": "s.png", "subfolder": "pics", "type": "input"}
    assert fake.uploads == ["in.png", "in.png", "in (1).png", "s.png"]
    bad, ctype4 = multipart({"image": ("../evil.png", data)})
    assert http("POST", fake.url + "/upload/image", bad, {"Content-Type": ctype4})[0] == 400
    nofile, ctype5 = multipart({"overwrite": "true"})
    assert http("POST", fake.url + "/upload/image", nofile, {"Content-Type": ctype5})[0] == 400
    code, viewed, _ = http("GET", fake.url + "/view?filename=in.png&type=input")
    assert code == 200 and viewed == data

    graph: dict[str, dict[str, Any]] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact", "width": 64, "height": 64, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sub/loaded"}},
    }
    c = clients(fake.url, "c1")
    pid = submit(fake, graph)
    c.done(pid)
    assert [m["type"] for m in c.of(pid)][-2:] == ["execution_success", "executing"]
    image = done(fake, pid)["outputs"]["3"]["images"][0]
    assert image == {"filename": "loaded_00001_.png", "subfolder": "sub", "type": "output"}
    assert http("GET", fake.url + "/view?filename=loaded_00001_.png&subfolder=sub&type=output")[1].startswith(b"\x89PNG")

    graph["1"]["inputs"]["image"] = "never-uploaded.png"
    status, answer = post_json(fake.url + "/prompt", {"prompt": graph})
    assert status == 400
    assert answer["node_errors"]["1"]["errors"] == [{
        "type": "custom_validation_failed", "message": "Custom validation failed for node",
        "details": "image - Invalid image file: never-uploaded.png", "extra_info": {"input_name": "image"},
    }]
    assert answer["node_errors"]["1"]["class_type"] == "LoadImage"


def test_validation_failures(fake) -> None:
    status, answer = post_json(fake.url + "/prompt", {"client_id": "c1"})
    assert status == 400
    assert answer == {"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}

    wf = copy.deepcopy(WORKFLOW)
    wf["3"]["class_type"] = "KSamplerTurbo"
    status, answer = post_json(fake.url + "/prompt", {"prompt": wf})
    assert status == 400 and answer["node_errors"] == {}
    assert answer["error"] == {"type": "invalid_prompt", "message": "Cannot execute because node KSamplerTurbo does not exist.", "details": "Node ID '#3'", "extra_info": {}}

    wf = {k: v for k, v in copy.deepcopy(WORKFLOW).items() if k != "9"}
    status, answer = post_json(fake.url + "/prompt", {"prompt": wf})
    assert status == 400 and answer["error"]["type"] == "prompt_no_outputs"

    wf = copy.deepcopy(WORKFLOW)
    del wf["3"]["inputs"]["seed"]
    status, answer = post_json(fake.url + "/prompt", {"prompt": wf})
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert answer["node_errors"] == {"3": {
        "errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "seed", "extra_info": {"input_name": "seed"}}],
        "dependent_outputs": ["9"], "class_type": "KSampler",
    }}

    wf = copy.deepcopy(WORKFLOW)
    wf["8"]["inputs"]["samples"] = ["99", 0]
    status, answer = post_json(fake.url + "/prompt", {"prompt": wf})
    assert status == 400 and list(answer["node_errors"]) == ["8"]
    assert answer["node_errors"]["8"]["errors"][0]["type"] == "exception_during_inner_validation"

    wf = copy.deepcopy(WORKFLOW)
    wf["3"]["inputs"]["steps"] = 0
    status, answer = post_json(fake.url + "/prompt", {"prompt": wf})
    assert answer["node_errors"]["3"]["errors"][0]["type"] == "value_smaller_than_min"

    fake.fail_next_validation("3", "sampler_name")
    status, answer = post_json(fake.url + "/prompt", {"prompt": WORKFLOW, "client_id": "c1"})
    assert status == 400
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    entry = answer["node_errors"]["3"]
    assert entry["class_type"] == "KSampler" and entry["dependent_outputs"] == ["9"]
    (error,) = entry["errors"]
    assert set(error) == {"type", "message", "details", "extra_info"}
    assert error["type"] == "value_not_in_list" and error["message"] == "Value not in list"
    assert error["extra_info"]["input_name"] == "sampler_name"
    assert error["extra_info"]["received_value"] == "euler"

    fake.fail_next_validation("4", "ckpt_name", "Custom validation failed for node")
    status, answer = post_json(fake.url + "/prompt", {"prompt": WORKFLOW})
    assert status == 400 and answer["node_errors"]["4"]["errors"][0]["type"] == "custom_validation_failed"

    assert len(fake.rejected) == 8 and fake.submissions == []
    assert fake.rejected[0]["response"]["error"]["type"] == "no_prompt"
    submit(fake)  # the hook fired once: the next prompt is accepted
    assert len(fake.submissions) == 1


def test_fail_next_execution(fake, clients) -> None:
    c = clients(fake.url, "c1")
    fake.fail_next_execution("3")
    pid = submit(fake)
    c.done(pid)
    types = [m["type"] for m in c.of(pid)]
    assert "execution_success" not in types
    assert types[-2:] == ["execution_error", "executing"]
    error = c.wait_for("execution_error")["data"]
    assert set(error) == {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                          "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert (error["prompt_id"], error["node_id"], error["node_type"]) == (pid, "3", "KSampler")
    assert error["exception_message"].startswith("CUDA out of memory\n")
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert sorted(error["executed"]) == ["4", "5", "6", "7"]
    assert error["current_inputs"]["steps"] == [20]
    assert isinstance(error["traceback"], list) and sorted(error["current_outputs"]) == sorted(WORKFLOW)
    entry = done(fake, pid)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_error"]
    assert entry["outputs"] == {}
    # the next run succeeds and takes what ran before the failure from the cache
    pid2 = submit(fake)
    c.done(pid2)
    assert c.wait_for("execution_cached", prompt_id=pid2)["data"]["nodes"] == ["4", "5", "6", "7"]
    assert done(fake, pid2)["status"]["status_str"] == "success"


def test_interrupt_while_running(fake, clients) -> None:
    c = clients(fake.url, "c1")
    fake.steps = 10_000
    fake.step_s = 0.01
    pid = submit(fake)
    fake.wait_until(lambda: any(t == "progress" and d["prompt_id"] == pid for _, t, d in fake.events))
    assert fake.running() == pid
    queue = get_json(fake.url + "/queue")
    assert [item[1] for item in queue["queue_running"]] == [pid] and len(queue["queue_running"][0]) == 5

    # an interrupt aimed at another prompt is ignored: the sampler goes on
    assert post_json(fake.url + "/interrupt", {"prompt_id": "someone-else"})[0] == 200
    seen = max(d["value"] for _, t, d in list(fake.events) if t == "progress")
    fake.wait_until(lambda: any(t == "progress" and d["value"] >= seen + 3 for _, t, d in fake.events))
    assert fake.running() == pid

    status, _, _ = http("POST", fake.url + "/interrupt", b"")  # no body: a global interrupt
    assert status == 200
    c.done(pid)
    interrupted = c.wait_for("execution_interrupted")["data"]
    assert set(interrupted) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert (interrupted["prompt_id"], interrupted["node_id"], interrupted["node_type"]) == (pid, "3", "KSampler")
    assert sorted(interrupted["executed"]) == ["4", "5", "6", "7"]
    assert "execution_success" not in [m["type"] for m in c.of(pid)]
    assert done(fake, pid)["status"]["status_str"] == "error"
    assert fake.interrupts == [{"prompt_id": "someone-else"}, {}]

    fake.steps = 4  # a targeted interrupt of the running prompt works too
    pid2 = submit(fake)
    fake.wait_until(lambda: fake.running() == pid2)
    fake.step_s = 5.0
    fake.wait_until(lambda: any(t == "executing" and d.get("prompt_id") == pid2 for _, t, d in fake.events))
    assert post_json(fake.url + "/interrupt", {"prompt_id": pid2})[0] == 200
    c.wait_for("execution_interrupted", prompt_id=pid2)


def test_delete_and_clear_while_held(fake, clients) -> None:
    fake.hold()
    a, b = submit(fake), submit(fake)
    front = submit(fake, front=True)
    assert fake.pending() == [front, a, b]
    queue = get_json(fake.url + "/queue")
    assert queue["queue_running"] == []
    assert [(item[0], item[1]) for item in queue["queue_pending"]] == [(-2, front), (0, a), (1, b)]
    assert post_json(fake.url + "/queue", {"delete": [a, "unknown"]})[0] == 200
    assert fake.deletes == [a, "unknown"]
    assert fake.pending() == [front, b]
    fake.unhold()
    done(fake, front)
    done(fake, b)
    assert a not in fake.history()
    assert event_types(fake, a) == []

    fake.hold()
    c, d = submit(fake), submit(fake)
    assert post_json(fake.url + "/queue", {"clear": True})[0] == 200
    assert fake.pending() == []
    fake.unhold()
    last = submit(fake)
    done(fake, last)
    assert c not in fake.history() and d not in fake.history()

    assert post_json(fake.url + "/history", {"delete": [last]})[0] == 200
    assert last not in get_json(fake.url + "/history")
    assert post_json(fake.url + "/history", {"clear": True})[0] == 200
    assert get_json(fake.url + "/history") == {}


def test_drop_websockets_mid_run(fake, clients) -> None:
    first = clients(fake.url, "c1")
    fake.steps = 6
    fake.step_s = 0.01
    pid = submit(fake)
    first.wait_for("progress", prompt_id=pid)
    fake.step_s = 5.0  # park the sampler mid-step
    fake.drop_websockets()
    first.wait(lambda: first.closed, "the dropped socket to close")
    assert not first.close_frame
    assert fake.connected() == [] and fake.running() == pid

    second = clients(fake.url, "c1")
    assert second.wait_for("status")["data"]["sid"] == "c1"
    # as ComfyUI does for the executing client: the node it is on, without a prompt id
    assert second.wait_for("executing")["data"] == {"node": "3"}
    fake.step_s = 0.005
    second.done(pid)
    types = [m["type"] for m in second.of(pid)]
    assert "progress" in types and types[-2:] == ["execution_success", "executing"]
    assert done(fake, pid)["status"]["status_str"] == "success"


def test_restart_loses_history_same_port(fake, clients) -> None:
    c = clients(fake.url, "c1")
    pid = submit(fake)
    done(fake, pid)
    port, url = fake.port, fake.url
    fake.hold()
    pending = submit(fake)
    fake.restart()
    assert fake.port == port and fake.url == url
    c.wait(lambda: c.closed, "the old socket to close")
    assert get_json(url + "/history") == {}
    assert get_json(url + "/queue") == {"queue_running": [], "queue_pending": []}
    assert pending not in fake.pending()
    fake.unhold()
    status, answer = post_json(url + "/prompt", {"prompt": WORKFLOW, "client_id": "c2"})
    assert status == 200 and answer["number"] == 0  # the counter restarts too
    entry = done(fake, answer["prompt_id"])
    # the cache is gone (everything ran again); the output files are not
    assert [m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached"] == [[]]
    assert entry["outputs"]["9"]["images"][0]["filename"] == "taskqueue_00002_.png"


def test_execution_cached_on_identical_prompt(fake, clients) -> None:
    c = clients(fake.url, "c1")
    pid1 = submit(fake)
    c.done(pid1)
    pid2 = submit(fake)
    c.done(pid2)
    msgs = c.of(pid2)
    assert [m["type"] for m in msgs] == ["execution_start", "execution_cached", "executed", "execution_success", "executing"]
    assert msgs[1]["data"]["nodes"] == list(WORKFLOW)
    first_images = done(fake, pid1)["outputs"]["9"]
    assert msgs[2]["data"]["node"] == "9" and msgs[2]["data"]["output"] == first_images
    assert done(fake, pid2)["outputs"]["9"] == first_images
    # another prompt text: the loader, the latent and the other text stay cached
    wf = copy.deepcopy(WORKFLOW)
    wf["6"]["inputs"]["text"] = "a lighthouse"
    pid3 = submit(fake, wf)
    c.done(pid3)
    assert c.wait_for("execution_cached", prompt_id=pid3)["data"]["nodes"] == ["4", "5", "7"]
    ran = [m["data"]["node"] for m in c.of(pid3) if m["type"] == "executing"]
    assert ran == ["6", "3", "8", "9", None]


def test_misc_routes(fake, clients) -> None:
    stats = get_json(fake.url + "/system_stats")
    assert set(stats) == {"system", "devices"}
    assert {"os", "ram_total", "ram_free", "comfyui_version", "python_version", "pytorch_version", "embedded_python", "argv"} <= set(stats["system"])
    assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(stats["devices"][0])
    info = get_json(fake.url + "/object_info")
    assert set(comfyui_fake.NODE_CLASSES) == set(info)
    ks = info["KSampler"]
    assert ks["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000}]
    assert ks["input_order"]["required"][0] == "model" and ks["output"] == ["LATENT"]
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input"]["hidden"]["prompt"] == "PROMPT"
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == fake.checkpoints
    assert list(get_json(fake.url + "/object_info/VAEDecode")) == ["VAEDecode"]
    assert get_json(fake.url + "/object_info/Nope") == {}
    assert get_json(fake.url + "/prompt") == {"exec_info": {"queue_remaining": 0}}
    assert get_json(fake.url + "/api/features")["supports_preview_metadata"] is True
    assert http("GET", fake.url + "/nope")[0] == 404
    assert http("GET", fake.url + "/interrupt")[0] == 405
    assert http("POST", fake.url + "/prompt", b"{not json")[0] == 500
    # ComfyUI's origin check: a loopback Host with a foreign Origin is refused
    assert http("GET", fake.url + "/queue", headers={"Origin": "http://evil.example"})[0] == 403
    assert http("GET", fake.url + "/queue", headers={"Origin": fake.url})[0] == 200
    # an explicit prompt_id and number are used as given
    status, answer = post_json(fake.url + "/prompt", {"prompt": WORKFLOW, "prompt_id": "mine", "number": 7})
    assert status == 200 and (answer["prompt_id"], answer["number"]) == ("mine", 7.0)
    done(fake, "mine")

    # websocket: ping/pong, feature flags, close handshake
    c = clients(fake.url, "ws1")
    c.wait_for("status")
    c.ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    assert c.wait_for("feature_flags")["data"]["supports_preview_metadata"] is True
    c.ws.ping(b"hello")
    c.wait(lambda: c.pongs == [b"hello"], "pong")
    c.ws.send_close()
    c.wait(lambda: c.closed, "close")
    assert c.close_frame
    fake.wait_until(lambda: "ws1" not in fake.connected())
    assert http("GET", fake.url + "/ws")[0] == 400  # not an upgrade


def test_wait_until_times_out_naming_the_wait(fake) -> None:
    with pytest.raises(TimeoutError, match="never happens"):
        fake.wait_until(lambda: False, timeout=0.05, what="never happens")


def test_cli_runs_on_bare_python(tmp_path) -> None:
    # -I -S: no site-packages at all, only the standard library
    cmd = [sys.executable, "-I", "-S", str(ROOT / "scripts" / "comfyui_fake.py"), "--port", "0", "--steps", "2",
           "--step-s", "0.001", "--root", str(tmp_path)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
            assert match, line
            url = match.group(1)
            assert get_json(url + "/queue") == {"queue_running": [], "queue_pending": []}
            status, answer = post_json(url + "/prompt", {"prompt": WORKFLOW})
            assert status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
