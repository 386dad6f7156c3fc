#!/usr/bin/env python3
"""A fake ComfyUI server for the tests and the demo. Standard library only.

It speaks the HTTP routes and websocket messages of ComfyUI's ``server.py`` and
``execution.py``, with the same JSON shapes: ``POST /prompt`` (with its
validation errors and ``node_errors``), ``GET/POST /queue``, ``POST /interrupt``,
``GET/POST /history``, ``GET /view``, ``POST /upload/image``, ``GET /system_stats``,
``GET /object_info``, ``GET /features`` and the ``/ws`` websocket (a hand-written
RFC 6455 server). Like the real server, every route is also served under ``/api``.

One executor thread runs the queued prompts in ComfyUI's order (lowest ``number``
first; ``front`` puts a prompt first), only the nodes an output node depends on,
in the order ComfyUI's execution list picks them, and caches node outputs by
their class and inputs as ComfyUI's classic cache does. The nodes are fakes:
a sampler reports ``progress`` for ``min(steps input, FakeComfyUI.steps)`` steps of
``step_s`` seconds each, every other node takes one ``step_s``, and SaveImage /
PreviewImage write small real PNGs. Queue, history and the cache live in memory
and are lost on ``restart()``, as in the real server.

Use from Python::

    import sys; sys.path.insert(0, "<repo>/scripts"); import comfyui_fake
    with comfyui_fake.FakeComfyUI(steps=4, step_s=0.01) as fake:
        ... fake.url ...

or from a shell: ``python scripts/comfyui_fake.py --port 8188``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import inspect
import ipaddress
import json
import mimetypes
import os
import queue
import random
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["FakeComfyUI", "NODE_CLASSES", "main"]

COMFYUI_VERSION = "0.3.60+fake"
MAX_RESOLUTION = 16384
MAX_UPLOAD_SIZE = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size (MB)
MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IMAGE_SIZE = 16  # the fake's PNGs are IMAGE_SIZE x IMAGE_SIZE

SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "gradient_estimation", "ddim", "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
]
DEFAULT_CHECKPOINTS = ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"]

# Input types resolved when asked for: the checkpoint list and the input folder's files.
_CHECKPOINTS = "$checkpoints"
_INPUT_FILES = "$input_files"

# What a validation error's message maps to, for fail_next_validation().
_ERROR_TYPES = {
    "Value not in list": "value_not_in_list",
    "Required input is missing": "required_input_missing",
    "Return type mismatch between linked nodes": "return_type_mismatch",
    "Custom validation failed for node": "custom_validation_failed",
}


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class NodeClass:
    """A fake node class: what /object_info tells and what validation checks."""

    name: str
    display_name: str
    category: str
    inputs: tuple[tuple[str, str, Any, dict[str, Any]], ...]  # (category, name, type, options)
    outputs: tuple[str, ...] = ()
    output_names: Optional[tuple[str, ...]] = None
    output_node: bool = False
    description: str = ""
    sampler: bool = False
    custom_validated: tuple[str, ...] = ()  # inputs a VALIDATE_INPUTS checks instead
    hidden: tuple[tuple[str, str], ...] = ()


def _int(default: int, lo: int, hi: int, **extra: Any) -> dict[str, Any]:
    return {"default": default, "min": lo, "max": hi, **extra}


def _float(default: float, lo: float, hi: float, **extra: Any) -> dict[str, Any]:
    return {"default": default, "min": lo, "max": hi, **extra}


_SAVE_HIDDEN = (("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO"))
_SAMPLER_COMMON: tuple[tuple[str, str, Any, dict[str, Any]], ...] = (
    ("required", "steps", "INT", _int(20, 1, 10000)),
    ("required", "cfg", "FLOAT", _float(8.0, 0.0, 100.0, step=0.1, round=0.01)),
    ("required", "sampler_name", SAMPLERS, {}),
    ("required", "scheduler", SCHEDULERS, {}),
    ("required", "positive", "CONDITIONING", {}),
    ("required", "negative", "CONDITIONING", {}),
    ("required", "latent_image", "LATENT", {}),
)

NODE_CLASSES: dict[str, NodeClass] = {
    c.name: c
    for c in (
        NodeClass(
            "CheckpointLoaderSimple", "Load Checkpoint", "loaders",
            (("required", "ckpt_name", _CHECKPOINTS, {}),),
            ("MODEL", "CLIP", "VAE"),
            description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
        ),
        NodeClass(
            "CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
            (
                ("required", "text", "STRING", {"multiline": True, "dynamicPrompts": True}),
                ("required", "clip", "CLIP", {}),
            ),
            ("CONDITIONING",),
        ),
        NodeClass(
            "EmptyLatentImage", "Empty Latent Image", "latent",
            (
                ("required", "width", "INT", _int(512, 16, MAX_RESOLUTION, step=8)),
                ("required", "height", "INT", _int(512, 16, MAX_RESOLUTION, step=8)),
                ("required", "batch_size", "INT", _int(1, 1, 4096)),
            ),
            ("LATENT",),
        ),
        NodeClass(
            "KSampler", "KSampler", "sampling",
            (
                ("required", "model", "MODEL", {}),
                ("required", "seed", "INT", _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True)),
                *_SAMPLER_COMMON,
                ("required", "denoise", "FLOAT", _float(1.0, 0.0, 1.0, step=0.01)),
            ),
            ("LATENT",), sampler=True,
        ),
        NodeClass(
            "KSamplerAdvanced", "KSampler (Advanced)", "sampling",
            (
                ("required", "model", "MODEL", {}),
                ("required", "add_noise", ["enable", "disable"], {}),
                ("required", "noise_seed", "INT", _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True)),
                *_SAMPLER_COMMON,
                ("required", "start_at_step", "INT", _int(0, 0, 10000)),
                ("required", "end_at_step", "INT", _int(10000, 0, 10000)),
                ("required", "return_with_leftover_noise", ["disable", "enable"], {}),
            ),
            ("LATENT",), sampler=True,
        ),
        NodeClass(
            "VAEDecode", "VAE Decode", "latent",
            (("required", "samples", "LATENT", {}), ("required", "vae", "VAE", {})),
            ("IMAGE",),
        ),
        NodeClass(
            "VAEEncode", "VAE Encode", "latent",
            (("required", "pixels", "IMAGE", {}), ("required", "vae", "VAE", {})),
            ("LATENT",),
        ),
        NodeClass(
            "LoadImage", "Load Image", "image",
            (("required", "image", _INPUT_FILES, {"image_upload": True}),),
            ("IMAGE", "MASK"), custom_validated=("image",),
        ),
        NodeClass(
            "SaveImage", "Save Image", "image",
            (
                ("required", "images", "IMAGE", {}),
                ("required", "filename_prefix", "STRING", {"default": "ComfyUI"}),
            ),
            (), output_node=True, hidden=_SAVE_HIDDEN,
            description="Saves the input images to your ComfyUI output directory.",
        ),
        NodeClass(
            "PreviewImage", "Preview Image", "image",
            (("required", "images", "IMAGE", {}),),
            (), output_node=True, hidden=_SAVE_HIDDEN,
            description="Saves the input images to your ComfyUI output directory.",
        ),
        NodeClass(
            "ImageScale", "Upscale Image", "image/upscaling",
            (
                ("required", "image", "IMAGE", {}),
                ("required", "upscale_method", ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
                ("required", "width", "INT", _int(512, 0, MAX_RESOLUTION, step=1)),
                ("required", "height", "INT", _int(512, 0, MAX_RESOLUTION, step=1)),
                ("required", "crop", ["disabled", "center"], {}),
            ),
            ("IMAGE",),
        ),
    )
}


class _FakeValue:
    """What flows along a link: the type, where it came from, and a batch size."""

    def __init__(self, type_: str, sig: str, src: str, batch: int = 1) -> None:
        self.type = type_
        self.sig = sig
        self.src = src
        self.batch = batch

    def __str__(self) -> str:
        return f"<fake {self.type} from node {self.src}>"

    __repr__ = __str__


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError in fail_next_execution()."""


OutOfMemoryError.__module__ = "torch"

_OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked "
    "before you might have accidentally set the batch_size to a large number."
)


class _Interrupted(Exception):
    pass


class _Stopped(Exception):
    """The server stopped (or restarted) under a running prompt."""


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        and isinstance(value[1], (int, float)) and not isinstance(value[1], bool)
    )


def _full_type_name(klass: type) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def _format_value(x: Any) -> Any:
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


def _types_match(received: str, wanted: Any) -> bool:
    if not isinstance(wanted, str):
        return False
    if received == "*" or wanted == "*" or received == wanted:
        return True
    return bool(set(received.split(",")) & set(wanted.split(",")))


def _error(type_: str, message: str, details: str = "", extra_info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


def png_bytes(width: int, height: int, seed: bytes, text: Optional[dict[str, str]] = None) -> bytes:
    """A valid RGB PNG: a gradient whose colours come from ``seed``; ``text`` as tEXt chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    digest = hashlib.sha256(seed).digest()
    r0, g0, b0 = digest[0], digest[1], digest[2]
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")  # filter type: None
        for x in range(width):
            row += bytes(((r0 + 8 * x) % 256, (g0 + 8 * y) % 256, b0))
        rows.append(bytes(row))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
    return out + chunk(b"IDAT", zlib.compress(b"".join(rows), 4)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- execution order


class _ExecutionList:
    """The nodes an output needs, dissolved in topological order with ComfyUI's
    "UX friendly" pick: output nodes first, then what feeds an output, then what
    feeds that; otherwise the first ready node in discovery order."""

    def __init__(self, prompt: dict[str, Any], outputs: list[str], is_cached: Callable[[str], bool]) -> None:
        self.prompt = prompt
        self.is_cached = is_cached
        self.pending: dict[str, None] = {}
        self.blockers: dict[str, set[str]] = {}
        self.blocking: dict[str, set[str]] = {}
        for o in outputs:
            self._add(o)

    def _add(self, start: str) -> None:
        stack = [start]
        links: list[tuple[str, str]] = []
        while stack:
            nid = stack.pop()
            if nid in self.pending:
                continue
            self.pending[nid] = None
            self.blockers[nid] = set()
            self.blocking[nid] = set()
            for value in self.prompt[nid]["inputs"].values():
                if _is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], nid))
        for src, dst in links:
            if src in self.pending:
                self.blocking[src].add(dst)
                self.blockers[dst].add(src)

    def empty(self) -> bool:
        return not self.pending

    def _is_output(self, nid: str) -> bool:
        return NODE_CLASSES[self.prompt[nid]["class_type"]].output_node

    def pick(self) -> Optional[str]:
        ready = [n for n in self.pending if not self.blockers[n]]
        if not ready:
            return None  # a cycle
        for nid in ready:
            if self._is_output(nid):
                return nid
        for nid in ready:
            if any(self._is_output(b) for b in self.blocking[nid]):
                return nid
        for nid in ready:
            for b in self.blocking[nid]:
                if b in self.pending and any(self._is_output(b2) for b2 in self.blocking[b]):
                    return nid
        return ready[0]

    def complete(self, nid: str) -> None:
        del self.pending[nid]
        self.blockers.pop(nid, None)
        for b in self.blocking.pop(nid, set()):
            if b in self.blockers:
                self.blockers[b].discard(nid)


# ---------------------------------------------------------------------- websocket

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_WS_MESSAGE = 16 * 1024 * 1024


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        header = struct.pack("!BB", b0, n)
    elif n < 65536:
        header = struct.pack("!BBH", b0, 126, n)
    else:
        header = struct.pack("!BBQ", b0, 127, n)
    return header + payload


class _WsConn:
    """One websocket: frames go out through a queue drained by a writer thread."""

    def __init__(self, sock: socket.socket, sid: str) -> None:
        self.sock = sock
        self.sid = sid
        self.closed = False
        self.feature_flags: dict[str, Any] = {}
        self._out: queue.SimpleQueue[Optional[bytes]] = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name=f"comfyui-fake-ws-writer-{sid[:8]}", daemon=True)

    def send(self, frame: bytes) -> None:
        if not self.closed:
            self._out.put(frame)

    def finish(self) -> None:
        """No more frames: the writer sends what is queued, then ends."""
        self._out.put(None)

    def abort(self) -> None:
        """Close the TCP connection at once, without a close frame."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._out.put(None)

    def _write_loop(self) -> None:
        while True:
            frame = self._out.get()
            if frame is None:
                return
            try:
                self.sock.sendall(frame)
            except OSError:
                self.abort()
                return


# ------------------------------------------------------------------------ helpers


def _annotated_filepath(name: str) -> tuple[str, Optional[str]]:
    for kind in ("output", "input", "temp"):
        tag = f"[{kind}]"
        if name.endswith(tag):
            return name[: -len(tag) - 1], kind
    return name, None


def _parse_multipart(body: bytes, content_type: str) -> dict[str, Any]:
    """multipart/form-data -> {name: str | (filename, bytes)} (first value wins)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ValueError("multipart/form-data without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    fields: dict[str, Any] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip()] = value.strip()
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str) or name in fields:
            continue
        filename = headers.get_filename()
        if filename is not None:
            fields[name] = (filename, data)
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields


def _is_loopback(host: Optional[str]) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    # The real server resolves the name; the fake knows only localhost (no DNS in tests).
    return host == "localhost" or host.endswith(".localhost")


def _origin_forbidden(host: Optional[str], origin: Optional[str]) -> bool:
    """ComfyUI's origin-only middleware: a loopback Host with another Origin is refused."""
    if not host or not origin:
        return False
    host_domain: Optional[str] = host.lower()
    parsed = urlsplit(origin)
    origin_domain: Optional[str] = parsed.netloc.lower()
    host_parsed = urlsplit("//" + (host_domain or ""))
    try:
        origin_port, host_port = parsed.port, host_parsed.port
    except ValueError:
        return False
    loopback = _is_loopback(host_parsed.hostname)
    if origin_port is None:
        host_domain = host_parsed.hostname
    if host_port is None:
        origin_domain = parsed.hostname
    return bool(loopback and host_domain and origin_domain and host_domain != origin_domain)


def _describe(predicate: Callable[[], object]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


_Response = tuple[int, bytes, str, dict[str, str]]  # status, body, content type, headers


class _HTTPError(Exception):
    def __init__(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


# --------------------------------------------------------------------- the server


class FakeComfyUI:
    """A fake ComfyUI on ``host:port`` (a free port when 0). See the module docstring.

    Test hooks: ``fail_next_validation``, ``fail_next_execution``, ``drop_websockets``,
    ``hold``/``unhold``; records: ``submissions``, ``rejected``, ``interrupts``,
    ``deletes``, ``uploads`` and ``events`` (every websocket message the server
    emitted, as ``(client_id, type, data)``; ``client_id`` is ``"*"`` for a message
    broadcast to every socket; a message for a client that has no socket open is
    still recorded, though nobody receives it). The records and the hooks survive
    ``restart()``; queue, history and cache do not.

    Who gets what, as in ComfyUI: ``status`` (queue changes) and ``progress_state``
    go to every socket; ``execution_*``, ``executing`` and ``executed`` go only to
    the prompt's ``client_id`` (not sent at all without one), except
    ``execution_interrupted`` and ``progress``, which are broadcast when the prompt
    has no ``client_id``. A socket that connects with the ``clientId`` of the prompt
    running gets ``{"type": "executing", "data": {"node": <node>}}`` after its status.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        step_s: float = 0.01,
        steps: int = 4,
        root: Optional[os.PathLike[str] | str] = None,
    ) -> None:
        self.host = host
        self.port = port
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._step_s = float(step_s)
        self._steps = int(steps)
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="comfyui_fake_")
            root = self._tmp.name
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"
        for d in (self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.checkpoints: list[str] = list(DEFAULT_CHECKPOINTS)
        self.verbose = False
        # records (kept across restart)
        self.submissions: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.interrupts: list[dict[str, Any]] = []
        self.deletes: list[str] = []
        self.uploads: list[str] = []
        self.headers_seen: list[dict[str, str]] = []  # every HTTP request's headers, in order
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        # test hooks
        self._held = False
        self._fail_validation: Optional[tuple[str, str, str]] = None
        self._fail_execution: Optional[tuple[str, str]] = None
        # server plumbing
        self._httpd: Optional[_Server] = None
        self._serve_thread: Optional[threading.Thread] = None
        self._executor: Optional[threading.Thread] = None
        self._gen = 0
        self._version = 0  # bumped on every state change (wait_until wakes on it)
        self._stopping = False
        self._started = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._queue: list[list[Any]] = []
        self._running_item: Optional[list[Any]] = None
        self._history: dict[str, dict[str, Any]] = {}
        self._number = 0
        self._cache: dict[str, dict[str, Any]] = {}
        self._interrupt = False
        self._client_id: Optional[str] = None
        self._last_node_id: Optional[str] = None
        self._sockets: dict[str, _WsConn] = {}
        self._all_conns: set[_WsConn] = set()

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> FakeComfyUI:
        with self._cond:
            if self._started:
                return self
            self._reset_state()
            self._stopping = False
            self._gen += 1
            gen = self._gen
        httpd = _Server((self.host, self.port), _Handler, self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="comfyui-fake-http-server", daemon=True
        )
        self._executor = threading.Thread(target=self._executor_loop, args=(gen,), name="comfyui-fake-executor", daemon=True)
        with self._cond:
            self._started = True
        self._serve_thread.start()
        self._executor.start()
        return self

    def stop(self) -> None:
        with self._cond:
            if not self._started:
                return
            self._started = False
            self._stopping = True
            self._gen += 1
            conns = list(self._all_conns)
            self._sockets = {}
            self._changed()
        httpd = self._httpd
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for conn in conns:
            conn.abort()
        if httpd is not None:
            httpd.close_connections()
        deadline = time.monotonic() + 5.0
        threads = [self._executor, self._serve_thread, *(httpd.handler_threads() if httpd else [])]
        threads += [c.writer for c in conns]
        for t in threads:
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._httpd = None
        with self._cond:
            self._changed()

    def restart(self) -> None:
        """Stop, then listen again on the same port: queue, history and cache are lost."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeComfyUI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ knobs

    @property
    def step_s(self) -> float:
        return self._step_s

    @step_s.setter
    def step_s(self, value: float) -> None:
        with self._cond:
            self._step_s = float(value)
            self._changed()

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        with self._cond:
            self._steps = int(value)
            self._changed()

    def fail_next_validation(self, node_id: str, input_name: str, message: str = "Value not in list") -> None:
        """The next POST /prompt fails validation at ``node_id``/``input_name`` (400 with
        ``node_errors``, as every output depends on it, or when the node is not there)."""
        with self._cond:
            self._fail_validation = (str(node_id), input_name, message)
            self._changed()

    def fail_next_execution(self, node_id: str, message: str = "CUDA out of memory") -> None:
        """The next prompt that needs ``node_id`` runs it (never from the cache) and fails
        there with an ``execution_error`` (a torch.OutOfMemoryError when ``message`` says
        "out of memory", else a RuntimeError)."""
        with self._cond:
            self._fail_execution = (str(node_id), message)
            self._changed()

    def drop_websockets(self) -> None:
        """Abruptly close every open websocket (no close frame); executions go on."""
        with self._cond:
            conns = list(self._all_conns)
            self._sockets = {}
            self._all_conns = set()
            self._changed()
        for conn in conns:
            conn.abort()

    def hold(self) -> None:
        """Queued prompts are not started (they stay pending) until unhold()."""
        with self._cond:
            self._held = True
            self._changed()

    def unhold(self) -> None:
        with self._cond:
            self._held = False
            self._changed()

    # ------------------------------------------------------------ observation

    def wait_until(self, predicate: Callable[[], object], timeout: float = 10.0, *, what: Optional[str] = None) -> None:
        """Wait until ``predicate()`` holds, else raise TimeoutError naming what was awaited.

        The predicate is tried again after every state change (a websocket message
        emitted, the queue or history changed, an upload, ...). It runs without the
        server's lock held, so it may call this object or the server over HTTP.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                seen = self._version
            if predicate():
                return
            with self._cond:
                while self._version == seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        tail = [(c, t) for c, t, _ in self.events[-8:]]
                        raise TimeoutError(
                            f"timed out after {timeout}s waiting for {what or _describe(predicate)}"
                            f" (running={self.running()!r}, pending={self.pending()!r}, last events={tail})"
                        )
                    self._cond.wait(remaining)

    def running(self) -> Optional[str]:
        with self._lock:
            return None if self._running_item is None else str(self._running_item[1])

    def pending(self) -> list[str]:
        with self._lock:
            return [str(item[1]) for item in self._sorted_queue()]

    def history(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._history)

    def messages_for(self, client_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(type, data) of the messages emitted to ``client_id`` or broadcast, in order."""
        with self._lock:
            return [(t, d) for c, t, d in self.events if c in (client_id, "*")]

    def connected(self) -> list[str]:
        """The client ids with an open websocket."""
        with self._lock:
            return list(self._sockets)

    # ------------------------------------------------------------ internals

    def _changed(self) -> None:
        """Call with the lock held after any change a waiter may care about."""
        self._version += 1
        self._cond.notify_all()

    def _sorted_queue(self) -> list[list[Any]]:
        return sorted(self._queue, key=lambda item: (item[0], item[1]))

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._queue) + (1 if self._running_item is not None else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    def _emit(self, event: str, data: dict[str, Any], sid: Optional[str]) -> None:
        """Send one JSON message to ``sid`` (or to every socket); call with the lock held."""
        text = json.dumps({"type": event, "data": data})
        self.events.append((sid if sid is not None else "*", event, json.loads(text)["data"]))
        frame = _ws_frame(OP_TEXT, text.encode("utf-8"))
        if sid is None:
            targets = list(self._sockets.values())
        else:
            conn = self._sockets.get(sid)
            targets = [conn] if conn is not None else []
        for conn in targets:
            conn.send(frame)
        self._changed()

    def _queue_updated(self) -> None:
        self._emit("status", {"status": self._queue_info()}, None)

    def _dir_by_type(self, kind: Optional[str]) -> Optional[str]:
        return {"output": str(self.output_dir), "input": str(self.input_dir), "temp": str(self.temp_dir)}.get(kind or "")

    def _input_files(self) -> list[str]:
        try:
            return sorted(f for f in os.listdir(self.input_dir) if (self.input_dir / f).is_file())
        except FileNotFoundError:
            return []

    def _resolve_type(self, t: Any) -> Any:
        if t == _CHECKPOINTS:
            return list(self.checkpoints)
        if t == _INPUT_FILES:
            return self._input_files()
        return t

    def _input_types(self, cls: NodeClass) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for category, name, t, opts in cls.inputs:
            entry = [self._resolve_type(t), dict(opts)] if opts else [self._resolve_type(t)]
            out.setdefault(category, {})[name] = entry
        if cls.hidden:
            out["hidden"] = dict(cls.hidden)
        return out

    def _node_info(self, cls: NodeClass) -> dict[str, Any]:
        types = self._input_types(cls)
        return {
            "input": types,
            "input_order": {k: list(v.keys()) for k, v in types.items()},
            "output": list(cls.outputs),
            "output_is_list": [False] * len(cls.outputs),
            "output_name": list(cls.output_names or cls.outputs),
            "name": cls.name,
            "display_name": cls.display_name,
            "description": cls.description,
            "python_module": "nodes",
            "category": cls.category,
            "output_node": cls.output_node,
        }

    def _annotated_path(self, name: str, default_kind: str = "input") -> Optional[Path]:
        name, kind = _annotated_filepath(name)
        base = self._dir_by_type(kind or default_kind)
        if base is None or not name:
            return None
        path = os.path.abspath(os.path.join(base, name))
        if os.path.commonpath((base, path)) != base:
            return None
        return Path(path)

    # ------------------------------------------------------------ validation

    def _validate_prompt(self, prompt: Any, partial: Optional[list[str]]) -> tuple[bool, Any, list[str], dict[str, Any]]:
        outputs: list[str] = []
        for x in prompt:
            node = prompt[x]
            if not isinstance(node, dict) or "class_type" not in node:
                return (False, _error("invalid_prompt", "Cannot execute because a node is missing the class_type property.", f"Node ID '#{x}'"), [], {})
            class_type = node["class_type"]
            cls = NODE_CLASSES.get(class_type) if isinstance(class_type, str) else None
            if cls is None:
                return (False, _error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.", f"Node ID '#{x}'"), [], {})
            if cls.output_node and (partial is None or x in partial):
                outputs.append(x)
        if not outputs:
            return (False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {})

        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        injected, self._fail_validation = self._fail_validation, None
        if injected is not None:
            node_id, input_name, message = injected
            validated[node_id] = (False, [self._injected_error(prompt, node_id, input_name, message)])
            if node_id not in prompt:  # nothing depends on it: fail every output
                for o in outputs:
                    validated.setdefault(o, (False, []))

        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for o in outputs:
            try:
                ok, reasons = self._validate_node(prompt, o, validated)
            except Exception as ex:
                ok = False
                reasons = [_error("exception_during_validation", "Exception when validating node", str(ex), {
                    "exception_type": _full_type_name(type(ex)),
                    "traceback": traceback.format_tb(ex.__traceback__),
                })]
                validated[o] = (False, reasons)
            if ok:
                good.append(o)
                continue
            failed.append((o, reasons))
            for node_id, (valid, node_reasons) in validated.items():
                if not valid and node_reasons:
                    if node_id not in node_errors:
                        class_type = prompt[node_id]["class_type"] if node_id in prompt else None
                        node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [], "class_type": class_type}
                    node_errors[node_id]["dependent_outputs"].append(o)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
            return (False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], node_errors)
        return (True, None, good, node_errors)

    def _injected_error(self, prompt: Any, node_id: str, input_name: str, message: str) -> dict[str, Any]:
        node = prompt.get(node_id) if isinstance(prompt, dict) else None
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        value = inputs.get(input_name) if isinstance(inputs, dict) else None
        cls = NODE_CLASSES.get(node.get("class_type", "")) if isinstance(node, dict) else None
        config: Any = None
        if cls is not None:
            for _, name, t, opts in cls.inputs:
                if name == input_name:
                    config = [self._resolve_type(t), dict(opts)]
        type_ = _ERROR_TYPES.get(message, "custom_validation_failed")
        if type_ == "value_not_in_list":
            options = config[0] if config and isinstance(config[0], list) else []
            list_info = f"(list of length {len(options)})" if len(options) > 20 else str(options)
            if len(options) > 20:
                config = None
            return _error(type_, message, f"{input_name}: '{value}' not in {list_info}",
                          {"input_name": input_name, "input_config": config, "received_value": value})
        return _error(type_, message, f"{input_name}", {"input_name": input_name, "received_value": value})

    def _validate_node(self, prompt: dict[str, Any], nid: str, validated: dict[str, tuple[bool, list[dict[str, Any]]]]) -> tuple[bool, list[dict[str, Any]]]:
        if nid in validated:
            return validated[nid]
        node = prompt[nid]
        inputs = node["inputs"]
        cls = NODE_CLASSES[node["class_type"]]
        errors: list[dict[str, Any]] = []
        valid = True
        for category, name, raw_type, opts in cls.inputs:
            input_type = self._resolve_type(raw_type)
            info = [input_type, dict(opts)]
            if name not in inputs:
                if category == "required":
                    errors.append(_error("required_input_missing", "Required input is missing", name, {"input_name": name}))
                continue
            val = inputs[name]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                                         {"input_name": name, "input_config": info, "received_value": val}))
                    continue
                src = val[0]
                received = NODE_CLASSES[prompt[src]["class_type"]].outputs[val[1]]  # a missing node raises, as in ComfyUI
                if not _types_match(received, input_type):
                    errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                         f"{name}, received_type({received}) mismatch input_type({input_type})",
                                         {"input_name": name, "input_config": info, "received_type": received, "linked_node": val}))
                    continue
                try:
                    if not self._validate_node(prompt, src, validated)[0]:
                        valid = False
                except Exception as ex:
                    valid = False
                    validated[src] = (False, [_error("exception_during_inner_validation", "Exception when validating inner node", str(ex), {
                        "input_name": name, "input_config": info, "exception_message": str(ex),
                        "exception_type": _full_type_name(type(ex)),
                        "traceback": traceback.format_tb(ex.__traceback__), "linked_node": val,
                    })])
                continue
            try:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[name] = val
                if input_type == "INT":
                    val = int(val)
                elif input_type == "FLOAT":
                    val = float(val)
                elif input_type == "STRING":
                    val = str(val)
                elif input_type == "BOOLEAN":
                    val = bool(val)
                inputs[name] = val
            except Exception as ex:
                errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                                     f"{name}, {val}, {ex}", {"input_name": name, "input_config": info, "received_value": val, "exception_message": str(ex)}))
                continue
            if name in cls.custom_validated:
                continue
            if "min" in opts and val < opts["min"]:
                errors.append(_error("value_smaller_than_min", f"Value {val} smaller than min of {opts['min']}", name,
                                     {"input_name": name, "input_config": info, "received_value": val}))
                continue
            if "max" in opts and val > opts["max"]:
                errors.append(_error("value_bigger_than_max", f"Value {val} bigger than max of {opts['max']}", name,
                                     {"input_name": name, "input_config": info, "received_value": val}))
                continue
            if isinstance(input_type, list) and val not in input_type:
                config: Any = info
                if len(input_type) > 20:
                    list_info, config = f"(list of length {len(input_type)})", None
                else:
                    list_info = str(input_type)
                errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{val}' not in {list_info}",
                                     {"input_name": name, "input_config": config, "received_value": val}))
                continue
        if cls.name == "LoadImage" and "image" in inputs:
            image = inputs["image"]
            path = self._annotated_path(str(image))
            if path is None or not path.is_file():
                errors.append(_error("custom_validation_failed", "Custom validation failed for node",
                                     f"image - Invalid image file: {image}", {"input_name": "image"}))
        ret = (False, errors) if errors or not valid else (True, [])
        validated[nid] = ret
        return ret

    # ------------------------------------------------------------ execution

    @contextlib.contextmanager
    def _exec_lock(self, gen: int) -> Iterator[None]:
        with self._cond:
            if gen != self._gen or self._stopping:
                raise _Stopped()
            yield

    def _sleep(self, gen: int, interruptible: bool) -> bool:
        """One step of ``step_s`` (re-read when it changes); True when interrupted."""
        start = time.monotonic()
        with self._cond:
            while True:
                if gen != self._gen or self._stopping:
                    raise _Stopped()
                if interruptible and self._interrupt:
                    return True
                remaining = start + self._step_s - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def _executor_loop(self, gen: int) -> None:
        while True:
            with self._cond:
                while gen == self._gen and not self._stopping and (self._held or not self._queue):
                    self._cond.wait()
                if gen != self._gen or self._stopping:
                    return
                item = self._sorted_queue()[0]
                self._queue.remove(item)
                self._running_item = copy.deepcopy(item)
                self._queue_updated()
            try:
                self._execute(gen, item)
            except _Stopped:
                return
            except Exception:  # a bug in the fake: keep serving, record it as a failed prompt
                traceback.print_exc()
                with self._cond:
                    if gen != self._gen:
                        return
                    self._running_item = None
                    self._queue_updated()

    def _signatures(self, prompt: dict[str, Any]) -> dict[str, str]:
        memo: dict[str, str] = {}

        def sig(nid: str) -> str:
            if nid in memo:
                return memo[nid]
            node = prompt[nid]
            parts: list[Any] = [node["class_type"], self._is_changed(node)]
            for name in sorted(node["inputs"]):
                value = node["inputs"][name]
                if _is_link(value) and value[0] in prompt:
                    parts.append([name, "link", sig(value[0]), value[1]])
                else:
                    parts.append([name, value])
            memo[nid] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
            return memo[nid]

        for nid in prompt:
            sig(nid)
        return memo

    def _is_changed(self, node: dict[str, Any]) -> Any:
        if node["class_type"] != "LoadImage":
            return False
        path = self._annotated_path(str(node["inputs"].get("image", "")))
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest() if path else "nan"
        except OSError:
            return "nan"

    def _needed(self, prompt: dict[str, Any], outputs: list[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(outputs)
        while stack:
            nid = stack.pop()
            if nid in seen or nid not in prompt:
                continue
            seen.add(nid)
            stack += [v[0] for v in prompt[nid]["inputs"].values() if _is_link(v)]
        return seen

    def _progress_state(self, prompt_id: str, states: dict[str, dict[str, Any]]) -> None:
        nodes = {
            nid: {"value": s["value"], "max": s["max"], "state": s["state"], "node_id": nid, "prompt_id": prompt_id,
                  "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}
            for nid, s in states.items()
        }
        self._emit("progress_state", {"prompt_id": prompt_id, "nodes": nodes}, None)

    def _execute(self, gen: int, item: list[Any]) -> None:
        prompt_id: str = item[1]
        prompt: dict[str, Any] = item[2]
        extra_data: dict[str, Any] = item[3]
        outputs: list[str] = list(item[4])
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any], broadcast: bool = False) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            with self._exec_lock(gen):
                if self._client_id is not None or broadcast:
                    self._emit(event, data, self._client_id)

        with self._exec_lock(gen):
            self._interrupt = False
            self._client_id = extra_data.get("client_id")
        add_message("execution_start", {"prompt_id": prompt_id})

        sigs = self._signatures(prompt)
        needed = self._needed(prompt, outputs)
        with self._exec_lock(gen):
            fail = self._fail_execution
            if fail is not None and fail[0] in needed:
                self._fail_execution = None
                # the failing node and everything after it must run, not come from the cache
                for node in needed:
                    if node == fail[0] or fail[0] in self._needed(prompt, [node]):
                        self._cache.pop(sigs[node], None)
            else:
                fail = None
            live = set(sigs.values())
            self._cache = {s: e for s, e in self._cache.items() if s in live}
            cached_nodes = [node for node in prompt if sigs[node] in self._cache]
            cached_at_start = set(cached_nodes)
        add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id})

        client = self._client_id
        states: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        plan = _ExecutionList(prompt, outputs, lambda n: n in cached_at_start)
        success = True
        while not plan.empty():
            nid = plan.pick()
            if nid is None:
                blamed = next(iter(plan.pending))
                add_message("execution_error", {
                    "prompt_id": prompt_id, "node_id": blamed, "node_type": prompt[blamed]["class_type"],
                    "executed": list(executed), "exception_message": "Dependency cycle detected",
                    "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": [],
                    "current_outputs": list(prompt),
                })
                success = False
                break
            class_type = prompt[nid]["class_type"]
            with self._exec_lock(gen):
                entry = self._cache.get(sigs[nid])
                if entry is not None:
                    if client is not None:
                        self._emit("executed", {"node": nid, "display_node": nid, "output": entry["ui"], "prompt_id": prompt_id}, client)
                    states[nid] = {"state": "finished", "value": 1.0, "max": 1.0}
                    self._progress_state(prompt_id, states)
                    plan.complete(nid)
                    continue
                states[nid] = {"state": "running", "value": 0.0, "max": 1.0}
                self._progress_state(prompt_id, states)
                if client is not None:
                    self._last_node_id = nid
                    self._emit("executing", {"node": nid, "display_node": nid, "prompt_id": prompt_id}, client)
                values: dict[str, Any] = {}
                for name, value in prompt[nid]["inputs"].items():
                    if _is_link(value):
                        src = self._cache.get(sigs.get(value[0], ""))
                        slot = int(value[1])
                        values[name] = src["outputs"][slot] if src and slot < len(src["outputs"]) else None
                    else:
                        values[name] = value
            try:
                with self._exec_lock(gen):
                    if self._interrupt:
                        self._interrupt = False
                        raise _Interrupted()
                if fail is not None and fail[0] == nid:
                    message = fail[1]
                    if "out of memory" in message.lower():
                        raise OutOfMemoryError(message)
                    raise RuntimeError(message)
                outs, ui = self._run_node(gen, prompt_id, nid, prompt, extra_data, values, sigs[nid], states)
            except _Stopped:
                raise
            except _Interrupted:
                add_message("execution_interrupted", {
                    "prompt_id": prompt_id, "node_id": nid, "node_type": class_type, "executed": list(executed),
                }, broadcast=True)
                success = False
                break
            except Exception as ex:
                tips = _OOM_TIPS if isinstance(ex, OutOfMemoryError) else ""
                current_inputs = {name: [_format_value(v)] for name, v in values.items()}
                for hidden_name, _ in NODE_CLASSES[class_type].hidden:
                    source = prompt if hidden_name == "prompt" else extra_data.get("extra_pnginfo")
                    current_inputs[hidden_name] = [_format_value(source)]
                add_message("execution_error", {
                    "prompt_id": prompt_id, "node_id": nid, "node_type": class_type, "executed": list(executed),
                    "exception_message": f"{ex}\n{tips}", "exception_type": _full_type_name(type(ex)),
                    "traceback": traceback.format_tb(ex.__traceback__), "current_inputs": current_inputs,
                    "current_outputs": list(prompt),
                })
                success = False
                break
            with self._exec_lock(gen):
                self._cache[sigs[nid]] = {"outputs": outs, "ui": ui}
                if ui and client is not None:
                    self._emit("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": prompt_id}, client)
                state = states[nid]
                state["state"], state["value"] = "finished", state["max"]
                self._progress_state(prompt_id, states)
            executed.append(nid)
            plan.complete(nid)
        if success:
            add_message("execution_success", {"prompt_id": prompt_id})

        with self._exec_lock(gen):
            ui_outputs: dict[str, Any] = {}
            meta: dict[str, Any] = {}
            for nid in prompt:
                entry = self._cache.get(sigs[nid])
                if entry is not None and entry["ui"]:
                    ui_outputs[nid] = copy.deepcopy(entry["ui"])
                    meta[nid] = {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
            self._last_node_id = None
            running = self._running_item if self._running_item is not None else item
            for key in SENSITIVE_EXTRA_DATA_KEYS:
                running[3].pop(key, None)
            if len(self._history) > MAXIMUM_HISTORY_SIZE:
                self._history.pop(next(iter(self._history)))
            self._history[prompt_id] = {
                "prompt": running,
                "outputs": ui_outputs,
                "status": {"status_str": "success" if success else "error", "completed": success, "messages": messages},
                "meta": meta,
            }
            self._running_item = None
            self._queue_updated()
            if client is not None:
                self._emit("executing", {"node": None, "prompt_id": prompt_id}, client)

    def _run_node(
        self, gen: int, prompt_id: str, nid: str, prompt: dict[str, Any], extra_data: dict[str, Any],
        values: dict[str, Any], sig: str, states: dict[str, dict[str, Any]],
    ) -> tuple[tuple[Any, ...], Optional[dict[str, Any]]]:
        class_type = prompt[nid]["class_type"]
        cls = NODE_CLASSES[class_type]

        def batch_of(name: str) -> int:
            v = values.get(name)
            return v.batch if isinstance(v, _FakeValue) else 1

        batch = 1
        if class_type == "EmptyLatentImage":
            batch = int(values.get("batch_size", 1))
        elif class_type in ("KSampler", "KSamplerAdvanced"):
            batch = batch_of("latent_image")
        elif class_type == "VAEDecode":
            batch = batch_of("samples")
        elif class_type in ("VAEEncode",):
            batch = batch_of("pixels")
        elif class_type == "ImageScale":
            batch = batch_of("image")

        if cls.sampler:
            total = int(values.get("steps", 1))
            if class_type == "KSamplerAdvanced":
                total = max(1, min(total, int(values.get("end_at_step", total))) - int(values.get("start_at_step", 0)))
            total = max(1, min(total, self._steps))
            for step in range(1, total + 1):
                if self._sleep(gen, interruptible=True):
                    with self._exec_lock(gen):
                        self._interrupt = False
                    raise _Interrupted()
                with self._exec_lock(gen):
                    states[nid].update(value=float(step), max=float(total))
                    self._progress_state(prompt_id, states)
                    self._emit("progress", {"value": step, "max": total, "prompt_id": prompt_id, "node": nid}, self._client_id)
        else:
            self._sleep(gen, interruptible=False)

        if class_type == "LoadImage":
            path = self._annotated_path(str(values.get("image", "")))
            if path is None or not path.is_file():
                raise FileNotFoundError(f"[Errno 2] No such file or directory: '{values.get('image')}'")
        if cls.output_node:
            return (), {"images": self._save_images(nid, prompt, extra_data, values, batch_of("images"))}
        outs = tuple(_FakeValue(t, f"{sig}:{i}", nid, batch) for i, t in enumerate(cls.outputs))
        return outs, None

    def _save_images(self, nid: str, prompt: dict[str, Any], extra_data: dict[str, Any], values: dict[str, Any], batch: int) -> list[dict[str, str]]:
        if prompt[nid]["class_type"] == "PreviewImage":
            base, kind = str(self.temp_dir), "temp"
            prefix = "ComfyUI_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        else:
            base, kind = str(self.output_dir), "output"
            prefix = str(values.get("filename_prefix", "ComfyUI"))
        subfolder = os.path.dirname(os.path.normpath(prefix))
        filename = os.path.basename(os.path.normpath(prefix))
        folder = os.path.join(base, subfolder)
        if os.path.commonpath((base, os.path.abspath(folder))) != base:
            raise Exception(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {base}"
            )
        os.makedirs(folder, exist_ok=True)
        counter = 1
        for existing in os.listdir(folder):
            head = existing[: len(filename) + 1]
            if os.path.normcase(head[:-1]) == os.path.normcase(filename) and head[-1:] == "_":
                try:
                    counter = max(counter, int(existing[len(filename) + 1:].split("_")[0]) + 1)
                except ValueError:
                    pass
        source = values.get("images")
        seed = source.sig if isinstance(source, _FakeValue) else nid
        text = {"prompt": json.dumps(prompt)}
        pnginfo = extra_data.get("extra_pnginfo")
        if isinstance(pnginfo, dict):
            text.update({k: json.dumps(v) for k, v in pnginfo.items()})
        results = []
        for batch_number in range(max(1, batch)):
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            data = png_bytes(IMAGE_SIZE, IMAGE_SIZE, f"{seed}:{batch_number}".encode(), text)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            results.append({"filename": name, "subfolder": subfolder, "type": kind})
            counter += 1
        return results

    # ------------------------------------------------------------ HTTP routes

    def handle_http(self, h: _Handler, method: str, path: str, query: dict[str, str]) -> _Response:
        """Route one request: (status, body, content type, extra headers)."""
        with self._lock:
            self.headers_seen.append({k: v for k, v in h.headers.items()})
        if path.startswith("/api/"):
            path = path[4:]
        if method == "OPTIONS":
            return 200, b"", "application/octet-stream", {}
        routes: dict[tuple[str, str], Callable[[], _Response]] = {
            ("GET", "/"): lambda: (200, b"<html><body>fake ComfyUI</body></html>", "text/html", {}),
            ("GET", "/prompt"): lambda: self._json(self._locked(self._queue_info)),
            ("POST", "/prompt"): lambda: self._post_prompt(h),
            ("GET", "/queue"): self._get_queue,
            ("POST", "/queue"): lambda: self._post_queue(h),
            ("POST", "/interrupt"): lambda: self._post_interrupt(h),
            ("POST", "/free"): lambda: self._post_free(h),
            ("GET", "/history"): lambda: self._get_history(query),
            ("POST", "/history"): lambda: self._post_history(h),
            ("GET", "/view"): lambda: self._view(query),
            ("POST", "/upload/image"): lambda: self._upload(h),
            ("GET", "/system_stats"): lambda: self._json(self._system_stats()),
            ("GET", "/object_info"): lambda: self._json({n: self._node_info(c) for n, c in NODE_CLASSES.items()}),
            ("GET", "/features"): lambda: self._json(self._features()),
            ("GET", "/embeddings"): lambda: self._json([]),
            ("GET", "/models"): lambda: self._json(["checkpoints", "loras", "vae", "embeddings"]),
        }
        handler = routes.get((method, path))
        if handler is not None:
            return handler()
        if method == "GET" and path.startswith("/history/"):
            return self._json(self._get_history_item(path[len("/history/"):]))
        if method == "GET" and path.startswith("/object_info/"):
            name = path[len("/object_info/"):]
            return self._json({name: self._node_info(NODE_CLASSES[name])} if name in NODE_CLASSES else {})
        if method == "GET" and path.startswith("/models/"):
            folder = path[len("/models/"):]
            files = {"checkpoints": list(self.checkpoints), "loras": [], "vae": [], "embeddings": []}
            if folder not in files:
                return 404, b"404: Not Found", "text/plain; charset=utf-8", {}
            return self._json(files[folder])
        if any(p == path for _, p in routes) or path.startswith(("/history/", "/object_info/", "/models/")):
            return 405, b"405: Method Not Allowed", "text/plain; charset=utf-8", {}
        return 404, b"404: Not Found", "text/plain; charset=utf-8", {}

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            return fn()

    @staticmethod
    def _json(data: Any, status: int = 200) -> _Response:
        return status, json.dumps(data).encode("utf-8"), "application/json; charset=utf-8", {}

    @staticmethod
    def _empty(status: int = 200) -> _Response:
        return status, b"", "application/octet-stream", {}

    def _features(self) -> dict[str, Any]:
        return {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}

    def _system_stats(self) -> dict[str, Any]:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            ram_total = page * os.sysconf("SC_PHYS_PAGES")
            ram_free = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram_total = ram_free = 0
        vram = 8 * 1024 ** 3
        return {
            "system": {
                "os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                "comfyui_version": COMFYUI_VERSION, "required_frontend_version": "1.26.13",
                "python_version": sys.version, "pytorch_version": "2.8.0+fake",
                "embedded_python": False, "argv": ["main.py", "--port", str(self.port)],
            },
            "devices": [{
                "name": "cuda:0 Fake GPU : cudaMallocAsync", "type": "cuda", "index": 0,
                "vram_total": vram, "vram_free": vram // 2, "torch_vram_total": vram // 4, "torch_vram_free": vram // 8,
            }],
        }

    def _post_prompt(self, h: _Handler) -> _Response:
        json_data = h.read_json()
        if not isinstance(json_data, dict):
            raise _HTTPError(500, b"500 Internal Server Error\n\nServer got itself in trouble")
        with self._cond:
            if "number" in json_data:
                number: Any = float(json_data["number"])
            else:
                number = self._number
                if json_data.get("front"):
                    number = -number
                self._number += 1
            if "prompt" not in json_data:
                response: dict[str, Any] = {"error": _error("no_prompt", "No prompt provided", "No prompt provided"), "node_errors": {}}
                self.rejected.append({"request": copy.deepcopy(json_data), "response": response})
                self._changed()
                return self._json(response, 400)
            prompt = json_data["prompt"]
            prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
            partial = json_data.get("partial_execution_targets")
            ok, error, outputs, node_errors = self._validate_prompt(prompt, partial)
            extra_data = json_data.get("extra_data", {})
            if "client_id" in json_data:
                extra_data["client_id"] = json_data["client_id"]
            if not ok:
                response = {"error": error, "node_errors": node_errors}
                self.rejected.append({"request": copy.deepcopy(json_data), "response": copy.deepcopy(response)})
                self._changed()
                return self._json(response, 400)
            self.submissions.append({
                "prompt_id": prompt_id, "number": number, "prompt": copy.deepcopy(prompt),
                "client_id": json_data.get("client_id"), "extra_data": copy.deepcopy(extra_data),
            })
            queued_extra = {k: v for k, v in extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
            self._queue.append([number, prompt_id, prompt, queued_extra, outputs])
            self._queue_updated()
            return self._json({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def _post_free(self, h: _Handler) -> _Response:
        h.read_json()  # unload_models / free_memory: nothing to free in the fake
        return self._empty()

    def _get_queue(self) -> _Response:
        with self._lock:
            running = [self._running_item[:5]] if self._running_item is not None else []
            return self._json({"queue_running": running, "queue_pending": [i[:5] for i in self._sorted_queue()]})

    def _post_queue(self, h: _Handler) -> _Response:
        json_data = h.read_json()
        with self._cond:
            if json_data.get("clear"):
                self._queue = []
                self._queue_updated()
            for id_to_delete in json_data.get("delete", []):
                self.deletes.append(id_to_delete)
                for item in self._sorted_queue():
                    if item[1] == id_to_delete:
                        self._queue.remove(item)
                        self._queue_updated()
                        break
            self._changed()
        return self._empty()

    def _post_interrupt(self, h: _Handler) -> _Response:
        try:
            json_data = h.read_json()
        except ValueError:
            json_data = {}
        if not isinstance(json_data, dict):
            json_data = {}
        with self._cond:
            self.interrupts.append(copy.deepcopy(json_data))
            prompt_id = json_data.get("prompt_id")
            if not prompt_id or (self._running_item is not None and self._running_item[1] == prompt_id):
                self._interrupt = True
            self._changed()
        return self._empty()

    def _get_history(self, query: dict[str, str]) -> _Response:
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query["offset"]) if "offset" in query else -1
        with self._lock:
            if offset < 0 and max_items is not None:
                offset = len(self._history) - max_items
            out: dict[str, Any] = {}
            for i, key in enumerate(self._history):
                if i >= offset:
                    out[key] = self._history[key]
                    if max_items is not None and len(out) >= max_items:
                        break
            return self._json(out)

    def _get_history_item(self, prompt_id: str) -> dict[str, Any]:
        with self._lock:
            return {prompt_id: copy.deepcopy(self._history[prompt_id])} if prompt_id in self._history else {}

    def _post_history(self, h: _Handler) -> _Response:
        json_data = h.read_json()
        with self._cond:
            if json_data.get("clear"):
                self._history = {}
            for id_to_delete in json_data.get("delete", []):
                self._history.pop(id_to_delete, None)
            self._changed()
        return self._empty()

    def _view(self, query: dict[str, str]) -> _Response:
        if "filename" not in query:
            return 404, b"404: Not Found", "text/plain; charset=utf-8", {}
        filename, kind = _annotated_filepath(query["filename"])
        if not filename:
            return self._empty(400)
        if filename[0] == "/" or ".." in filename:
            return self._empty(400)
        output_dir = self._dir_by_type(kind or query.get("type", "output"))
        if output_dir is None:
            return self._empty(400)
        if "subfolder" in query:
            full = os.path.join(output_dir, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full), output_dir)) != output_dir:
                return self._empty(403)
            output_dir = full
        filename = os.path.basename(filename)
        file = os.path.join(output_dir, filename)
        if not os.path.isfile(file):
            return 404, b"404: Not Found", "text/plain; charset=utf-8", {}
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
            content_type = "application/octet-stream"
        with open(file, "rb") as f:
            body = f.read()
        return 200, body, content_type, {"Content-Disposition": f'filename="{filename}"'}

    def _upload(self, h: _Handler) -> _Response:
        content_type = h.headers.get("Content-Type", "")
        body = h.read_body()
        if not content_type.lower().startswith("multipart/form-data"):
            return self._empty(400)
        try:
            post = _parse_multipart(body, content_type)
        except ValueError:
            return self._empty(400)
        image = post.get("image")
        kind = post.get("type")
        upload_dir = self._dir_by_type(kind if isinstance(kind, str) else "input")
        if upload_dir is None:  # ComfyUI fails on an unknown type
            raise _HTTPError(500, b"500 Internal Server Error\n\nServer got itself in trouble")
        upload_type = kind if isinstance(kind, str) else "input"
        if not isinstance(image, tuple):
            return self._empty(400)
        filename, data = image
        if not filename:
            return self._empty(400)
        subfolder = post.get("subfolder", "")
        subfolder = subfolder if isinstance(subfolder, str) else ""
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return self._empty(400)
        with self._cond:
            os.makedirs(folder, exist_ok=True)
            overwrite = post.get("overwrite")
            duplicate = False
            if overwrite not in ("true", "1"):
                stem, ext = os.path.splitext(filename)
                i = 1
                while os.path.exists(filepath):
                    with open(filepath, "rb") as f:
                        if hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest():
                            duplicate = True
                            break
                    filename = f"{stem} ({i}){ext}"
                    filepath = os.path.join(folder, filename)
                    i += 1
            if not duplicate:
                with open(filepath, "wb") as f:
                    f.write(data)
            self.uploads.append(filename)
            self._changed()
        return self._json({"name": filename, "subfolder": subfolder, "type": upload_type})

    # ------------------------------------------------------------ websocket

    def handle_ws(self, h: _Handler, query: dict[str, str]) -> None:
        key = h.headers.get("Sec-WebSocket-Key")
        upgrade = h.headers.get("Upgrade", "").lower()
        connection = h.headers.get("Connection", "").lower()
        if not key or upgrade != "websocket" or "upgrade" not in connection:
            h.respond(400, b"400: Bad Request", "text/plain; charset=utf-8")
            return
        accept = base64.b64encode(hashlib.sha1((key.strip() + WS_GUID).encode()).digest()).decode()
        h.wfile.write(
            (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
             f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode()
        )
        h.wfile.flush()
        h.close_connection = True
        sid = query.get("clientId", "") or uuid.uuid4().hex
        conn = _WsConn(h.connection, sid)
        conn.writer.start()
        with self._cond:
            if self._stopping:
                conn.abort()
                return
            self._sockets.pop(sid, None)
            self._sockets[sid] = conn
            self._all_conns.add(conn)
            self._emit("status", {"status": self._queue_info(), "sid": sid}, sid)
            if self._client_id == sid and self._last_node_id is not None:
                self._emit("executing", {"node": self._last_node_id}, sid)
        try:
            self._ws_read_loop(h, conn)
        finally:
            with self._cond:
                if self._sockets.get(sid) is conn:
                    del self._sockets[sid]
                self._all_conns.discard(conn)
                self._changed()
            conn.finish()
            conn.writer.join(2.0)

    def _ws_read_loop(self, h: _Handler, conn: _WsConn) -> None:
        rfile = h.rfile
        message = bytearray()
        message_op: Optional[int] = None
        first_message = True

        def read(n: int) -> bytes:
            data = rfile.read(n) if n else b""
            if len(data) < n:
                raise EOFError
            return data

        try:
            while not conn.closed:
                b0, b1 = read(2)
                fin, opcode = b0 & 0x80, b0 & 0x0F
                masked, length = b1 & 0x80, b1 & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", read(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", read(8))
                if length > MAX_WS_MESSAGE:
                    conn.send(_ws_frame(OP_CLOSE, struct.pack("!H", 1009)))
                    return
                mask = read(4) if masked else b""
                payload = read(length)
                if masked:
                    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                if opcode == OP_CLOSE:
                    conn.send(_ws_frame(OP_CLOSE, payload[:2]))
                    return
                if opcode == OP_PING:
                    conn.send(_ws_frame(OP_PONG, payload))
                    continue
                if opcode == OP_PONG:
                    continue
                if opcode in (OP_TEXT, OP_BINARY):
                    message = bytearray(payload)
                    message_op = opcode
                elif opcode == OP_CONT and message_op is not None:
                    message += payload
                else:
                    continue
                if len(message) > MAX_WS_MESSAGE:
                    conn.send(_ws_frame(OP_CLOSE, struct.pack("!H", 1009)))
                    return
                if not fin:
                    continue
                if message_op == OP_TEXT:
                    try:
                        data = json.loads(bytes(message).decode("utf-8"))
                    except (ValueError, UnicodeDecodeError):
                        data = None
                    if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                        with self._cond:
                            conn.feature_flags = data.get("data", {}) or {}
                            if self._sockets.get(conn.sid) is conn:
                                self._emit("feature_flags", self._features(), conn.sid)
                    first_message = False
                message_op = None
        except (EOFError, OSError, ValueError):
            return


# ------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeComfyUI) -> None:
        self.fake = fake
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self._serve_one, args=(request, client_address), name="comfyui-fake-http", daemon=True)
        with self._conn_lock:
            self._conns.add(request)
            self._handler_threads.add(t)
        t.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            if self.fake.verbose:
                traceback.print_exc()
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._conns.discard(request)
                self._handler_threads.discard(threading.current_thread())

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def handler_threads(self) -> list[threading.Thread]:
        with self._conn_lock:
            return list(self._handler_threads)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Python/3.11"
    sys_version = "aiohttp/3.11.18"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            sys.stderr.write("comfyui_fake: " + (format % args) + "\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    _body: Optional[bytes] = None

    def read_body(self) -> bytes:
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self._body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD_SIZE:
                raise _HTTPError(413, b"413: Request Entity Too Large")
            self._body = self.rfile.read(length) if length else b""
        return self._body

    def read_json(self) -> Any:
        """The body as JSON; a bad body is a 500, as aiohttp's request.json() raising is."""
        body = self.read_body()
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as ex:
            raise ValueError("bad JSON body") from ex

    def respond(self, status: int, body: bytes, content_type: str, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        self._body = None
        fake = self.server.fake
        split = urlsplit(self.path)
        path = unquote(split.path)
        query: dict[str, str] = {}
        for k, v in parse_qsl(split.query, keep_blank_values=True):
            query.setdefault(k, v)
        if _origin_forbidden(self.headers.get("Host"), self.headers.get("Origin")):
            self.respond(403, b"", "application/octet-stream")
            return
        if method == "GET" and path in ("/ws", "/api/ws"):
            fake.handle_ws(self, query)
            return
        try:
            status, body, content_type, headers = fake.handle_http(self, method, path, query)
        except _HTTPError as ex:
            status, body, content_type, headers = ex.status, ex.body, ex.content_type, {}
        except Exception:
            if fake.verbose:
                traceback.print_exc()
            status, body, content_type, headers = (
                500, b"500 Internal Server Error\n\nServer got itself in trouble", "text/plain; charset=utf-8", {})
        if status >= 400:
            try:
                self.read_body()  # drain, so the connection stays usable
            except Exception:
                self.close_connection = True
        self.respond(status, body, content_type, headers)


# ------------------------------------------------------------------------------ CLI


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="A fake ComfyUI server (standard library only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188, help="0 picks a free port")
    parser.add_argument("--step-s", type=float, default=0.05, help="seconds per node / sampler step")
    parser.add_argument("--steps", type=int, default=8, help="the most sampler steps a prompt runs")
    parser.add_argument("--root", default=None, help="folder for input/ output/ temp/ (a temp dir if unset)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    fake = FakeComfyUI(args.host, args.port, step_s=args.step_s, steps=args.steps, root=args.root)
    fake.verbose = args.verbose
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fake.start()
    print(f"listening on {fake.url}", flush=True)
    print(f"output folder {fake.output_dir}, input folder {fake.input_dir}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
