#!/usr/bin/env bash
# Type-check the package with mypy, the Blender layer (blender_taskqueue/blender/)
# against fake-bpy-module stubs for Blender 5.0. Exits non-zero when mypy reports
# errors. Extra arguments go to mypy (e.g. `bash scripts/typecheck.sh --no-incremental`).
#
# The stubs give type checkers a module named `bpy` (some fake-bpy-module releases
# as an importable package), so they live in their own venv, .venv-types (override
# with TASKQUEUE_TYPES_VENV): never in .venv (the tests, which must see no bpy) nor
# in .venv-bpy (the real bpy 5.0.1).
# Re-running is cheap: a venv that already has the pinned versions and this
# pyproject.toml installed is kept, and mypy's cache lives in the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${TASKQUEUE_TYPES_VENV:-$ROOT/.venv-types}"
VPY="$VENV/bin/python"
# Exact pins: a new stub or mypy release must not turn the check red by itself.
MYPY_VERSION="2.4.1"
STUBS_NAME="fake-bpy-module-5-0"  # the stubs built from Blender 5.0 (our bpy is 5.0.1)
STUBS_VERSION="20260730"
STAMP="$VENV/.typecheck-installed"

for other in "$ROOT/.venv" "$ROOT/.venv-bpy" "${TASKQUEUE_VENV:-}" "${TASKQUEUE_BPY_VENV:-}"; do
    if [ -n "$other" ] && [ -d "$other" ] && [ -d "$VENV" ] && [ "$VENV" -ef "$other" ]; then
        echo "typecheck: refusing to put bpy stubs into $VENV (the test or bpy venv)" >&2
        exit 2
    fi
done

# What the venv must hold: the pins, and the project as pyproject.toml now says.
want="$MYPY_VERSION $STUBS_NAME==$STUBS_VERSION $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"

is_installed() {
    [ -x "$VPY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] || return 1
    "$VPY" - "$MYPY_VERSION" "$STUBS_NAME" "$STUBS_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
mypy, stubs, stubs_version = sys.argv[1:]
sys.exit(not (md.version("mypy") == mypy and md.version(stubs) == stubs_version
              and md.version("blender-taskqueue")))
EOF
}

if ! is_installed; then
    echo "typecheck: installing mypy $MYPY_VERSION, $STUBS_NAME $STUBS_VERSION and the project into $VENV" >&2
    [ -x "$VPY" ] || "$PY" -m venv "$VENV"
    if "$VPY" -c 'import importlib.metadata as md; md.version("bpy")' >/dev/null 2>&1; then
        echo "typecheck: $VENV has the real bpy installed; use a venv of its own" >&2
        exit 2
    fi
    rm -f "$STAMP"
    "$VPY" -m pip install --quiet --disable-pip-version-check \
        -e "$ROOT" "mypy==$MYPY_VERSION" "$STUBS_NAME==$STUBS_VERSION" >&2
    echo "$want" >"$STAMP"
fi

cd "$ROOT"
# The config is pyproject.toml's [tool.mypy] (found from the working directory); it
# makes a missing bpy stub an error, so the check cannot pass with bpy taken as Any.
exec "$VPY" -m mypy --cache-dir "$VENV/mypy-cache" "$@" blender_taskqueue/
