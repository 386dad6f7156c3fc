"""The built-in ``comfyui.prompt`` kind: run a ComfyUI workflow on a ComfyUI server.

It speaks ComfyUI's own protocol (its ``server.py`` and ``execution.py``):
``POST /prompt`` with a ``client_id``, the websocket ``/ws?clientId=`` for
``executing``, ``progress``, ``executed``, ``execution_cached``,
``execution_success``, ``execution_error`` and ``execution_interrupted``,
``/history/{prompt_id}`` for the outcome, ``/view`` for the images,
``/upload/image`` for input images, ``POST /queue {"delete": [...]}`` and
``POST /interrupt`` for cancel.

What a generation costs is paid once:

* the prompt id is chosen here and checkpointed *before* ``POST /prompt``
  (ComfyUI takes a client's ``prompt_id``), and checkpointed again with the
  server's answer. After a Blender crash the resumed job looks the prompt up in
  ``/queue`` and ``/history``: it waits for it if it still runs, downloads its
  outputs if it is done, and submits again only if the server never saw it.
  A server that forgot the prompt (it restarted) fails the job, saying so: it
  is never submitted twice behind the user's back.
* Blender closing (engine shutdown) leaves the prompt running on the server;
  the job resumes from its checkpoint at the next start. Cancel removes a
  queued prompt (``POST /queue`` delete) or interrupts a running one (only if
  ``/queue`` says the running prompt is ours).

Progress is nodes done out of nodes to run (cached nodes do not count), refined
by the running node's ``progress`` value/max; the stage names the node (its
title and class type). When the websocket drops, the job polls
``/history/{prompt_id}`` and reconnects with the same client id.

Secrets never enter params, the sidecar or a .blend: a bearer token comes from
the add-on preferences (``set_default_token``, held in memory) or from the
environment variable a job names in ``token_env``.

Files from elsewhere are hostile: a workflow file is read once, at submit, as a
regular file of at most 8 MB, and its graph is kept in the params, so what runs
is exactly what was shown; input files must be images of bounded size; outputs
are written only inside the job's own folder, under sanitised names, atomically.

Importing this module registers the kind. Never imports ``bpy``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import random
import re
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine import JobCancelled, JobContext, KindRegistry, KindSpec
from ..engine import registry as shared_registry

KIND = "comfyui.prompt"
DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_WORKFLOW = Path(__file__).with_name("workflows") / "txt2img.json"
IMG2IMG_WORKFLOW = DEFAULT_WORKFLOW.with_name("img2img.json")  # LoadImage -> VAEEncode -> KSampler
MAX_WORKFLOW_BYTES = 8 * 1024 * 1024
MAX_NODES = 5000
MAX_INPUT_BYTES = 256 * 1024 * 1024
MAX_OUTPUT_BYTES = 1024 * 1024 * 1024
MAX_OUTPUT_FILES = 1000
MAX_JSON_BYTES = 64 * 1024 * 1024
INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".exr", ".gif")
# Node classes whose ``text`` input is the prompt and whose ``seed``/``noise_seed``
# input is the seed, found automatically for the Generate panel and tq.generate.
SEED_INPUTS = ("seed", "noise_seed")
OUTPUT_KEYS = ("images", "gifs", "videos", "audio", "files")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")

_default_token: Optional[str] = None
# Set by the Blender layer: loads downloaded images as datablocks (run on the main
# thread through ctx.call_on_main) and returns their names.
image_loader: Optional[Callable[[list[str]], list[str]]] = None


class ComfyUIError(RuntimeError):
    """The ComfyUI server refused or failed the prompt; the message names the node."""


class ServerUnreachable(ComfyUIError):
    """The server did not answer (connection refused, timeout, 5xx)."""


def set_default_token(token: Optional[str]) -> None:
    """The bearer token for servers that need one (the add-on preference); kept in
    memory only, never written anywhere. None or "" for none."""
    global _default_token
    _default_token = token or None


# --- params ------------------------------------------------------------------


def normalise_server(url: str) -> str:
    """``url`` as ``scheme://host[:port][/path]`` without a trailing slash, or
    ``ValueError`` naming what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a server must be a URL like 'http://127.0.0.1:8188'")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"server {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"server {url!r} names no host")
    if parts.username or parts.password:
        raise ValueError(
            f"server {parts.hostname!r}: put no user or password in the URL (it would be "
            "stored with the job); use the preferences' token or token_env"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"server {url!r} must not have a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"server {url!r} has a bad port") from None
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def is_loopback(url: str) -> bool:
    """Whether ``url`` is on this machine (no Online Access needed). Names are not
    resolved: only ``localhost`` and loopback addresses count."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_workflow_file(path: Union[str, Path]) -> dict:
    """An API-format workflow from ``path``: a regular file of at most 8 MB, opened
    without blocking (a FIFO is refused, not waited on)."""
    p = Path(os.path.expanduser(str(path)))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(p, flags)
    except OSError as exc:
        raise ValueError(f"cannot open workflow file {str(p)!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"workflow file {str(p)!r} is not a regular file")
        if st.st_size > MAX_WORKFLOW_BYTES:
            raise ValueError(
                f"workflow file {str(p)!r} is {st.st_size} bytes; at most {MAX_WORKFLOW_BYTES}"
            )
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            raw = fh.read(MAX_WORKFLOW_BYTES + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"workflow file {str(p)!r} is not JSON: {exc}") from None
    return check_workflow(data, source=str(p))


def check_workflow(data: Any, source: str = "workflow") -> dict:
    """``data`` if it is an API-format ComfyUI graph, else ``ValueError`` naming the
    first problem (a UI-format file gets told how to export the API format)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a JSON object of nodes, got {type(data).__name__}")
    if "nodes" in data and "links" in data:
        raise ValueError(
            f"{source} is a UI-format workflow; in ComfyUI use Workflow > Export (API) "
            "and pick that file"
        )
    if not data:
        raise ValueError(f"{source} has no nodes")
    if len(data) > MAX_NODES:
        raise ValueError(f"{source} has {len(data)} nodes; at most {MAX_NODES}")
    for node_id, node in data.items():
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
            raise ValueError(f"{source}: node id {node_id!r} must be a short string")
        if not isinstance(node, dict):
            raise ValueError(f"{source}: node {node_id} must be an object")
        cls = node.get("class_type")
        if not isinstance(cls, str) or not cls:
            raise ValueError(f"{source}: node {node_id} has no class_type")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise ValueError(f"{source}: node {node_id} ({cls}) inputs must be an object")
        for name, value in inputs.items():
            if _is_link(value) and value[0] not in data:
                raise ValueError(
                    f"{source}: node {node_id} ({cls}) input {name!r} links to node "
                    f"{value[0]!r}, which is not in the workflow"
                )
    return data


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def split_path(path: str) -> tuple[str, str]:
    """``"3.inputs.seed"`` -> ``("3", "seed")``, or ``ValueError``."""
    if not isinstance(path, str) or ".inputs." not in path:
        raise ValueError(f"override {path!r} must look like '<node id>.inputs.<input name>'")
    node_id, _, name = path.partition(".inputs.")
    if not node_id or not name:
        raise ValueError(f"override {path!r} must look like '<node id>.inputs.<input name>'")
    return node_id, name


def check_path(workflow: dict, path: str, what: str = "override") -> tuple[str, str]:
    node_id, name = split_path(path)
    node = workflow.get(node_id)
    if node is None:
        known = ", ".join(sorted(workflow, key=_node_order)[:20])
        raise ValueError(f"{what} {path!r}: no node {node_id!r} in the workflow (nodes: {known})")
    inputs = node.get("inputs", {})
    if name not in inputs:
        known = ", ".join(sorted(inputs)) or "none"
        raise ValueError(
            f"{what} {path!r}: node {node_id} ({node['class_type']}) has no input {name!r} "
            f"(inputs: {known})"
        )
    return node_id, name


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


class ComfyParams(BaseModel):
    """Params of ``comfyui.prompt``."""

    model_config = ConfigDict(extra="forbid")

    server: Union[str, list[str]] = Field(
        DEFAULT_SERVER, description="ComfyUI server URL, or several: the job runs on a free one"
    )
    workflow: Optional[dict[str, Any]] = Field(None, description="API-format workflow graph")
    workflow_file: Optional[str] = Field(
        None, description="API-format workflow JSON, read once at submit into 'workflow'"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="e.g. {'3.inputs.seed': 42, '6.inputs.text': 'a castle'}"
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="local image files uploaded first, e.g. {'10.inputs.image': '/tmp/render.png'}",
    )
    input_from: Optional[str] = Field(
        None,
        description="an image input, e.g. '10.inputs.image', filled with the first image file "
                    "among the results of the jobs this one depends on (a render, an earlier "
                    "generation): a pipeline step",
    )
    input_index: int = Field(
        0, ge=0, le=100_000,
        description="with input_from: which of those image files (0: the first; a render of "
                    "frames 1-24 makes 24, one per frame)",
    )
    outputs: Optional[list[str]] = Field(None, description="output node ids to download; all if None")
    token_env: Optional[str] = Field(None, description="environment variable holding a bearer token")
    load_images: bool = Field(True, description="in Blender, load the images as datablocks")
    poll_s: float = Field(1.0, gt=0, le=60, description="history polling while the websocket is down")
    unreachable_s: float = Field(
        120.0, gt=0, le=86400, description="fail after the server is unreachable this long"
    )

    @field_validator("server")
    @classmethod
    def _servers(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list):
            if not value:
                raise ValueError("server list is empty")
            if len(value) > 64:
                raise ValueError(f"at most 64 servers, got {len(value)}")
            out = [normalise_server(v) for v in value]
            if len(set(out)) != len(out):
                raise ValueError("a server is listed twice")
            return out
        return normalise_server(value)

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"token_env must be an environment variable name, got {value!r}")
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None and not value:
            raise ValueError("outputs is empty: name output node ids, or leave it out for all")
        return value

    @model_validator(mode="after")
    def _graph(self) -> "ComfyParams":
        if self.workflow is None:
            if not self.workflow_file:
                raise ValueError("give a 'workflow' (API-format dict) or a 'workflow_file'")
            self.workflow = read_workflow_file(self.workflow_file)
        else:
            check_workflow(self.workflow)
        for path, value in self.overrides.items():
            check_path(self.workflow, path)
            if _is_link(value):
                raise ValueError(f"override {path!r}: links cannot be overridden, only values")
            if not isinstance(value, (str, int, float, bool)) or value is None:
                raise ValueError(
                    f"override {path!r} must be a string, number or bool, got {type(value).__name__}"
                )
        for path, file in self.inputs.items():
            check_path(self.workflow, path, "input")
            if path in self.overrides:
                raise ValueError(f"{path!r} is both an override and an input file")
            if not isinstance(file, str) or not file.lower().endswith(INPUT_SUFFIXES):
                raise ValueError(
                    f"input {path!r}: {file!r} must be an image file ({', '.join(INPUT_SUFFIXES)})"
                )
        if self.input_from is not None:
            check_path(self.workflow, self.input_from, "input")
            if self.input_from in self.overrides or self.input_from in self.inputs:
                raise ValueError(f"input_from {self.input_from!r} is also set by overrides or inputs")
        for node_id in self.outputs or ():
            if node_id not in self.workflow:
                raise ValueError(f"outputs: no node {node_id!r} in the workflow")
        return self

    def servers(self) -> list[str]:
        return list(self.server) if isinstance(self.server, list) else [self.server]

    def graph(self, uploaded: Optional[dict[str, str]] = None) -> dict:
        """The workflow exactly as it is sent: overrides and uploaded names applied."""
        assert self.workflow is not None
        graph = json.loads(json.dumps(self.workflow))
        for path, value in {**self.overrides, **(uploaded or {})}.items():
            node_id, name = split_path(path)
            graph[node_id]["inputs"][name] = value
        return graph


# --- finding the prompt and seed in a workflow ---------------------------------


def find_prompt_inputs(workflow: dict) -> dict[str, Optional[str]]:
    """The override paths of the workflow's positive and negative prompt text and
    its seed, found from the graph: the text inputs that feed a sampler's
    ``positive``/``negative``, and a sampler's ``seed``/``noise_seed``.
    Missing ones are None."""
    found: dict[str, Optional[str]] = {"prompt": None, "negative": None, "seed": None}
    for node_id in sorted(workflow, key=_node_order):
        inputs = workflow[node_id].get("inputs", {})
        for role in ("positive", "negative"):
            link = inputs.get(role)
            key = "prompt" if role == "positive" else "negative"
            if found[key] is None and _is_link(link):
                text = _text_source(workflow, link[0])
                if text is not None:
                    found[key] = text
        if found["seed"] is None:
            for name in SEED_INPUTS:
                if isinstance(inputs.get(name), int) and not isinstance(inputs.get(name), bool):
                    found["seed"] = f"{node_id}.inputs.{name}"
                    break
    if found["prompt"] is None:  # no sampler: the first node with a text input
        for node_id in sorted(workflow, key=_node_order):
            if isinstance(workflow[node_id].get("inputs", {}).get("text"), str):
                found["prompt"] = f"{node_id}.inputs.text"
                break
    return found


def _text_source(workflow: dict, node_id: str, depth: int = 0) -> Optional[str]:
    node = workflow.get(node_id)
    if node is None or depth > 8:
        return None
    inputs = node.get("inputs", {})
    if isinstance(inputs.get("text"), str):
        return f"{node_id}.inputs.text"
    for value in inputs.values():  # e.g. a conditioning combine between text and sampler
        if _is_link(value):
            found = _text_source(workflow, value[0], depth + 1)
            if found is not None:
                return found
    return None


def generation_params(
    workflow_file: Optional[str] = None,
    *,
    prompt: Optional[str] = None,
    negative: Optional[str] = None,
    seed: Optional[int] = None,
    count: int = 1,
    server: Union[str, list[str], None] = None,
    input_image: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    input_from_previous: bool = False,
    **extra: Any,
) -> list[dict]:
    """Params for ``count`` generations of one workflow (the embedded text-to-image
    one if None) with ``prompt`` and seeds ``seed, seed+1, ...`` (random when None,
    and written into the params, so a retry makes the same image). With
    ``input_from_previous``, job i's LoadImage takes image i of the results of the
    jobs it depends on (``input_from``/``input_index``), e.g. frame i of a render."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
        raise ValueError(f"count must be an int from 1 to 1000, got {count!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    source = str(workflow_file) if workflow_file else str(DEFAULT_WORKFLOW)
    workflow = read_workflow_file(source)
    paths = find_prompt_inputs(workflow)
    base: dict[str, Any] = dict(overrides or {})
    for key, value in (("prompt", prompt), ("negative", negative)):
        if value is not None:
            if paths[key] is None:
                raise ValueError(f"{source}: found no {key} text input; name it in overrides")
            base[paths[key]] = value  # type: ignore[index]
    inputs: dict[str, str] = {}
    target = None
    if input_image is not None or input_from_previous:
        target = next(
            (f"{n}.inputs.image" for n in sorted(workflow, key=_node_order)
             if workflow[n]["class_type"] == "LoadImage" and "image" in workflow[n].get("inputs", {})),
            None,
        )
        if target is None:
            raise ValueError(f"{source} has no LoadImage node to take the input image")
        if input_image is not None and input_from_previous:
            raise ValueError("give input_image or input_from_previous, not both")
        if input_image is not None:
            inputs[target] = str(input_image)
    if seed is None:
        seed = random.randrange(1 << 48)
    out = []
    for i in range(count):
        job_overrides = dict(base)
        if paths["seed"] is not None:
            job_overrides[paths["seed"]] = seed + i
        elif count > 1:
            raise ValueError(f"{source}: found no seed input, so {count} jobs would be the same")
        params: dict[str, Any] = {
            "workflow": workflow,
            "workflow_file": source,
            "overrides": job_overrides,
            "inputs": inputs,
            **extra,
        }
        if input_from_previous:
            params["input_from"], params["input_index"] = target, i
        if server is not None:
            params["server"] = server
        out.append(params)
    return out


# --- the HTTP and websocket client ---------------------------------------------


class Client:
    """The few ComfyUI routes the kind uses, over urllib, with an optional bearer
    token. Errors become ``ServerUnreachable`` (retry later) or ``ComfyUIError``."""

    def __init__(self, server: str, token: Optional[str] = None, timeout: float = 30.0) -> None:
        self.server = server
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _request(self, method: str, path: str, body: Any = None, *, raw: Optional[bytes] = None,
                 content_type: str = "application/json") -> tuple[int, bytes]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.server + path, data=data, method=method)
        for key, value in self.headers.items():
            req.add_header(key, value)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read(MAX_JSON_BYTES + 1)
        except urllib.error.HTTPError as exc:
            payload = exc.read(MAX_JSON_BYTES + 1)
            if exc.code >= 500 or exc.code in (408, 429):
                raise ServerUnreachable(f"{self.server} answered {exc.code} {exc.reason}") from None
            return exc.code, payload
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachable(f"ComfyUI server {self.server} is not reachable: {reason}") from None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self._request(method, path, body)
        if status >= 400:
            raise ComfyUIError(f"{self.server}{path} answered {status}: {payload[:300]!r}")
        if len(payload) > MAX_JSON_BYTES:
            raise ComfyUIError(f"{self.server}{path} answered more than {MAX_JSON_BYTES} bytes")
        try:
            return json.loads(payload or b"null")
        except ValueError:
            raise ComfyUIError(f"{self.server}{path} answered something that is not JSON") from None

    def post_prompt(self, graph: dict, client_id: str, prompt_id: str,
                    targets: Optional[list[str]] = None) -> str:
        body: dict[str, Any] = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id,
                                "extra_data": {"client_id": client_id}}
        if targets:
            body["partial_execution_targets"] = targets
        status, payload = self._request("POST", "/prompt", body)
        try:
            answer = json.loads(payload or b"null")
        except ValueError:
            answer = None
        if status >= 400 or not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ComfyUIError(describe_refusal(answer, graph, status))
        return str(answer["prompt_id"])

    def queue(self) -> tuple[list, list]:
        data = self._json("GET", "/queue")
        if not isinstance(data, dict):
            raise ComfyUIError(f"{self.server}/queue answered {type(data).__name__}")
        return list(data.get("queue_running") or []), list(data.get("queue_pending") or [])

    def history(self, prompt_id: str) -> Optional[dict]:
        data = self._json("GET", "/history/" + urllib.parse.quote(prompt_id, safe=""))
        if isinstance(data, dict) and isinstance(data.get(prompt_id), dict):
            return data[prompt_id]
        return None

    def delete(self, prompt_id: str) -> None:
        self._request("POST", "/queue", {"delete": [prompt_id]})

    def interrupt(self, prompt_id: str) -> None:
        self._request("POST", "/interrupt", {"prompt_id": prompt_id})

    def upload(self, path: Path) -> str:
        data = _read_input(path)
        boundary = uuid.uuid4().hex
        name = _SAFE.sub("_", path.name)[-120:]
        body = b"".join([
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n"
            f"true\r\n--{boundary}--\r\n".encode(),
        ])
        status, payload = self._request("POST", "/upload/image", raw=body,
                                        content_type=f"multipart/form-data; boundary={boundary}")
        try:
            answer = json.loads(payload)
            uploaded = str(answer["name"])
            sub = str(answer.get("subfolder") or "")
        except (ValueError, KeyError, TypeError):
            raise ComfyUIError(f"upload of {path.name} answered {status}: {payload[:200]!r}") from None
        if status >= 400:
            raise ComfyUIError(f"upload of {path.name} answered {status}")
        return f"{sub}/{uploaded}" if sub else uploaded

    def download(self, item: dict, dest: Path) -> int:
        """GET /view for one output item into ``dest``, atomically; returns bytes."""
        query = urllib.parse.urlencode({
            "filename": str(item.get("filename", "")),
            "subfolder": str(item.get("subfolder", "")),
            "type": str(item.get("type", "output")),
        })
        req = urllib.request.Request(f"{self.server}/view?{query}")
        for key, value in self.headers.items():
            req.add_header(key, value)
        tmp = dest.with_name(f".{dest.name}.part")
        size = 0
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp, open(tmp, "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_OUTPUT_BYTES:
                        raise ComfyUIError(f"output {dest.name} is over {MAX_OUTPUT_BYTES} bytes")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except urllib.error.HTTPError as exc:
            raise ComfyUIError(f"/view of {item.get('filename')!r} answered {exc.code}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise ServerUnreachable(f"download from {self.server} failed: {exc}") from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return size

    def websocket(self, client_id: str, timeout: float = 10.0) -> Any:
        import websocket  # websocket-client, bundled with the extension

        scheme = "wss" if self.server.startswith("https:") else "ws"
        rest = self.server[self.server.index(":"):]  # "://host:port/path"
        url = f"{scheme}{rest}/ws?clientId={urllib.parse.quote(client_id)}"
        headers = [f"{k}: {v}" for k, v in self.headers.items()]
        return websocket.create_connection(url, timeout=timeout, header=headers,
                                           enable_multithread=True)


def _read_input(path: Path) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ComfyUIError(f"cannot read input image {str(path)!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ComfyUIError(f"input image {str(path)!r} is not a regular file")
        if st.st_size > MAX_INPUT_BYTES:
            raise ComfyUIError(f"input image {str(path)!r} is over {MAX_INPUT_BYTES} bytes")
        return fh.read(MAX_INPUT_BYTES + 1)


def describe_refusal(answer: Any, graph: dict, status: int) -> str:
    """ComfyUI's 400 answer as one sentence that names each failing node and input."""
    if not isinstance(answer, dict):
        return f"ComfyUI refused the prompt ({status})"
    error = answer.get("error")
    if isinstance(error, dict):
        head = str(error.get("message") or error.get("type") or "refused")
        details = str(error.get("details") or "")
    else:
        head, details = str(error or "refused"), ""
    parts = []
    node_errors = answer.get("node_errors")
    if isinstance(node_errors, dict):
        for node_id, entry in node_errors.items():
            if not isinstance(entry, dict):
                continue
            where = node_label(graph, str(node_id), entry.get("class_type"))
            for err in entry.get("errors") or []:
                if not isinstance(err, dict):
                    continue
                extra = _as_dict(err.get("extra_info"))
                name = extra.get("input_name")
                what = str(err.get("message") or err.get("type") or "error")
                more = str(err.get("details") or "")
                parts.append(f"{where}{f' input {name!r}' if name else ''}: {what}"
                             f"{f' ({more})' if more and more != what else ''}")
    text = f"ComfyUI refused the prompt: {head}"
    if parts:
        text += ": " + "; ".join(parts)
    elif details:
        text += f" ({details})"
    return text


def node_label(graph: dict, node_id: Optional[str], class_type: Any = None) -> str:
    """``node 3 'Positive Prompt' (CLIPTextEncode)``."""
    node = graph.get(node_id) if isinstance(node_id, str) else None
    cls = class_type or (node or {}).get("class_type") or "?"
    title = ((node or {}).get("_meta") or {}).get("title") if node else None
    if title and title != cls:
        return f"node {node_id} {title!r} ({cls})"
    return f"node {node_id} ({cls})"


# --- progress ------------------------------------------------------------------


def nodes_to_run(graph: dict, targets: Optional[list[str]] = None) -> set[str]:
    """The nodes the targets (all sinks when None) depend on, themselves included."""
    if targets is None:
        linked = {v[0] for n in graph.values() for v in n.get("inputs", {}).values() if _is_link(v)}
        targets = [n for n in graph if n not in linked] or list(graph)
    seen: set[str] = set()
    stack = list(targets)
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in graph:
            continue
        seen.add(node_id)
        stack.extend(v[0] for v in graph[node_id].get("inputs", {}).values() if _is_link(v))
    return seen


class Tracker:
    """Turns ComfyUI's messages for one prompt into (fraction, stage, message)."""

    def __init__(self, graph: dict, prompt_id: str, targets: Optional[list[str]] = None) -> None:
        self.graph = graph
        self.prompt_id = prompt_id
        self.todo = nodes_to_run(graph, targets)
        self.done: set[str] = set()
        self.current: Optional[str] = None
        self.node_fraction = 0.0
        self.outcome: Optional[str] = None  # "success" | "error" | "interrupted"
        self.error: Optional[dict] = None
        self.outputs: dict[str, dict] = {}

    def fraction(self) -> float:
        total = max(1, len(self.todo))
        return min(1.0, (len(self.done & self.todo) + self.node_fraction) / total)

    def feed(self, kind: str, data: Any) -> Optional[tuple[float, Optional[str], Optional[str]]]:
        """Take one message; return what to report, or None if it is not about us."""
        if not isinstance(data, dict) or data.get("prompt_id") not in (None, self.prompt_id):
            return None
        if data.get("prompt_id") is None and kind not in ("executing",):
            return None
        if kind == "execution_start":
            return (self.fraction(), "started", None)
        if kind == "execution_cached":
            nodes = data.get("nodes") or []
            cached = {str(n) for n in nodes if isinstance(n, (str, int))}
            self.todo -= cached
            return (self.fraction(), None, f"{len(cached)} node(s) cached")
        if kind == "executing":
            node = data.get("node")
            if data.get("prompt_id") is None and self.current is None:
                return None
            if self.current is not None:
                self.done.add(self.current)
            self.node_fraction = 0.0
            if node is None:  # the prompt is finished (its execution_success comes around it)
                self.current = None
                return (self.fraction(), None, None)
            self.current = str(node)
            return (self.fraction(), self.stage(self.current), None)
        if kind == "progress":
            value, maximum = data.get("value"), data.get("max")
            if isinstance(value, (int, float)) and isinstance(maximum, (int, float)) and maximum > 0:
                self.node_fraction = max(0.0, min(1.0, value / maximum))
                node = str(data.get("node") or self.current or "")
                return (self.fraction(), self.stage(node) if node else None,
                        f"step {int(value)}/{int(maximum)}")
            return None
        if kind == "executed":
            node = str(data.get("node") or "")
            if isinstance(data.get("output"), dict):
                self.outputs[node] = data["output"]
            self.done.add(node)
            return (self.fraction(), None, None)
        if kind == "execution_success":
            self.outcome = "success"
            return (1.0, "done", None)
        if kind == "execution_error":
            self.outcome, self.error = "error", data
            return None
        if kind == "execution_interrupted":
            self.outcome, self.error = "interrupted", data
            return None
        return None

    def stage(self, node_id: str) -> str:
        node = self.graph.get(node_id) or {}
        cls = node.get("class_type") or "node"
        title = (node.get("_meta") or {}).get("title")
        return f"{title} ({cls})" if title and title != cls else str(cls)

    def error_text(self) -> str:
        data = self.error or {}
        where = node_label(self.graph, str(data.get("node_id")), data.get("node_type"))
        msg = str(data.get("exception_message") or "").strip() or "failed"
        typ = data.get("exception_type")
        return f"ComfyUI failed at {where}: {msg}{f' ({typ})' if typ else ''}"


def outcome_from_history(entry: dict) -> tuple[Optional[str], Optional[dict]]:
    """("success" | "error" | "interrupted" | None while running, the error message data)."""
    status = _as_dict(entry.get("status"))
    messages = status.get("messages")
    if not isinstance(messages, list):
        messages = []
    error = None
    for item in messages:
        if isinstance(item, list) and len(item) == 2 and item[0] in (
                "execution_error", "execution_interrupted"):
            error = item[1] if isinstance(item[1], dict) else {}
            if item[0] == "execution_interrupted":
                return "interrupted", error
    if status.get("status_str") == "error" or error is not None:
        return "error", error
    if status.get("status_str") == "success" or (status.get("completed") and not status.get("status_str")):
        return "success", None
    if not status and isinstance(entry.get("outputs"), dict):
        return "success", None  # an older server without status
    return None, None


# --- the handler ---------------------------------------------------------------


class _Run:
    """One job's conversation with one server."""

    def __init__(self, ctx: JobContext, params: ComfyParams) -> None:
        self.ctx = ctx
        self.params = params
        resume = ctx.resume_from if isinstance(ctx.resume_from, dict) else {}
        servers = params.servers()
        server = resume.get("server")
        self.server: str = server if server in servers else (ctx.slot or servers[0])
        self.client = Client(self.server, _token(params))
        self.resume = resume if resume.get("server") == self.server else {}
        self.prompt_id: str = str(self.resume.get("prompt_id") or uuid.uuid4())
        self.client_id: str = str(self.resume.get("client_id") or f"taskqueue-{uuid.uuid4().hex}")
        self.ws: Any = None
        self.ws_retry_at = 0.0
        self.unreachable_since: Optional[float] = None
        self.graph: dict = {}
        self.tracker: Optional[Tracker] = None

    # the whole run ---------------------------------------------------------------

    def run(self) -> dict:
        ctx = self.ctx
        phase = self.resume.get("phase")
        self.graph = self.params.graph(self.resume.get("uploaded"))
        self._connect()
        try:
            if phase in ("submitted", "submitting"):
                known = self._retrying(self._find)  # a server still booting is waited for
                if known is None and phase == "submitted":
                    raise ComfyUIError(
                        f"prompt {self.prompt_id} is no longer known to {self.server} (did it "
                        "restart?); not submitted again: retry the job to generate again"
                    )
                if known is None:
                    phase = None  # it never reached the server: submitting now is the first time
                else:
                    ctx.progress(None, "re-attached", f"prompt {self.prompt_id} on {self.server}")
            if phase not in ("submitted", "submitting"):
                self._submit()
            self.tracker = Tracker(self.graph, self.prompt_id, self.params.outputs)
            entry = self._wait()
            return self._collect(entry)
        finally:
            self._close_ws()

    def _submit(self) -> None:
        ctx = self.ctx
        uploaded: dict[str, str] = {}
        files = dict(self.params.inputs)
        if self.params.input_from is not None:
            files[self.params.input_from] = image_from_inputs(ctx.inputs, self.params.input_index)
        for path, file in files.items():
            ctx.raise_if_cancelled()
            ctx.progress(0.0, "uploading", os.path.basename(file))
            uploaded[path] = self._retrying(functools.partial(self.client.upload, Path(file)))
        self.graph = self.params.graph(uploaded)
        # Checkpoint the id first: if Blender dies during the POST, the resumed job
        # finds the prompt by this id instead of paying for it twice.
        state = {"server": self.server, "prompt_id": self.prompt_id, "client_id": self.client_id,
                 "uploaded": uploaded}
        ctx.checkpoint({**state, "phase": "submitting"})
        ctx.raise_if_cancelled()
        ctx.progress(0.0, "queued on server", self.server)
        answered = self._retrying(
            lambda: self._post_or_find(), what="submit")
        if answered != self.prompt_id:  # an older server that picks its own ids
            self.prompt_id = answered
        ctx.checkpoint({**state, "prompt_id": self.prompt_id, "phase": "submitted"})

    def _post_or_find(self) -> str:
        try:
            return self.client.post_prompt(self.graph, self.client_id, self.prompt_id,
                                           self.params.outputs)
        except ServerUnreachable:
            # The POST may have landed before the connection broke: look before retrying.
            if self._find_quiet() is not None:
                return self.prompt_id
            raise

    def _find_quiet(self) -> Optional[str]:
        try:
            return self._find()
        except ServerUnreachable:
            return None

    def _find(self) -> Optional[str]:
        """"running", "pending" or "history" if the server knows our prompt, else None.
        A server that ignored our prompt id is searched by our client id."""
        running, pending = self.client.queue()
        for where, items in (("running", running), ("pending", pending)):
            for item in items:
                if _entry_is_ours(item, self.prompt_id, self.client_id):
                    self.prompt_id = str(item[1])
                    return where
        if self.client.history(self.prompt_id) is not None:
            return "history"
        return None

    def _wait(self) -> dict:
        """Follow the prompt until it ends; return its history entry."""
        ctx, tracker = self.ctx, self.tracker
        assert tracker is not None
        next_poll = 0.0
        while True:
            if ctx.cancelled:
                self._stop()
            now = time.monotonic()
            if self.ws is None and now >= self.ws_retry_at:
                self._connect()
            got = self._receive(0.25) if self.ws is not None else None
            if got is None and self.ws is None:
                try:
                    ctx.sleep(min(0.25, self.params.poll_s))
                except JobCancelled:
                    self._stop()
            if got is not None:
                report = tracker.feed(*got)
                if report is not None:
                    ctx.progress(*report)
                if tracker.outcome is not None:
                    next_poll = 0.0  # the outcome is read from /history, the record of truth
            # Poll the history: often while the websocket is down, now and then while up
            # (a message lost between connects must not leave the job waiting forever).
            now = time.monotonic()
            if now >= next_poll:
                interval = self.params.poll_s if self.ws is None else max(5.0, self.params.poll_s)
                next_poll = now + interval
                entry = self._history_or_none()
                if entry is not None:
                    outcome, error = outcome_from_history(entry)
                    if outcome is not None:
                        if outcome != "success":
                            tracker.outcome, tracker.error = outcome, error or tracker.error
                            self._raise_outcome()
                        return entry
                elif tracker.outcome is not None:
                    next_poll = now + 0.1  # told it ended: history follows at once
                elif self._gone():
                    raise ComfyUIError(
                        f"prompt {self.prompt_id} disappeared from {self.server} "
                        "(deleted there, or the server restarted)"
                    )

    def _raise_outcome(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        if tracker.outcome == "interrupted":
            if self.ctx.cancelled:
                raise JobCancelled(f"interrupted prompt {self.prompt_id} on {self.server}")
            raise ComfyUIError(
                f"prompt {self.prompt_id} was interrupted on {self.server} (not by this queue)")
        raise ComfyUIError(tracker.error_text())

    def _history_or_none(self) -> Optional[dict]:
        try:
            entry = self.client.history(self.prompt_id)
        except ServerUnreachable as exc:
            self._unreachable(exc)
            return None
        self.unreachable_since = None
        return entry

    def _gone(self) -> bool:
        """Not in history and not in the queue (checked only when history lacks it)."""
        try:
            running, pending = self.client.queue()
        except ServerUnreachable as exc:
            self._unreachable(exc)
            return False
        if any(_entry_is_ours(i, self.prompt_id, self.client_id) for i in running + pending):
            return False
        # It may have finished between the two calls.
        return self._history_or_none() is None

    def _unreachable(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.unreachable_since is None:
            self.unreachable_since = now
            self.ctx.progress(None, None, f"server unreachable; retrying ({exc})")
        elif now - self.unreachable_since > self.params.unreachable_s:
            raise ServerUnreachable(
                f"{exc} (for {self.params.unreachable_s:g} s); prompt {self.prompt_id} may "
                "still run there: retrying the job re-attaches to it")

    def _retrying(self, call: Callable[[], Any], what: str = "request") -> Any:
        while True:
            self.ctx.raise_if_cancelled()
            try:
                result = call()
                self.unreachable_since = None
                return result
            except ServerUnreachable as exc:
                self._unreachable(exc)
                self.ctx.sleep(min(2.0, self.params.poll_s))

    # websocket ---------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            ws = self.client.websocket(self.client_id)
            ws.settimeout(0.25)
            self.ws = ws
        except Exception:  # refused, handshake failed, no websocket module: poll instead
            self.ws = None
            self.ws_retry_at = time.monotonic() + 2.0

    def _receive(self, timeout: float) -> Optional[tuple[str, Any]]:
        import websocket

        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketException, OSError, ValueError):
            self._close_ws()
            self.ws_retry_at = time.monotonic() + 1.0
            self.ctx.progress(None, None, "websocket dropped; polling history and reconnecting")
            return None
        if not isinstance(frame, str):
            return None  # a binary preview frame
        try:
            msg = json.loads(frame)
        except ValueError:
            return None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return None
        return msg["type"], msg.get("data")

    def _close_ws(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.close(timeout=0.5)
            except Exception:
                pass

    # cancel ------------------------------------------------------------------------

    def _stop(self) -> None:
        """Asked to stop: on shutdown leave the prompt running (the job resumes from
        its checkpoint); otherwise remove or interrupt it, then raise JobCancelled."""
        ctx = self.ctx
        if ctx.stop_reason == "shutdown":
            raise JobCancelled(f"left prompt {self.prompt_id} running on {self.server}")
        try:
            running, pending = self.client.queue()
            if any(_entry_is_ours(i, self.prompt_id, self.client_id) for i in pending):
                self.client.delete(self.prompt_id)
                raise JobCancelled(f"removed prompt {self.prompt_id} from {self.server}'s queue")
            if any(_entry_is_ours(i, self.prompt_id, self.client_id) for i in running):
                self.client.interrupt(self.prompt_id)
                raise JobCancelled(f"interrupted prompt {self.prompt_id} on {self.server}")
        except ServerUnreachable:
            raise JobCancelled(
                f"{self.server} unreachable: prompt {self.prompt_id} may still run there") from None
        raise JobCancelled(f"prompt {self.prompt_id} had already ended on {self.server}")

    # outputs -----------------------------------------------------------------------

    def _collect(self, entry: dict) -> dict:
        ctx = self.ctx
        outputs = _as_dict(entry.get("outputs"))
        wanted = self.params.outputs
        items = list(_output_items(outputs, wanted))
        if len(items) > MAX_OUTPUT_FILES:
            raise ComfyUIError(f"prompt {self.prompt_id} made {len(items)} files; at most {MAX_OUTPUT_FILES}")
        files: list[str] = []
        images: list[dict] = []
        for n, (node_id, item) in enumerate(items, 1):
            ctx.raise_if_cancelled()
            ctx.progress(1.0, "downloading", f"{n}/{len(items)}")
            name = _safe_name(node_id, str(item.get("filename", "")))
            dest = ctx.workdir / name
            self._retrying(functools.partial(self.client.download, item, dest))
            files.append(str(dest))
            images.append({"node": node_id, "filename": item.get("filename"), "path": str(dest)})
        result: dict[str, Any] = {"prompt_id": self.prompt_id, "server": self.server,
                                  "files": files, "images": images}
        loader = image_loader
        if files and self.params.load_images and loader is not None:
            result["datablocks"] = ctx.call_on_main(loader, files)
        return result


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _entry_is_ours(item: Any, prompt_id: str, client_id: str) -> bool:
    if not isinstance(item, (list, tuple)) or len(item) < 2:
        return False
    if item[1] == prompt_id:
        return True
    extra = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
    return bool(extra.get("client_id") == client_id)


def _output_items(outputs: dict, wanted: Optional[list[str]]) -> Iterator[tuple[str, dict]]:
    for node_id in sorted(outputs, key=lambda n: _node_order(str(n))):
        if wanted is not None and node_id not in wanted:
            continue
        node_out = outputs[node_id]
        if not isinstance(node_out, dict):
            continue
        for key in OUTPUT_KEYS:
            for item in node_out.get(key) or []:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    yield str(node_id), item


def _safe_name(node_id: str, filename: str) -> str:
    """A file name for an output that cannot leave the job's folder."""
    base = _SAFE.sub("_", os.path.basename(filename.replace("\\", "/"))).lstrip(".") or "output"
    return f"{_SAFE.sub('_', node_id)}_{base}"[-150:].lstrip(".") or "output"


def _token(params: ComfyParams) -> Optional[str]:
    if params.token_env:
        value = os.environ.get(params.token_env)
        if not value:
            raise ComfyUIError(f"token_env names ${params.token_env}, which is not set")
        return value
    return _default_token


def run_prompt(ctx: JobContext, params: ComfyParams) -> dict:
    """Run a ComfyUI workflow on a ComfyUI server and download its outputs."""
    return _Run(ctx, params).run()


# --- what the kind tells the engine --------------------------------------------


def _servers_of(params: dict) -> list[str]:
    server = params.get("server", DEFAULT_SERVER)
    return list(server) if isinstance(server, list) else [server]


def _needs_network(params: dict) -> bool:
    return not all(is_loopback(s) for s in _servers_of(params))


def image_from_inputs(inputs: dict, index: int = 0) -> str:
    """Image file ``index`` among those named in the results of a job's
    prerequisites (``ctx.inputs``, in ``depends_on`` order): a result's ``files``
    list (what ``blender.render`` and ``comfyui.prompt`` return) or a path string.
    Only existing regular files with an image suffix count.

    Raises:
        ValueError: naming the prerequisites, when they made fewer image files.
    """
    found: list[str] = []
    for result in inputs.values():
        candidates = result.get("files") if isinstance(result, dict) else [result]
        for file in candidates if isinstance(candidates, list) else ():
            if isinstance(file, str) and file.lower().endswith(INPUT_SUFFIXES) and os.path.isfile(file):
                found.append(file)
                if len(found) > index:
                    return file
    names = ", ".join(inputs) or "none: the job depends on no job"
    raise ValueError(f"input_from: image {index} wanted, but the results of its prerequisites "
                     f"({names}) hold {len(found)} image file(s)")


def describe(params: dict) -> list[str]:
    """What a job with these params will do, for the release dialog."""
    lines = []
    servers = _servers_of(params)
    online = [s for s in servers if not is_loopback(s)]
    lines.append(f"sends a ComfyUI workflow to {', '.join(map(str, servers))}"
                 f"{' (ONLINE: needs Online Access)' if online else ' (this machine)'}")
    wf = params.get("workflow") or {}
    if params.get("workflow_file"):
        lines.append(f"workflow read at submit from {params['workflow_file']}")
    if isinstance(wf, dict):
        classes: dict[str, int] = {}
        for node in wf.values():
            if isinstance(node, dict):
                cls = str(node.get("class_type"))
                classes[cls] = classes.get(cls, 0) + 1
        lines.append(f"{len(wf)} nodes: " + ", ".join(f"{c} x{n}" if n > 1 else c
                                                      for c, n in sorted(classes.items())))
    for path, value in sorted((params.get("overrides") or {}).items()):
        lines.append(f"sets {path} = {json.dumps(value)}")
    for path, file in sorted((params.get("inputs") or {}).items()):
        lines.append(f"UPLOADS the local file {file} to the server, as {path}")
    if params.get("input_from"):
        lines.append(f"UPLOADS the first image among the results of the jobs it runs after, "
                     f"as {params['input_from']}")
    lines.append("downloads the outputs into the job's own folder"
                 f"{' (nodes ' + ', '.join(params['outputs']) + ')' if params.get('outputs') else ''}")
    if params.get("token_env"):
        lines.append(f"sends the bearer token from ${params['token_env']}")
    return lines


SPEC = KindSpec(
    name=KIND,
    handler=run_prompt,
    params=ComfyParams,
    resumable=True,
    network=True,
    description="Run a ComfyUI workflow on a ComfyUI server",
    needs_network=_needs_network,
    slots=_servers_of,
    slot_limit=1,
    describe=describe,
)
shared_registry.register(SPEC)


def register(registry: KindRegistry) -> KindSpec:
    """Register ``comfyui.prompt`` in another registry (tests, the bench)."""
    return registry.register(SPEC)
