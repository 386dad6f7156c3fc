#!/usr/bin/env bash
# Make .venv-bpy: a Python 3.11 venv with bpy 5.0.1 (Blender as a Python module),
# for the tests marked `blender`. Prints the venv's python path, and only that,
# on stdout (progress goes to stderr), so CI can do:
#
#   export TASKQUEUE_BPY_PYTHON="$(bash scripts/setup_bpy.sh)"
#
# bpy 5.0.1 ships wheels for CPython 3.11 only. Override the interpreter with
# BPY_BASE_PYTHON=/path/to/python3.11 and the folder with TASKQUEUE_BPY_VENV.
# Re-running is cheap: an existing venv that already imports bpy 5.0.1 is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BPY_VERSION="5.0.1"
BASE_PY="${BPY_BASE_PYTHON:-python3.11}"
VENV="${TASKQUEUE_BPY_VENV:-$ROOT/.venv-bpy}"
VPY="$VENV/bin/python"

has_bpy() {
    "$VPY" - "$BPY_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata, sys
sys.exit(importlib.metadata.version("bpy") != sys.argv[1])
EOF
}

if ! [ -x "$VPY" ] || ! has_bpy; then
    if ! command -v "$BASE_PY" >/dev/null 2>&1; then
        echo "setup_bpy: $BASE_PY not found; bpy $BPY_VERSION needs CPython 3.11 (set BPY_BASE_PYTHON)" >&2
        exit 1
    fi
    if ! "$BASE_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "setup_bpy: $BASE_PY is not Python 3.11; bpy $BPY_VERSION needs CPython 3.11" >&2
        exit 1
    fi
    echo "setup_bpy: making $VENV with bpy==$BPY_VERSION (a large download)" >&2
    [ -x "$VPY" ] || "$BASE_PY" -m venv "$VENV"
    "$VPY" -m pip install --quiet --disable-pip-version-check "bpy==$BPY_VERSION" >&2
fi

# bpy needs a few X11/GL client libraries even when headless.
if ! "$VPY" -c 'import bpy' >/dev/null 2>&1; then
    "$VPY" -c 'import bpy' >&2 || true
    echo "setup_bpy: bpy is installed but does not import; on Debian/Ubuntu try:" >&2
    echo "  apt-get install libx11-6 libxrender1 libxfixes3 libxi6 libxkbcommon0 libsm6 libxext6 libgl1" >&2
    exit 1
fi
echo "$VPY"
