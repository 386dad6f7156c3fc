"""Helpers for tests that need the real ``bpy`` module (Blender as a Python module).

``bpy`` 5.0.1 needs its own Python 3.11 and is far too big to install into the
test venv, so these tests run it in a SUBPROCESS: the interpreter named by the
environment variable ``TASKQUEUE_BPY_PYTHON`` (``bash scripts/setup_bpy.sh``
makes one in ``.venv-bpy`` and prints its path). Without it, they are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

BPY_PYTHON_ENV = "TASKQUEUE_BPY_PYTHON"
REPORT_PREFIX = "TASKQUEUE-REPORT "


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


def run_in_bpy(
    python: Path, script: Path, *args: str, timeout: float = 300.0
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run ``script`` with the bpy Python; return the JSON report it printed and the process.

    The script prints one line ``TASKQUEUE-REPORT {json}``; everything else it
    (and Blender) prints is kept in the process output for failure messages.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BLENDER_"))}
    proc = subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    reports = [line[len(REPORT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(REPORT_PREFIX)]
    if proc.returncode != 0 or len(reports) != 1:
        pytest.fail(
            f"{script.name} exited {proc.returncode} with {len(reports)} report(s)\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return json.loads(reports[0]), proc


BpyRunner = Callable[..., Any]


@pytest.fixture(scope="session")
def run_bpy(bpy_python_path: Path) -> BpyRunner:
    """``run_bpy(script, *args)``: :func:`run_in_bpy` with the bpy Python (skips without one)."""

    def run(script: Path, *args: str, timeout: float = 300.0) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
        return run_in_bpy(bpy_python_path, script, *args, timeout=timeout)

    return run
