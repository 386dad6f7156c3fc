"""Importing the package needs no bpy and does nothing: no threads, no atexit hooks,
no engine, no files.

Each test imports in a fresh interpreter where ``bpy`` (and Blender's other
modules) cannot be imported, either because a ``bpy.py`` that raises ImportError
comes first on ``sys.path`` or because a meta path finder refuses them and
records every attempt, so even a guarded ``try: import bpy`` is seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

# The package in this checkout (not whatever copy another test may have imported);
# the children import it from here too.
REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIR = REPO / "blender_taskqueue"
BLENDER_MODULES = [
    "bpy",
    "bpy_types",
    "bpy_extras",
    "mathutils",
    "bmesh",
    "gpu",
    "bgl",
    "blf",
    "aud",
]

CHILD = """
import atexit, importlib, json, pkgutil, sys, threading
from pathlib import Path

mode, modules, home = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
blocked = set(json.loads(sys.argv[4]))
attempts = []

class BlockBlender:
    # Refuses Blender's modules and records every attempt to import one.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

if mode == "finder":
    sys.meta_path.insert(0, BlockBlender())

# The fake bpy.py raises ImportError; make sure it is what `import bpy` finds here.
try:
    import bpy  # noqa: F401
    print(json.dumps({"error": "bpy imported"}))
    sys.exit(0)
except ImportError:
    pass
attempts.clear()

# Third-party and stdlib modules may have import-time effects of their own (logging
# registers an atexit hook): import them first, so only this package is measured.
for dep in ["logging", "logging.handlers", "queue", "pydantic", "structlog", "psutil", "platformdirs"]:
    importlib.import_module(dep)

registered = []
_register = atexit.register
def recording_register(fn, *args, **kwargs):
    registered.append(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}")
    return _register(fn, *args, **kwargs)
atexit.register = recording_register

started_threads = []
_start = threading.Thread.start
def recording_start(self):
    started_threads.append(self.name)
    return _start(self)
threading.Thread.start = recording_start

threads_before = threading.active_count()
names_before = sorted(t.name for t in threading.enumerate())
atexit_before = atexit._ncallbacks()
home_before = sorted(str(p) for p in home.rglob("*"))

imported = []

def import_tree(module):
    # Every submodule, except the Blender layer (the only bpy user). Not
    # pkgutil.walk_packages: it imports every subpackage to recurse, the Blender one too.
    for info in pkgutil.iter_modules(module.__path__, module.__name__ + "."):
        if info.name.startswith("blender_taskqueue.blender"):
            continue
        sub = importlib.import_module(info.name)
        imported.append(info.name)
        if info.ispkg:
            import_tree(sub)

for name in modules:
    module = importlib.import_module(name)
    imported.append(name)
    if hasattr(module, "__path__"):
        import_tree(module)

from blender_taskqueue.engine.shared import shared
state = shared()
print(json.dumps({
    "package_file": sys.modules["blender_taskqueue"].__file__,
    "imported": sorted(set(imported)),
    "attempts": attempts,
    "blender_in_sys_modules": sorted(m for m in sys.modules if m.split(".")[0] in blocked),
    "threads_before": threads_before,
    "threads_after": threading.active_count(),
    "thread_names": sorted(t.name for t in threading.enumerate()),
    "names_before": names_before,
    "atexit_added": atexit._ncallbacks() - atexit_before,
    "atexit_registered": registered,
    "threads_started": started_threads,
    "engine_created": state.engine is not None,
    "new_files": sorted(set(str(p) for p in home.rglob("*")) - set(home_before)),
}), flush=True)
"""


# The pure-Python subpackages: engine/, and the built-in kinds (jobs/, renamed kinds/).
PURE_SUBPACKAGES = ["blender_taskqueue.engine"] + [
    f"blender_taskqueue.{name}"
    for name in ("kinds", "jobs")
    if (PACKAGE_DIR / name / "__init__.py").exists()
]


def _modules() -> list[str]:
    names = ["blender_taskqueue", "blender_taskqueue.api", *PURE_SUBPACKAGES]
    return list(dict.fromkeys(names))


def _run(tmp_path: Path, mode: str, modules: list[str]) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        XDG_STATE_HOME=str(home / "state"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
    )
    fake = tmp_path / "fake_blender"
    fake.mkdir()
    for name in BLENDER_MODULES:
        (fake / f"{name}.py").write_text(
            f"raise ImportError('{name} is not available outside Blender (test stub)')\n"
        )
    env["PYTHONPATH"] = os.pathsep.join([str(fake), str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            mode,
            json.dumps(modules),
            str(home),
            json.dumps(BLENDER_MODULES),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr
    report = json.loads(lines[-1])
    assert "error" not in report, report
    return report


@pytest.mark.parametrize("mode", ["stub", "finder"])
def test_package_imports_without_bpy_and_starts_nothing(tmp_path, mode) -> None:
    modules = _modules()
    report = _run(tmp_path, mode, modules)
    assert Path(report["package_file"]).resolve().parent == PACKAGE_DIR.resolve(), report
    assert set(modules) <= set(report["imported"]), report
    assert any(m.startswith("blender_taskqueue.engine.") for m in report["imported"])
    assert report["blender_in_sys_modules"] == [], report
    if mode == "finder":
        assert report["attempts"] == [], (
            f"something tried to import Blender modules: {report['attempts']}"
        )
    assert report["threads_after"] == report["threads_before"], report["thread_names"]
    assert report["thread_names"] == report["names_before"], report
    assert report["threads_started"] == [], report
    assert report["atexit_registered"] == [] and report["atexit_added"] == 0, report
    assert report["engine_created"] is False, "importing created the shared engine"
    assert report["new_files"] == [], f"importing wrote files: {report['new_files']}"


@pytest.mark.parametrize("module", PURE_SUBPACKAGES)
def test_subpackage_imports_on_its_own_without_bpy(tmp_path, module) -> None:
    """``engine`` and the built-in kinds are the pure-Python rooms: importing either
    first (not via the package's ``__init__`` re-exports) still needs no Blender module."""
    report = _run(tmp_path, "finder", [module])
    assert report["attempts"] == [], report
    assert report["threads_after"] == report["threads_before"], report["thread_names"]
    assert report["threads_started"] == [], report
    assert report["atexit_registered"] == [] and report["atexit_added"] == 0, report
    assert report["new_files"] == []


def test_blender_layer_is_not_imported_by_the_package(tmp_path) -> None:
    """``import blender_taskqueue`` must not pull in ``blender_taskqueue.blender``
    (register() imports it lazily)."""
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import json, sys\n"
        "import blender_taskqueue, blender_taskqueue.api, blender_taskqueue.engine\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('blender_taskqueue.blender'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={
            **os.environ,
            "HOME": str(home),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
