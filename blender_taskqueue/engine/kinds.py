"""The job kinds registry: a name, a handler and how to run it.

Jobs are data (a kind name plus JSON params), never pickled callables, so the
queue can be written to disk and adopted after a crash. The registry maps the
name back to code.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel, ValidationError

from .errors import InvalidParams, UnknownKind

KIND_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")


@dataclass(frozen=True)
class KindSpec:
    """A registered kind. ``handler(ctx, params)`` returns the job's result."""

    name: str
    handler: Callable[..., Any]
    params: Optional[type[BaseModel]] = None
    resumable: bool = False
    max_concurrency: Optional[int] = None
    network: bool = False
    # The job's work (and memory_mb) is in child processes: it counts against the
    # machine's free memory, never against max_memory_mb (Blender's own use).
    out_of_process: bool = False
    recoverable: bool = True  # False for ad-hoc callables that cannot be rebuilt from data
    description: str = ""
    # Whether a job with these (JSON) params goes online; None: ``network`` says.
    # (A ComfyUI server on 127.0.0.1 is not online; one across the room is.)
    needs_network: Optional[Callable[[dict], bool]] = None
    # The resources (e.g. server URLs) a job may run on, in order of preference; the
    # engine runs at most ``slot_limit`` jobs on each and tells the job which one
    # it got (``ctx.slot``). None: the kind has no such resources.
    slots: Optional[Callable[[dict], list]] = None
    slot_limit: int = 1
    # Jobs of this kind may run on a dask cluster when one is configured
    # (EngineConfig.cluster): the handler then runs on a cluster worker, which must
    # have this package (and the kind's module) installed.
    remote_ok: bool = False
    # What a job with these (JSON) params will do, exactly, as lines a person reads
    # before releasing a job from another file: the resolved program and full argv,
    # environment changes, files read and written, servers contacted. None: the
    # kind name and its params are all that can be shown.
    describe: Optional[Callable[[dict], list[str]]] = None

    def what_it_runs(self, params: dict) -> list[str]:
        """``describe(params)``, or the params one per line; never raises (a hostile
        file's params may not even validate: that is said, not hidden)."""
        if self.describe is not None:
            try:
                return [str(line) for line in self.describe(params)]
            except Exception as exc:  # the description itself must not break the dialog
                return [f"(cannot describe these params: {type(exc).__name__}: {exc})",
                        *(f"{k} = {json.dumps(v)}" for k, v in sorted(params.items()))]
        return [f"{k} = {json.dumps(v)}" for k, v in sorted(params.items())]

    def goes_online(self, params: dict) -> bool:
        """Whether a job of this kind with ``params`` needs Blender's Online Access."""
        if self.needs_network is not None:
            try:
                return bool(self.needs_network(params))
            except Exception:
                return True  # cannot tell: ask for the permission
        return self.network

    def validate_params(self, params: Any) -> dict:
        """Return params as a JSON dict, or raise ``InvalidParams`` naming every problem."""
        if self.params is not None:
            if isinstance(params, self.params):
                model = params
            else:
                if params is None:
                    params = {}
                if not isinstance(params, dict):
                    raise InvalidParams(
                        f"params for kind {self.name!r} must be a dict or "
                        f"{self.params.__name__}, got {type(params).__name__}"
                    )
                try:
                    model = self.params.model_validate(params)
                except ValidationError as exc:
                    raise InvalidParams(
                        f"invalid params for kind {self.name!r}: {_summarise(exc)}"
                    ) from None
                except OSError as exc:
                    # A validator that looks at the file system met a path the OS refuses
                    # (too long, a bad name): pydantic only turns ValueErrors into errors.
                    raise InvalidParams(
                        f"invalid params for kind {self.name!r}: {_os_error(exc)}"
                    ) from None
            try:
                dumped = model.model_dump(mode="json")
                json.dumps(dumped, allow_nan=False)
            except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
                raise InvalidParams(
                    f"params for kind {self.name!r} cannot be stored as JSON: {exc}"
                ) from None
            return dumped
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise InvalidParams(
                f"params for kind {self.name!r} must be a dict, got {type(params).__name__}"
            )
        if not self.recoverable:
            return params
        try:
            # Round-trip so the stored params are exactly what the sidecar will hold.
            stored = json.loads(json.dumps(params, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidParams(
                f"params for kind {self.name!r} must be JSON data: {exc}"
            ) from None
        if stored != _lists_for_tuples(params):
            raise InvalidParams(
                f"params for kind {self.name!r} must be JSON data: every dict key must be a "
                "str (an int key would come back as a str after a crash)"
            )
        return stored

    def handler_params(self, params: dict) -> Any:
        """What the handler receives: the model instance, or the plain dict."""
        if self.params is None:
            return params
        return self.params.model_validate(params)


def _lists_for_tuples(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [_lists_for_tuples(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _lists_for_tuples(v) for k, v in obj.items()}
    return obj


def _os_error(exc: OSError) -> str:
    """An OSError in a few words, with at most the ends of a long file name."""
    what = exc.strerror or type(exc).__name__
    name = exc.filename
    if isinstance(name, (str, bytes)):
        text = name if isinstance(name, str) else name.decode("utf-8", "replace")
        return f"{what}: {_clip(repr(text), 120)}"
    return what


def _clip(text: str, limit: int = 200) -> str:
    """``text``, its middle elided past ``limit`` characters (a 5,000-character path
    must not bury the error that names it)."""
    if len(text) <= limit:
        return text
    keep = (limit - 30) // 2
    return f"{text[:keep]}…[{len(text) - 2 * keep} characters]…{text[-keep:]}"


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "params"
        parts.append(f"{where}: {_clip(str(err.get('msg')))} (got {_clip(repr(err.get('input')), 120)})")
    return "; ".join(parts)


class KindRegistry:
    """Thread-safe name -> KindSpec map."""

    def __init__(self) -> None:
        self._kinds: dict[str, KindSpec] = {}
        self._lock = threading.Lock()

    def register(self, spec: KindSpec, *, replace: bool = False) -> KindSpec:
        """Add ``spec``. Re-registering a name from the same module (an add-on reload)
        replaces it; a clash with another module raises ``ValueError``."""
        if not isinstance(spec.name, str) or not KIND_NAME.match(spec.name):
            raise ValueError(
                f"kind name must be lowercase dotted words like 'demo.render', got {spec.name!r}"
            )
        if spec.max_concurrency is not None and (
            isinstance(spec.max_concurrency, bool)
            or not isinstance(spec.max_concurrency, int)
            or spec.max_concurrency < 1
        ):
            raise ValueError(
                f"max_concurrency of kind {spec.name!r} must be None or an int >= 1, "
                f"got {spec.max_concurrency!r}"
            )
        if spec.params is not None and not (
            isinstance(spec.params, type) and issubclass(spec.params, BaseModel)
        ):
            raise TypeError(
                f"params of kind {spec.name!r} must be a pydantic BaseModel class, "
                f"got {spec.params!r}"
            )
        with self._lock:
            old = self._kinds.get(spec.name)
            if old is not None and not replace and _origin(old.handler) != _origin(spec.handler):
                raise ValueError(
                    f"kind {spec.name!r} is already registered by {_origin(old.handler)}; "
                    f"unregister it first or pass replace=True"
                )
            self._kinds[spec.name] = spec
        return spec

    def unregister(self, name: str) -> bool:
        with self._lock:
            return self._kinds.pop(name, None) is not None

    def get(self, name: str) -> KindSpec:
        spec = self._kinds.get(name)
        if spec is None:
            known = ", ".join(sorted(self._kinds)) or "none"
            raise UnknownKind(f"unknown job kind {name!r} (registered: {known})")
        return spec

    def find(self, name: str) -> Optional[KindSpec]:
        return self._kinds.get(name)

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def _shared_registry() -> KindRegistry:
    from .shared import shared

    state = shared()
    with state.lock:
        if state.registry is None:
            state.registry = KindRegistry()
        return state.registry


registry = _shared_registry()


def job_kind(
    name: str,
    *,
    params: Optional[type[BaseModel]] = None,
    resumable: bool = False,
    max_concurrency: Optional[int] = None,
    network: bool = False,
    out_of_process: bool = False,
    remote_ok: bool = False,
    registry: KindRegistry = registry,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated ``handler(ctx, params)`` as job kind ``name``.

    Args:
        name: dotted lowercase name, e.g. ``"demo.render"``.
        params: pydantic model; submit validates params against it.
        resumable: after a crash, re-queue the job with its last checkpoint.
        max_concurrency: at most this many jobs of the kind run at once.
        network: the kind goes online (Blender's "Allow Online Access" applies).
        out_of_process: the work runs in child processes, so a job's ``memory_mb``
            counts against free memory but not against ``max_memory_mb``.
        remote_ok: jobs may run on a dask cluster when one is configured.

    Returns:
        The handler, unchanged.
    """

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(
            KindSpec(
                name=name,
                handler=handler,
                params=params,
                resumable=resumable,
                max_concurrency=max_concurrency,
                network=network,
                out_of_process=out_of_process,
                remote_ok=remote_ok,
                description=(handler.__doc__ or "").strip().splitlines()[0]
                if handler.__doc__
                else "",
            )
        )
        return handler

    return decorate
