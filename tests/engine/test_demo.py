"""The headless demo (``python -m blender_taskqueue demo``, the fallback of
scripts/demo.sh) runs its whole batch, real programs included, and exits cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def test_the_headless_demo_runs_every_kind(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "blender_taskqueue", "demo", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = proc.stdout.split("\nFinal:\n", 1)[1]
    rows = {line[4:26].strip(): line for line in final.splitlines() if line.startswith("  ") and line[2] != " "}
    assert "completed" in rows["Encode preview (extern"], "process.run with progress"
    assert "failed" in rows["Broken tool (fails)"]
    assert "error: input.mov is not a video file" in final, "the failure shows the tool's stderr"
    assert "cancelled" in rows["Turntable"] and "completed" in rows["Hero shot"]
    if shutil.which("blender"):
        assert "completed" in rows["Background render (Ble"], final
        assert "'files': '8 (frame_0001.png … frame_0008.png)'" in final
    else:
        assert "no background render in this demo" in proc.stdout
