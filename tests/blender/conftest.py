"""Helpers for tests that need the real ``bpy`` module (Blender as a Python module).

``bpy`` 5.0.1 needs its own Python 3.11 and is far too big to install into the
test venv, so these tests run it in a SUBPROCESS: the interpreter named by the
environment variable ``TASKQUEUE_BPY_PYTHON`` (``bash scripts/setup_bpy.sh``
makes one in ``.venv-bpy`` and prints its path). Without it, they are skipped.

Every such process gets a throw-away Blender profile and throw-away XDG folders
(the engine keeps its queue and log where platformdirs says), never the real
home's. ``linux_zip`` is the extension zip, built once per session;
``scenario(name, *args)`` runs one scenario of ``bpy_scenarios.py`` once per
session and returns its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

BPY_PYTHON_ENV = "TASKQUEUE_BPY_PYTHON"
REPORT_PREFIX = "TASKQUEUE-REPORT "
ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build_extension.py"
_MANIFEST = tomllib.loads((ROOT / "blender_manifest.toml").read_text(encoding="utf-8"))
ZIP_NAME = f"{_MANIFEST['id']}-{_MANIFEST['version']}-linux_x64.zip"
EXIT_NETWORK = 3  # build_extension.py: the package index cannot be reached
# A bpy process gets its own Blender profile and XDG folders: the engine keeps its
# queue and log in platformdirs' folders, which must never be the real home's.
PROFILE_VARS = ("BLENDER_USER_RESOURCES", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")


def bpy_python() -> Path | None:
    """The Python with bpy named by ``TASKQUEUE_BPY_PYTHON``, or None if unset."""
    value = os.environ.get(BPY_PYTHON_ENV, "").strip()
    return Path(value) if value else None


@pytest.fixture(scope="session")
def bpy_python_path() -> Path:
    """The Python that has bpy; skips the test with the reason when there is none."""
    path = bpy_python()
    if path is None:
        pytest.skip(
            f"{BPY_PYTHON_ENV} is not set: run `bash scripts/setup_bpy.sh` and export "
            f"{BPY_PYTHON_ENV}=<the python it prints> to run tests against real bpy"
        )
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"{BPY_PYTHON_ENV}={path} is not an executable file")
    return path


def profile_env(home: Path) -> dict[str, str]:
    """The environment for a bpy process whose every user folder lies under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BLENDER_", "XDG_"))}
    env["HOME"] = str(home)
    for name in PROFILE_VARS:
        folder = home / name.lower()
        folder.mkdir(parents=True, exist_ok=True)
        env[name] = str(folder)
    return env


def run_in_bpy(
    python: Path, script: Path, *args: str, timeout: float = 300.0, home: Optional[Path] = None,
    check: bool = True,
) -> tuple[Optional[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """Run ``script`` with the bpy Python; return the JSON report it printed and the process.

    The script prints one line ``TASKQUEUE-REPORT {json}``; everything else it
    (and Blender) prints is kept in the process output for failure messages.
    The process runs in a throw-away profile (see :func:`profile_env`) under
    ``home``, or under a temporary folder removed afterwards. With ``check``
    (the default) a non-zero exit, a missing report or a timeout fails the test;
    without it the report is None when there is none.
    """
    with tempfile.TemporaryDirectory(prefix="taskqueue-bpy-") as scratch:
        env = profile_env(home if home is not None else Path(scratch))
        try:
            proc = subprocess.run(
                [str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
            pytest.fail(
                f"{script.name} {' '.join(args[:1])} did not finish within {timeout:g} s (killed)\n"
                f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}"
            )
    reports = [line[len(REPORT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(REPORT_PREFIX)]
    if check and (proc.returncode != 0 or len(reports) != 1):
        pytest.fail(
            f"{script.name} exited {proc.returncode} with {len(reports)} report(s)\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return (json.loads(reports[0]) if len(reports) == 1 else None), proc


BpyRunner = Callable[..., Any]


@pytest.fixture(scope="session")
def run_bpy(bpy_python_path: Path) -> BpyRunner:
    """``run_bpy(script, *args)``: :func:`run_in_bpy` with the bpy Python (skips without one)."""

    def run(script: Path, *args: str, **kwargs: Any) -> tuple[Optional[dict[str, Any]], subprocess.CompletedProcess[str]]:
        return run_in_bpy(bpy_python_path, script, *args, **kwargs)

    return run


# ---------------------------------------------------------------------------
# The extension zip, built once per session


def run_build(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )


@pytest.fixture(scope="session")
def linux_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Build the linux-x64 zip once: (zip path, what the script printed).

    Downloads missing pinned wheels into build/wheel-cache (skipped, with the
    reason, when the package index cannot be reached).
    """
    out = tmp_path_factory.mktemp("dist")
    proc = run_build("--out", str(out), "--platform", "linux-x64")
    if proc.returncode == EXIT_NETWORK:
        pytest.skip(f"cannot download the pinned wheels, the package index is out of reach:\n{proc.stderr[-1500:]}")
    assert proc.returncode == 0, f"build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out / ZIP_NAME, proc.stdout


@pytest.fixture(scope="session")
def linux_zip(linux_build: tuple[Path, str]) -> Path:
    return linux_build[0]


# ---------------------------------------------------------------------------
# Scenarios in the real add-on (bpy_scenarios.py), each in its own process, run once


SCENARIOS_SCRIPT = Path(__file__).with_name("bpy_scenarios.py")
Scenario = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def scenario(bpy_python_path: Path, linux_zip: Path) -> Scenario:
    """``scenario(name, *args)``: the report of ``bpy_scenarios.py name zip *args``.

    Each distinct call runs once per session in a fresh bpy process with its own
    profile; later tests asking for the same scenario share its report (and its
    failure).
    """
    done: dict[tuple[str, ...], Any] = {}

    def run(name: str, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        key = (name, *args)
        if key not in done:
            try:
                report, _proc = run_in_bpy(bpy_python_path, SCENARIOS_SCRIPT, name, str(linux_zip), *args,
                                           timeout=timeout)
                done[key] = report
            except BaseException as exc:  # pytest.fail's Failed included: every user sees it
                done[key] = exc
        result = done[key]
        if isinstance(result, BaseException):
            raise result
        return result

    return run
