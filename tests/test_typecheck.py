"""The type check: ``bash scripts/typecheck.sh`` runs mypy over the package, the
Blender layer against fake-bpy-module stubs, in a venv of its own (.venv-types;
never this one, which must see no ``bpy``). The first run installs mypy and the
stubs there; later runs reuse them. Set TASKQUEUE_SKIP_TYPECHECK=1 to skip it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_ENV = "TASKQUEUE_SKIP_TYPECHECK"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    bool(os.environ.get(SKIP_ENV)), reason=f"{SKIP_ENV} is set: the mypy type check is skipped"
)
def test_typecheck_passes() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "typecheck.sh")],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=570,
    )
    assert proc.returncode == 0, (
        f"scripts/typecheck.sh exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    assert "Success: no issues found" in proc.stdout
