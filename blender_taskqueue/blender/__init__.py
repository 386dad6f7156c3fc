"""The Blender layer: the only part of the package that imports bpy.

``register()`` registers the classes in order, then starts the engine, the pump
timer and the file handlers; ``unregister()`` undoes it all in reverse, so
enabling and disabling the add-on any number of times leaves nothing behind.
"""

from __future__ import annotations

from . import generate, handlers, operators, panel, preferences, props, runtime, statusbar

_modules = (props, preferences, operators, panel, generate, statusbar)


def register() -> None:
    for module in _modules:
        module.register()
    runtime.start()
    handlers.register()


def unregister() -> None:
    handlers.unregister()
    runtime.stop()
    for module in reversed(_modules):
        module.unregister()
