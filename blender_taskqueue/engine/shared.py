"""Process-wide state shared by every copy of this package.

In Blender the add-on is ``bl_ext.<repo>.blender_taskqueue``, yet a script may
also import a ``blender_taskqueue`` found elsewhere on ``sys.path``. Both copies
must see one kinds registry and one engine, never two queues. The state lives
in a tiny module object in ``sys.modules`` under a fixed name, which both copies
find. Creating it has no side effects beyond that entry.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

_NAME = "_blender_taskqueue_shared"


def shared() -> Any:
    mod = sys.modules.get(_NAME)
    if mod is None:
        fresh = types.ModuleType(_NAME, __doc__)
        fresh.lock = threading.RLock()  # type: ignore[attr-defined]
        fresh.registry = None  # type: ignore[attr-defined]
        fresh.engine = None  # type: ignore[attr-defined]
        fresh.pump = None  # type: ignore[attr-defined]  # set by the Blender layer
        mod = sys.modules.setdefault(_NAME, fresh)
    return mod
