"""A protocol-faithful fake ComfyUI server, standard library only, for the tests,
the demo and the bench (no GPU, no models: "sampling" is a timer).

It speaks the routes and websocket messages of ComfyUI's own ``server.py`` and
``execution.py`` with the same JSON shapes: ``POST /prompt`` (a client's
``prompt_id`` is honoured, ``number``/``front`` order the queue, validation
errors are ``{"error": {...}, "node_errors": {...}}`` with status 400),
``GET/POST /queue``, ``POST /interrupt`` (with an optional ``prompt_id``: only
that prompt), ``GET/POST /history``, ``GET /history/{id}``, ``GET /view``
(path traversal refused), ``POST /upload/image`` (multipart),
``GET /system_stats``, ``GET /object_info`` and the websocket ``/ws?clientId=``
(RFC 6455 by hand), which sends ``status``, ``execution_start``,
``execution_cached``, ``executing``, ``progress``, ``executed``,
``execution_success``, ``execution_error`` and ``execution_interrupted`` to
the client that queued the prompt. Every route also answers under ``/api``.

Only the nodes that output nodes depend on run, in dependency order; a node
whose class and inputs (recursively) equal the previous run's is cached, as in
ComfyUI. ``SaveImage`` writes a real small PNG named like ComfyUI's
(``{prefix}_{counter:05}_.png``). History lives in memory and is lost on
restart, like the real server's.

Tests steer it: ``hold()``/``unhold()``, ``fail_next_validation``,
``fail_next_execution``, ``drop_websockets()``, ``restart()``, ``step_s`` and
``steps``; and read what it saw: ``submissions``, ``rejected``,
``interrupts``, ``deletes``, ``uploads``, ``events``, ``headers_seen``.

Run it by hand: ``python scripts/comfyui_fake.py --port 8188``.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import hashlib
import http.server
import json
import os
import signal
import socket
import socketserver
import struct
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# class_type -> (required inputs, is an output node, has sampler steps)
NODES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "CheckpointLoaderSimple": (("ckpt_name",), False, False),
    "CLIPTextEncode": (("text", "clip"), False, False),
    "EmptyLatentImage": (("width", "height", "batch_size"), False, False),
    "KSampler": (("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                  "negative", "latent_image", "denoise"), False, True),
    "KSamplerAdvanced": (("model", "noise_seed", "steps", "cfg", "positive", "negative",
                          "latent_image"), False, True),
    "VAEDecode": (("samples", "vae"), False, False),
    "VAEEncode": (("pixels", "vae"), False, False),
    "LoadImage": (("image",), False, False),
    "ImageScale": (("image", "upscale_method", "width", "height", "crop"), False, False),
    "SaveImage": (("images",), True, False),
    "PreviewImage": (("images",), True, False),
}


def png_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid RGB PNG of one colour."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) \
        and isinstance(value[1], int)


class _WebSocket:
    """One accepted websocket: server frames are unmasked, writes are serialised."""

    def __init__(self, sock: socket.socket, sid: str) -> None:
        self.sock = sock
        self.sid = sid
        self.lock = threading.Lock()
        self.open = True

    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode())

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([n])
        elif n < 1 << 16:
            head += bytes([126]) + struct.pack(">H", n)
        else:
            head += bytes([127]) + struct.pack(">Q", n)
        with self.lock:
            if not self.open:
                return
            try:
                self.sock.sendall(head + payload)
            except OSError:
                self.open = False

    def read_frames(self) -> None:
        """Serve the client's frames (ping, close) until the connection ends."""
        f = self.sock.makefile("rb")
        try:
            while self.open:
                b = f.read(2)
                if len(b) < 2:
                    return
                opcode, n = b[0] & 0x0F, b[1] & 0x7F
                if n == 126:
                    n = struct.unpack(">H", f.read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", f.read(8))[0]
                mask = f.read(4) if b[1] & 0x80 else b"\0\0\0\0"
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(f.read(n)))
                if opcode == 0x8:
                    self._send(0x8, data[:2])
                    return
                if opcode == 0x9:
                    self._send(0xA, data)
        except (OSError, ValueError, struct.error):
            return
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            self.open = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    fake: "FakeComfyUI"


class FakeComfyUI:
    """The fake server. ``start()`` listens on ``host:port`` (0: a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, step_s: float = 0.01,
                 steps: int = 4, root: Optional[Path] = None) -> None:
        self.host, self.port = host, port
        self.step_s, self.steps = step_s, steps
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="comfyui-fake-"))
        self.output_dir = self.root / "output"
        self.input_dir = self.root / "input"
        self.temp_dir = self.root / "temp"
        for d in (self.output_dir, self.input_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.url = ""
        self.submissions: list[dict] = []
        self.rejected: list[dict] = []
        self.interrupts: list[dict] = []
        self.deletes: list[str] = []
        self.uploads: list[str] = []
        self.events: list[tuple[str, str, dict]] = []
        self.headers_seen: list[dict[str, str]] = []
        self._cv = threading.Condition()
        self._server: Optional[_Server] = None
        self._threads: list[threading.Thread] = []
        self._sockets: dict[str, _WebSocket] = {}
        self._reset_state()

    def _reset_state(self) -> None:
        self._pending: list[tuple] = []  # (number, prompt_id, prompt, extra_data, outputs)
        self._running: Optional[tuple] = None
        self._history: dict[str, dict] = {}
        self._number = 0
        self._held = False
        self._interrupt = False
        self._fail_validation: Optional[tuple[str, str, str]] = None
        self._fail_execution: Optional[tuple[str, str]] = None
        self._cache: dict[str, str] = {}
        self._counter = 0
        self._stopping = False

    # --- control -----------------------------------------------------------------

    def start(self) -> "FakeComfyUI":
        server = _Server((self.host, self.port), _Handler)
        server.fake = self
        self._server = server
        self.port = server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._stopping = False
        serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="comfyui-fake-http", daemon=True)
        work = threading.Thread(target=self._worker, name="comfyui-fake-exec", daemon=True)
        self._threads = [serve, work]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._interrupt = True
            self._cv.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.drop_websockets()
        for t in self._threads:
            t.join(5)
        self._threads = []

    def restart(self) -> None:
        """Stop, forget the queue and history (as ComfyUI does), listen on the same port."""
        self.stop()
        with self._cv:
            self._reset_state()
        self.start()

    def __enter__(self) -> "FakeComfyUI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def hold(self) -> None:
        with self._cv:
            self._held = True

    def unhold(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def fail_next_validation(self, node_id: str, input_name: str, message: str = "Value not in list") -> None:
        with self._cv:
            self._fail_validation = (node_id, input_name, message)

    def fail_next_execution(self, node_id: str, message: str = "CUDA out of memory") -> None:
        with self._cv:
            self._fail_execution = (node_id, message)

    def drop_websockets(self) -> None:
        """Close every websocket abruptly (no close frame); executions go on."""
        with self._cv:
            sockets = list(self._sockets.values())
            self._sockets.clear()
        for ws in sockets:
            ws.close()

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake ComfyUI: timed out waiting for {predicate}")
                self._cv.wait(min(left, 0.05))

    def running(self) -> Optional[str]:
        with self._cv:
            return self._running[1] if self._running else None

    def pending(self) -> list[str]:
        with self._cv:
            return [item[1] for item in sorted(self._pending, key=lambda i: i[0])]

    def history(self) -> dict:
        with self._cv:
            return json.loads(json.dumps(self._history))

    # --- messages ------------------------------------------------------------------

    def _send(self, kind: str, data: dict, sid: Optional[str]) -> None:
        """As PromptServer.send_sync: to one client id, or to all when sid is None."""
        text = json.dumps({"type": kind, "data": data})
        with self._cv:
            targets = [self._sockets[sid]] if sid in self._sockets else (
                list(self._sockets.values()) if sid is None else [])
            self.events.append((sid or "*", kind, data))
            self._cv.notify_all()
        for ws in targets:
            ws.send_text(text)

    def _queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": len(self._pending) + (1 if self._running else 0)}}

    def _status(self) -> None:
        with self._cv:
            info = self._queue_info()
        self._send("status", {"status": info}, None)

    # --- the prompt route ------------------------------------------------------------

    def post_prompt(self, body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict) or "prompt" not in body:
            return 400, {"error": {"type": "no_prompt", "message": "No prompt provided",
                                   "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}
        with self._cv:
            if "number" in body:
                number: float = float(body["number"])
            else:
                number = self._number
                if body.get("front"):
                    number = -number
                self._number += 1
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        ok, error, outputs, node_errors = self._validate(prompt, body.get("partial_execution_targets"))
        if not ok:
            with self._cv:
                self.rejected.append({"prompt": prompt, "error": error, "node_errors": node_errors})
                self._cv.notify_all()
            return 400, {"error": error, "node_errors": node_errors}
        with self._cv:
            self._pending.append((number, prompt_id, prompt, extra, outputs))
            self.submissions.append({"prompt_id": prompt_id, "number": number, "prompt": prompt,
                                     "client_id": extra.get("client_id"), "extra_data": extra})
            self._cv.notify_all()
        self._status()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def _validate(self, prompt: Any, targets: Any) -> tuple[bool, Optional[dict], list, dict]:
        def err(kind: str, message: str, details: str = "") -> tuple[bool, dict, list, dict]:
            return False, {"type": kind, "message": message, "details": details, "extra_info": {}}, [], {}
        if not isinstance(prompt, dict):
            return err("invalid_prompt", "Prompt must be an object")
        outputs = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return err("invalid_prompt",
                           "Cannot execute because a node is missing the class_type property.",
                           f"Node ID '#{node_id}'")
            if node["class_type"] not in NODES:
                return err("invalid_prompt",
                           f"Cannot execute because node {node['class_type']} does not exist.",
                           f"Node ID '#{node_id}'")
            if NODES[node["class_type"]][1]:
                outputs.append(node_id)
        if isinstance(targets, list):
            outputs = [t for t in outputs if t in targets]
        if not outputs:
            return err("prompt_no_outputs", "Prompt has no outputs")
        node_errors: dict[str, dict] = {}
        with self._cv:
            forced, self._fail_validation = self._fail_validation, None
        for out in outputs:
            for node_id in self._closure(prompt, [out]):
                node = prompt[node_id]
                errors = []
                inputs = node.get("inputs") or {}
                for name in NODES[node["class_type"]][0]:
                    if name not in inputs:
                        errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                       "details": name, "extra_info": {"input_name": name}})
                    elif _is_link(inputs[name]) and inputs[name][0] not in prompt:
                        errors.append({"type": "bad_linked_input",
                                       "message": "Bad linked input, must be a length-2 list of [string, int]",
                                       "details": f"{name}: {inputs[name]}", "extra_info": {"input_name": name}})
                if node["class_type"] == "LoadImage" and isinstance(inputs.get("image"), str):
                    if not (self.input_dir / inputs["image"]).is_file():
                        errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                                       "details": f"image - Invalid image file: {inputs['image']}",
                                       "extra_info": {"input_name": "image"}})
                if forced and forced[0] == node_id:
                    errors.append({"type": "value_not_in_list", "message": forced[2],
                                   "details": f"{forced[1]}: '{inputs.get(forced[1])}' not in list",
                                   "extra_info": {"input_name": forced[1],
                                                  "received_value": inputs.get(forced[1])}})
                if errors:
                    entry = node_errors.setdefault(node_id, {"errors": errors, "dependent_outputs": [],
                                                             "class_type": node["class_type"]})
                    if out not in entry["dependent_outputs"]:
                        entry["dependent_outputs"].append(out)
        if node_errors:
            return False, {"type": "prompt_outputs_failed_validation",
                           "message": "Prompt outputs failed validation", "details": "",
                           "extra_info": {}}, [], node_errors
        return True, None, outputs, {}

    @staticmethod
    def _closure(prompt: dict, targets: list[str]) -> list[str]:
        """Nodes the targets depend on, in dependency order (inputs first)."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen or node_id not in prompt:
                return
            seen.add(node_id)
            for value in (prompt[node_id].get("inputs") or {}).values():
                if _is_link(value):
                    visit(value[0])
            order.append(node_id)
        for t in targets:
            visit(t)
        return order

    # --- execution -------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (self._held or not self._pending):
                    self._cv.wait(0.05)
                if self._stopping:
                    return
                self._pending.sort(key=lambda i: i[0])
                item = self._pending.pop(0)
                self._running = item
                self._interrupt = False
                self._cv.notify_all()
            try:
                self._execute(item)
            finally:
                with self._cv:
                    self._running = None
                    self._cv.notify_all()
                self._status()

    def _execute(self, item: tuple) -> None:
        number, prompt_id, prompt, extra, outputs = item
        sid = extra.get("client_id")
        messages: list[list] = []

        def send(kind: str, data: dict, keep: bool = False) -> None:
            if keep:
                messages.append([kind, data])
            self._send(kind, data, sid)
        order = self._closure(prompt, outputs)
        signatures = self._signatures(prompt)
        cached = [n for n in order if not NODES[prompt[n]["class_type"]][1]
                  and self._cache.get(n) == signatures[n]]
        now = lambda: int(time.time() * 1000)  # noqa: E731
        send("execution_start", {"prompt_id": prompt_id, "timestamp": now()}, keep=True)
        send("execution_cached", {"nodes": cached, "prompt_id": prompt_id, "timestamp": now()}, keep=True)
        ui: dict[str, dict] = {}
        executed = list(cached)
        with self._cv:
            fail, self._fail_execution = self._fail_execution, None
        status = "success"
        for node_id in order:
            if node_id in cached:
                continue
            node = prompt[node_id]
            cls = node["class_type"]
            send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            total = 0
            if NODES[cls][2]:
                asked = (node.get("inputs") or {}).get("steps", self.steps)
                total = max(1, min(int(asked) if isinstance(asked, int) else self.steps, self.steps))
            interrupted = False
            for step in range(1, total + 1) if total else [0]:
                with self._cv:
                    self._cv.wait_for(lambda: self._interrupt or self._stopping, timeout=self.step_s)
                    interrupted = self._interrupt
                if interrupted:
                    break
                if total:
                    send("progress", {"value": step, "max": total, "prompt_id": prompt_id, "node": node_id})
            if interrupted:
                send("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id, "node_type": cls,
                                               "executed": executed, "timestamp": now()}, keep=True)
                status = "error"
                break
            if fail and fail[0] == node_id:
                send("execution_error", {
                    "prompt_id": prompt_id, "node_id": node_id, "node_type": cls, "executed": executed,
                    "exception_message": fail[1], "exception_type": "torch.OutOfMemoryError",
                    "traceback": ["Traceback (most recent call last):\n", f"  (fake)\n{fail[1]}\n"],
                    "current_inputs": {}, "current_outputs": {}, "timestamp": now()}, keep=True)
                status = "error"
                break
            self._cache[node_id] = signatures[node_id]
            executed.append(node_id)
            if cls in ("SaveImage", "PreviewImage"):
                images = [self._save_image(prompt, node_id, cls)]
                ui[node_id] = {"images": images}
                send("executed", {"node": node_id, "display_node": node_id, "output": ui[node_id],
                                  "prompt_id": prompt_id})
        if status == "success":
            send("execution_success", {"prompt_id": prompt_id, "timestamp": now()}, keep=True)
        with self._cv:
            self._history[prompt_id] = {
                "prompt": [number, prompt_id, prompt, extra, outputs],
                "outputs": ui,
                "status": {"status_str": status, "completed": status == "success", "messages": messages},
                "meta": {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                         for n in ui},
            }
            self._cv.notify_all()
        send("executing", {"node": None, "display_node": None, "prompt_id": prompt_id})

    @staticmethod
    def _signatures(prompt: dict) -> dict[str, str]:
        memo: dict[str, str] = {}

        def sig(node_id: str, depth: int = 0) -> str:
            if node_id in memo:
                return memo[node_id]
            node = prompt.get(node_id) or {}
            inputs = {k: (sig(v[0], depth + 1) if _is_link(v) and depth < 200 else v)
                      for k, v in sorted((node.get("inputs") or {}).items())}
            memo[node_id] = hashlib.sha256(json.dumps([node.get("class_type"), inputs],
                                                      sort_keys=True, default=str).encode()).hexdigest()
            return memo[node_id]
        return {n: sig(n) for n in prompt}

    def _save_image(self, prompt: dict, node_id: str, cls: str) -> dict:
        seed = 0
        text = ""
        for node in prompt.values():
            inputs = node.get("inputs") or {}
            for key in ("seed", "noise_seed"):
                if isinstance(inputs.get(key), int):
                    seed = inputs[key]
            if isinstance(inputs.get("text"), str) and not text:
                text = inputs["text"]
        h = hashlib.sha256(f"{seed}:{text}".encode()).digest()
        data = png_bytes(16, 16, (h[0], h[1], h[2]))
        with self._cv:
            self._counter += 1
            counter = self._counter
        if cls == "SaveImage":
            prefix = str((prompt[node_id].get("inputs") or {}).get("filename_prefix", "ComfyUI"))
            folder, kind = self.output_dir, "output"
        else:
            prefix, folder, kind = f"ComfyUI_temp_{uuid.uuid4().hex[:5]}", self.temp_dir, "temp"
        name = f"{os.path.basename(prefix)}_{counter:05}_.png"
        (folder / name).write_bytes(data)
        return {"filename": name, "subfolder": "", "type": kind}

    # --- other routes ----------------------------------------------------------------

    def queue(self) -> dict:
        with self._cv:
            running = [list(self._running)] if self._running else []
            pending = [list(i) for i in sorted(self._pending, key=lambda i: i[0])]
        return {"queue_running": running, "queue_pending": pending}

    def post_queue(self, body: dict) -> None:
        with self._cv:
            if body.get("clear"):
                self._pending.clear()
            for pid in body.get("delete") or []:
                self.deletes.append(pid)
                self._pending = [i for i in self._pending if i[1] != pid]
            self._cv.notify_all()
        self._status()

    def post_interrupt(self, body: dict) -> None:
        with self._cv:
            self.interrupts.append(body)
            pid = body.get("prompt_id") if isinstance(body, dict) else None
            if self._running and (pid is None or pid == self._running[1]):
                self._interrupt = True
            self._cv.notify_all()

    def get_history(self, prompt_id: Optional[str], max_items: Optional[int]) -> dict:
        with self._cv:
            if prompt_id is not None:
                return {prompt_id: self._history[prompt_id]} if prompt_id in self._history else {}
            items = list(self._history.items())
            if max_items is not None:
                items = items[-max_items:]
            return dict(items)

    def post_history(self, body: dict) -> None:
        with self._cv:
            if body.get("clear"):
                self._history.clear()
            for pid in body.get("delete") or []:
                self._history.pop(pid, None)

    def folder(self, kind: Optional[str]) -> Optional[Path]:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(kind or "output")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def fake(self) -> FakeComfyUI:
        return self.server.fake

    def _route(self) -> tuple[str, dict[str, str]]:
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path[4:] if parts.path.startswith("/api/") else parts.path
        with self.fake._cv:
            self.fake.headers_seen.append({k: v for k, v in self.headers.items()})
        return path, dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))

    def _reply(self, status: int, body: Any = None, *, raw: Optional[bytes] = None,
               content_type: str = "application/json") -> None:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        raw = self._body()
        return json.loads(raw) if raw.strip() else {}

    def do_GET(self) -> None:
        path, query = self._route()
        fake = self.fake
        if path == "/ws":
            return self._websocket(query.get("clientId", ""))
        if path == "/queue":
            return self._reply(200, fake.queue())
        if path == "/prompt":
            with fake._cv:
                return self._reply(200, fake._queue_info())
        if path == "/history":
            n = query.get("max_items")
            return self._reply(200, fake.get_history(None, int(n) if n else None))
        if path.startswith("/history/"):
            return self._reply(200, fake.get_history(urllib.parse.unquote(path[len("/history/"):]), None))
        if path == "/view":
            return self._view(query)
        if path == "/system_stats":
            return self._reply(200, {"system": {"os": os.name, "ram_total": 0, "ram_free": 0,
                                                "comfyui_version": "fake", "python_version": "",
                                                "pytorch_version": "", "embedded_python": False, "argv": []},
                                     "devices": [{"name": "fake", "type": "cpu", "index": None,
                                                  "vram_total": 0, "vram_free": 0,
                                                  "torch_vram_total": 0, "torch_vram_free": 0}]})
        if path == "/object_info":
            return self._reply(200, {cls: {"input": {"required": {n: [] for n in spec[0]}},
                                           "output_node": spec[1], "name": cls, "display_name": cls}
                                     for cls, spec in NODES.items()})
        self._reply(404)

    def do_POST(self) -> None:
        path, _query = self._route()
        fake = self.fake
        if path == "/upload/image":
            return self._upload()
        try:
            body = self._json_body()
        except ValueError:
            return self._reply(400, {"error": {"type": "invalid_json", "message": "body is not JSON",
                                               "details": "", "extra_info": {}}, "node_errors": {}})
        if path == "/prompt":
            status, answer = fake.post_prompt(body)
            return self._reply(status, answer)
        if path == "/queue":
            fake.post_queue(body)
            return self._reply(200)
        if path == "/interrupt":
            fake.post_interrupt(body if isinstance(body, dict) else {})
            return self._reply(200)
        if path == "/history":
            fake.post_history(body)
            return self._reply(200)
        self._reply(404)

    def _view(self, query: dict[str, str]) -> None:
        name = query.get("filename")
        if not name:
            return self._reply(404)
        if name[0] == "/" or ".." in name:
            return self._reply(400)
        base = self.fake.folder(query.get("type"))
        if base is None:
            return self._reply(400)
        folder = base
        if "subfolder" in query:
            folder = base / query["subfolder"]
            if os.path.commonpath((os.path.abspath(folder), str(base))) != str(base):
                return self._reply(403)
        file = folder / os.path.basename(name)
        if not file.is_file():
            return self._reply(404)
        self._reply(200, raw=file.read_bytes(), content_type="image/png")

    def _upload(self) -> None:
        raw = self._body()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
        fields: dict[str, Any] = {}
        for part in message.iter_parts() if message.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        image = fields.get("image")
        if not image or not image[0]:
            return self._reply(400)
        kind = (fields.get("type") or (None, b"input"))[1].decode() or "input"
        sub = (fields.get("subfolder") or (None, b""))[1].decode()
        overwrite = (fields.get("overwrite") or (None, b""))[1].decode() in ("true", "1")
        base = self.fake.folder(kind)
        if base is None:
            return self._reply(400)
        folder = Path(os.path.join(base, os.path.normpath(sub))) if sub else base
        filename = image[0]
        path = Path(os.path.abspath(folder / filename))
        if os.path.commonpath((str(base), str(path))) != str(base):
            return self._reply(400)
        folder.mkdir(parents=True, exist_ok=True)
        stem, ext = os.path.splitext(filename)
        i = 1
        while not overwrite and path.exists() and path.read_bytes() != image[1]:
            filename = f"{stem} ({i}){ext}"
            path = folder / filename
            i += 1
        path.write_bytes(image[1])
        with self.fake._cv:
            self.fake.uploads.append(filename)
            self.fake._cv.notify_all()
        self._reply(200, {"name": filename, "subfolder": sub, "type": kind})

    def _websocket(self, sid: str) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or "websocket" not in self.headers.get("Upgrade", "").lower():
            return self._reply(400)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        fake = self.fake
        sid = sid or uuid.uuid4().hex
        ws = _WebSocket(self.connection, sid)
        with fake._cv:
            old = fake._sockets.pop(sid, None)
            fake._sockets[sid] = ws
            info = fake._queue_info()
            running = fake._running
        if old is not None:
            old.close()
        fake._send("status", {"status": info, "sid": sid}, sid)
        if running and running[3].get("client_id") == sid:
            fake._send("executing", {"node": None, "prompt_id": running[1]}, sid)
        ws.read_frames()
        with fake._cv:
            if fake._sockets.get(sid) is ws:
                del fake._sockets[sid]
        self.close_connection = True


def main() -> int:
    parser = argparse.ArgumentParser(description="A fake ComfyUI server for tests and demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--step-s", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    fake = FakeComfyUI(args.host, args.port, step_s=args.step_s, steps=args.steps).start()
    print(f"listening on {fake.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
