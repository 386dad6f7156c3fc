"""Install an extension zip with Blender's own installer and report what happened.

Run by a Python that has the ``bpy`` module (not by pytest):

    python bpy_install_extension.py PATH.zip

It prints one line ``TASKQUEUE-REPORT {json}`` and exits 0 unless it could not
even start; the test decides what is right. Steps, each in Blender's own code:

1. ``bpy.ops.extensions.package_install_files`` into the ``user_default`` repo
   (without enabling), in a throw-away ``BLENDER_USER_RESOURCES``;
2. Blender's compatibility check and wheel filter for this system
   (``bl_pkg.manifest_compatible_with_wheel_data_or_error``), then its wheel
   extraction into the shared extensions site-packages
   (``addon_utils._extension_sync_wheels``): the same two calls Blender makes
   for every enabled extension at start-up;
3. imports of the bundled libraries and of ``bl_ext.user_default.blender_taskqueue``;
4. enabling the add-on through ``bpy.ops.preferences.addon_enable`` (which runs
   ``register()``), then disabling it again.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import tempfile
import traceback
from typing import Any

REPO = "user_default"
PKG_ID = "blender_taskqueue"
MODULE = f"bl_ext.{REPO}.{PKG_ID}"
# import name -> distribution name
LIBRARIES = {
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_extensions": "typing-extensions",
    "typing_inspection": "typing-inspection",
    "structlog": "structlog",
    "platformdirs": "platformdirs",
    "psutil": "psutil",
}


def _error(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {ex}".strip()


def main(zip_path: str) -> dict[str, Any]:
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="taskqueue-bpy-")
    import bpy  # first: it puts Blender's script modules (addon_utils, ...) on sys.path

    import addon_utils

    report: dict[str, Any] = {
        "blender": list(bpy.app.version),
        "python": list(sys.version_info[:2]),
        "preloaded": sorted(name for name in LIBRARIES if name in sys.modules),
    }

    # 1. Install, not enabled.
    report["install"] = list(
        bpy.ops.extensions.package_install_files(filepath=zip_path, repo=REPO, enable_on_install=False)
    )
    repo = next(r for r in bpy.context.preferences.extensions.repos if r.module == REPO)
    pkg_dir = os.path.join(repo.directory, PKG_ID)
    report["installed_files"] = sorted(
        os.path.relpath(os.path.join(root, f), pkg_dir).replace(os.sep, "/")
        for root, _, files in os.walk(pkg_dir)
        for f in files
    )

    # Blender's own manifest validator (a plain Python CLI shipped with bl_pkg).
    import bl_pkg

    cli = os.path.join(os.path.dirname(bl_pkg.__file__), "cli", "blender_ext.py")
    validate = subprocess.run([sys.executable, cli, "validate", zip_path], capture_output=True, text=True)
    report["validate"] = {"returncode": validate.returncode, "output": (validate.stdout + validate.stderr).strip()}

    # 2. Compatibility check and wheel filter, then wheel extraction.
    wheel_list: list[tuple[str, list[str]]] = []
    report["compat_error"] = bl_pkg.manifest_compatible_with_wheel_data_or_error(
        os.path.join(pkg_dir, "blender_manifest.toml"), REPO, PKG_ID, repo.directory, wheel_list
    )
    report["wheels_selected"] = sorted(os.path.basename(w) for _, wheels in wheel_list for w in wheels)
    sync_errors: list[str] = []
    local_dir = os.path.join(bpy.utils.user_resource("EXTENSIONS"), ".local")
    sync_kwargs: dict[str, Any] = {"debug": False, "error_fn": lambda ex: sync_errors.append(_error(ex))}
    accepted = inspect.signature(addon_utils._extension_sync_wheels).parameters  # fewer in Blender 4.2.0
    addon_utils._extension_sync_wheels(
        local_dir=local_dir, wheel_list=wheel_list, **{k: v for k, v in sync_kwargs.items() if k in accepted}
    )
    site_packages = os.path.join(local_dir, "lib", "python{:d}.{:d}".format(*sys.version_info[:2]), "site-packages")
    report["sync_errors"] = sync_errors
    report["site_packages"] = site_packages
    report["site_packages_in_sys_path"] = site_packages in sys.path

    # 3. Imports.
    imports: dict[str, Any] = {}
    for name, dist in LIBRARIES.items():
        try:
            module = importlib.import_module(name)
            imports[name] = {"file": module.__file__, "version": importlib.metadata.version(dist)}
        except Exception as ex:
            imports[name] = {"error": _error(ex)}
    try:
        native = importlib.import_module("pydantic_core._pydantic_core")
        imports["pydantic_core._pydantic_core"] = {"file": native.__file__}
    except Exception as ex:
        imports["pydantic_core._pydantic_core"] = {"error": _error(ex)}
    report["imports"] = imports
    try:
        tq = importlib.import_module(MODULE)
        report["package"] = {
            "file": tq.__file__,
            "bl_info_blender": list(tq.bl_info["blender"]),
            "job_states": [s.value for s in tq.JobState],
        }
    except Exception:
        report["package"] = {"error": traceback.format_exc(limit=3)}

    # 4. Enable (runs register()), then disable.
    try:
        result = bpy.ops.preferences.addon_enable(module=MODULE)
        report["enable"] = {"result": list(result)}
    except Exception as ex:
        report["enable"] = {"error": _error(ex)}
    report["enabled"] = MODULE in bpy.context.preferences.addons
    if report["enabled"]:
        try:
            addon_utils.disable(MODULE, default_set=True)
            report["disabled_cleanly"] = True
        except Exception as ex:
            report["disabled_cleanly"] = _error(ex)
    return report


if __name__ == "__main__":
    result = main(sys.argv[1])
    print("TASKQUEUE-REPORT " + json.dumps(result), flush=True)
