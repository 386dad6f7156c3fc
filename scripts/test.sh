#!/usr/bin/env bash
# The tests: installs what they need from the project's own files, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/engine -x`).
# Tests marked `blender` run inside real bpy 5.0.1, set up in .venv-bpy by
# scripts/setup_bpy.sh (a large download the first time). Set TASKQUEUE_SKIP_BPY=1
# to skip that; in CI (CI=true) a failed bpy setup fails the run.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
cd "$ROOT"
if [ -z "${TASKQUEUE_BPY_PYTHON:-}" ] && [ -z "${TASKQUEUE_SKIP_BPY:-}" ]; then
    if bpy_python="$(bash scripts/setup_bpy.sh)"; then
        export TASKQUEUE_BPY_PYTHON="$bpy_python"
    elif [ -n "${CI:-}" ]; then
        echo "test.sh: bpy setup failed" >&2
        exit 1
    else
        echo "test.sh: bpy setup failed; tests marked 'blender' will be skipped" >&2
    fi
fi
exec "$VPY" -m pytest "$@"
