"""The add-on's running parts: its engine, its pump, and the console alias.

``start()`` runs from ``register()``; ``stop()`` from ``unregister()`` undoes all
of it in reverse. One engine per process: if one already runs (another copy of
the package made it), the add-on adopts it instead of making a second queue.
"""

from __future__ import annotations

import atexit
import sys
from typing import Any, Optional

import bpy

from .. import api
from ..engine import Engine, KindSpec
from ..engine.shared import shared
from . import preferences
from .pump import Pump

CONSOLE_NAME = "blender_taskqueue"  # `import blender_taskqueue as tq` in Blender's console

_pump: Optional[Pump] = None
_owned: Optional[Engine] = None  # the engine this add-on created (and must shut down)
_alias: Optional[Any] = None


def engine() -> Engine:
    if _pump is None:
        raise RuntimeError("Task Queue is not running (enable the add-on)")
    return _pump.engine


def pump() -> Optional[Pump]:
    return _pump


def _online_check(spec: KindSpec, params: dict) -> Optional[str]:
    if _pump is not None and not _pump.online_access and spec.goes_online(params):
        return (
            f"job kind {spec.name!r} goes online with these params, but Blender's "
            "'Allow Online Access' is off (Preferences > System > Network)"
        )
    return None


def start() -> None:
    global _pump, _owned, _alias
    from ..kinds import comfyui, demo, process, render  # noqa: F401  (registers the built-in kinds)

    prefs = preferences.preferences()
    if prefs is not None:  # before the engine starts: a recovered render needs the chosen Blender
        render.set_default_blender(bpy.path.abspath(prefs.blender_path) if prefs.blender_path else None)
    existing = api.shared_engine_or_none()
    if existing is not None and existing.is_running:
        eng = existing
        if prefs is not None:
            eng.configure(**prefs.engine_changes())
    else:
        config = prefs.engine_config() if prefs is not None else None
        eng = Engine(config)
        eng.start()
        api.set_engine(eng)
        _owned = eng
        atexit.register(_shutdown_at_exit)
    eng.submit_check = _online_check
    _pump = Pump(eng)
    _pump.online_access = bool(getattr(bpy.app, "online_access", True))
    eng.main_tick = _pump.tick
    shared().pump = _pump.tick
    _pump.start()
    if prefs is not None:
        prefs.apply_addon_settings()
    from . import background

    background.sweep_copies(eng)  # copies left by renders of earlier sessions that are gone
    package = sys.modules[preferences.BASE_PACKAGE]
    if sys.modules.setdefault(CONSOLE_NAME, package) is package:
        _alias = package


def stop() -> None:
    global _pump, _owned, _alias
    if _alias is not None and sys.modules.get(CONSOLE_NAME) is _alias:
        del sys.modules[CONSOLE_NAME]
    _alias = None
    pump_, _pump = _pump, None
    if pump_ is not None:
        pump_.stop()
        pump_.clear_rows()
        if shared().pump == pump_.tick:
            shared().pump = None
        pump_.engine.main_tick = None
        pump_.engine.submit_check = None
    from ..kinds import render

    render.set_default_blender(None)
    owned, _owned = _owned, None
    if owned is not None:
        atexit.unregister(_shutdown_at_exit)
        if api.shared_engine_or_none() is owned:
            api.set_engine(None)
        owned.shutdown(wait=True, timeout=3.0)


def _shutdown_at_exit() -> None:
    """Blender quits without unregistering add-ons: still write the queue cleanly."""
    if _owned is not None:
        _owned.shutdown(wait=True, timeout=2.0)


def poke() -> None:
    """Refresh the panel now (after an operator), not at the next timer tick."""
    if _pump is not None:
        _pump.tick()


def selected_job_id() -> str:
    if _pump is None:
        return ""
    wm = bpy.context.window_manager
    state = wm.taskqueue  # type: ignore[union-attr]
    rows = state.jobs
    if 0 <= state.active_index < len(rows):
        return rows[state.active_index].job_id
    return ""


def select(job_id: str) -> None:
    if _pump is not None:
        _pump.select(job_id)


def dismiss_recovery() -> None:
    if _pump is not None:
        _pump.mirror.recovery = None
