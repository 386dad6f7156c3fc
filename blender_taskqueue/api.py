"""The module-level console API: ``tq.submit(...)`` and friends act on one shared engine.

In Blender the add-on installs its engine (configured from the preferences)
with ``set_engine``; in plain Python the first call creates and starts a
default engine with no persistence. Either way there is one engine per
process, whichever copy of the package a script imported.
"""

from __future__ import annotations

import atexit
import sys
from typing import Any, Callable, Optional, Union

from .engine import Engine, EngineConfig, EngineStats, Event, JobInfo
from .engine.shared import shared

IDLE_DELAY = 1.0
ACTIVE_DELAY = 0.1
MAIN_CALL_BUDGET_S = 0.008


def engine() -> Engine:
    """The shared engine, created and started on first use."""
    state = shared()
    eng = state.engine
    if eng is not None:
        return eng
    with state.lock:
        if state.engine is None:
            eng = Engine(EngineConfig())
            eng.main_tick = pump
            eng.start()
            state.engine = eng
            atexit.register(_shutdown_at_exit, eng)
        return state.engine


def shared_engine_or_none() -> Optional[Engine]:
    """The shared engine if one exists; never creates one."""
    return shared().engine


def set_engine(new: Optional[Engine]) -> Optional[Engine]:
    """Make ``new`` the shared engine (None forgets it). Returns the previous one."""
    state = shared()
    with state.lock:
        old, state.engine = state.engine, new
        if new is not None and new.main_tick is None:
            new.main_tick = pump
        return old


def _shutdown_at_exit(eng: Engine) -> None:
    eng.shutdown(wait=True, timeout=2.0)


def pump() -> float:
    """One tick of the main-thread pump; returns the delay until the next tick.

    In Blender this is the 10 Hz timer's function (drain events into the panel's
    mirror, run main-thread calls within a budget, fire callbacks). In plain
    Python it runs main-thread calls and discards events.
    """
    impl = shared().pump
    if impl is not None:
        return impl()
    eng = engine()
    eng.run_main_calls(MAIN_CALL_BUDGET_S)
    eng.drain_events()
    return ACTIVE_DELAY if eng.stats().running or eng.pending_main_calls else IDLE_DELAY


def submit(kind: str, params: Any = None, **options: Any) -> str:
    return engine().submit(kind, params, **options)


def submit_many(specs: list[dict]) -> list[str]:
    return engine().submit_many(specs)


def pipeline(steps: list, **options: Any) -> list[str]:
    """Queue ``steps`` as a chain, each after the one before (see ``Engine.pipeline``)."""
    return engine().pipeline(steps, **options)


def dependents(job_id: str, *, failed_with: bool = False) -> list[str]:
    return engine().dependents(job_id, failed_with=failed_with)


def run(fn: Callable[..., Any], *args: Any, label: Optional[str] = None,
        priority: Union[str, int] = "normal", **kwargs: Any) -> str:
    return engine().run(fn, *args, label=label, priority=priority, **kwargs)


def get(job_id: str) -> JobInfo:
    return engine().get(job_id)


def jobs(states: Any = None) -> list[JobInfo]:
    return engine().jobs(states)


def cancel(job_id: str, *, with_dependents: bool = False) -> bool:
    return engine().cancel(job_id, with_dependents=with_dependents)


def retry(job_id: str, params: Optional[dict] = None, *, with_dependents: bool = False) -> str:
    return engine().retry(job_id, params, with_dependents=with_dependents)


def move(job_id: str, where: str) -> bool:
    return engine().move(job_id, where)


def release(ids: Any = None) -> int:
    return engine().release(ids)


def clear_finished() -> int:
    return engine().clear_finished()


def pause() -> None:
    engine().pause()


def resume() -> None:
    engine().resume()


def configure(**changes: Any) -> EngineConfig:
    return engine().configure(**changes)


def stats() -> EngineStats:
    return engine().stats()


def wait(ids: Any = None, timeout: Optional[float] = None) -> bool:
    """Like ``Engine.wait``; on the main thread it keeps pumping while it waits."""
    return engine().wait(ids, timeout)


def on_finished(callback: Callable[[JobInfo], Any], *, on_main: bool = True) -> Callable[[], None]:
    return engine().on_finished(callback, on_main=on_main)


def flush(timeout: float = 10.0) -> bool:
    return engine().flush(timeout)


def drain_events() -> list[Event]:
    return engine().drain_events()


def run_main_calls(budget_s: float = MAIN_CALL_BUDGET_S) -> int:
    return engine().run_main_calls(budget_s)


def render_current_file(**options: Any) -> str:
    """In Blender: save a copy of the open file and queue a ``blender.render`` job on
    it; returns the job id. Takes ``blender.render``'s params (``frame``,
    ``frame_start``, ``frame_end``, ``scene``, ``output_dir``, ``format``, ...),
    ``memory_mb`` ("auto" by default) and ``submit``'s options. Needs the add-on
    enabled; outside Blender, submit ``blender.render`` with a saved file instead."""
    if "bpy" not in sys.modules:
        raise RuntimeError(
            "render_current_file needs Blender (there is no open file here); "
            "submit 'blender.render' with blend_file=... instead"
        )
    from .blender import background

    return background.render_current_file(**options)


def render_and_generate(frame_start: Optional[int] = None, frame_end: Optional[int] = None,
                        **options: Any) -> list[str]:
    """In Blender, the built-in pipeline: render the frames in the background, send
    each through a ComfyUI image-to-image workflow (the embedded one unless
    ``workflow_file``), load the results; returns ``[render id, generation ids...]``.
    Takes ``prompt``, ``negative``, ``seed``, ``server``, ``workflow_file``, ``label``,
    ``held`` and ``render_current_file``'s options."""
    if "bpy" not in sys.modules:
        raise RuntimeError("render_and_generate needs Blender; outside it, use tq.submit_many with "
                           "a blender.render job and comfyui.prompt jobs that depend on it")
    from .blender import generate as _generate

    return _generate.render_and_generate(frame_start, frame_end, **options)


def generate(
    workflow_file: Optional[str] = None,
    *,
    prompt: Optional[str] = None,
    negative: Optional[str] = None,
    seed: Optional[int] = None,
    count: int = 1,
    server: Union[str, list, None] = None,
    input_image: Optional[str] = None,
    overrides: Optional[dict] = None,
    **options: Any,
) -> list[str]:
    """Queue ``count`` ComfyUI generations of an API-format workflow (the embedded
    text-to-image one if None) and return their job ids.

    ``prompt``/``negative`` replace the workflow's prompt texts and ``seed`` its
    seed (found in the graph: the text nodes feeding a sampler, the sampler's
    seed); job i gets ``seed + i`` (a random start when None, written into the
    params so a retry makes the same image). ``input_image`` is a local image
    uploaded to the workflow's LoadImage node. ``overrides`` sets any other input
    (``{"5.inputs.width": 768}``). Other keywords are ``submit``'s options
    (``priority``, ``label``, ...) or ``comfyui.prompt`` params (``outputs``,
    ``token_env``). The whole batch is queued or none of it.
    """
    from .kinds import comfyui

    if server is None and "bpy" in sys.modules:  # in Blender: the preferences' servers
        try:
            from .blender import generate as _generate

            server = _generate._servers(None)
        except Exception:  # the add-on is not enabled: the default server
            server = None
    submit_keys = {"priority", "label", "timeout", "max_retries", "memory_mb", "held", "depends_on",
                   "not_before"}
    submit_options = {k: options.pop(k) for k in list(options) if k in submit_keys}
    batch = comfyui.generation_params(
        workflow_file, prompt=prompt, negative=negative, seed=seed, count=count, server=server,
        input_image=input_image, overrides=overrides, **options,
    )
    label = submit_options.pop("label", None) or (prompt or "generation")[:40]
    return engine().submit_many([
        {"kind": comfyui.KIND, "params": p, "label": f"{label} · {i + 1}/{count}" if count > 1 else label,
         **submit_options}
        for i, p in enumerate(batch)
    ])
