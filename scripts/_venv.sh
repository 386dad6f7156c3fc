# Sourced by demo.sh and test.sh: make .venv (once) and install the project into it.
# Usage: source scripts/_venv.sh [EXTRAS]   e.g. "test"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${TASKQUEUE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
extras="${1:-}"
spec="$ROOT"
[ -n "$extras" ] && spec="$ROOT[$extras]"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
VPY="$VENV/bin/python"
