#!/usr/bin/env bash
# The tests: installs what they need from the project's own files, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/engine -x`).
set -euo pipefail
source "$(dirname "$0")/_venv.sh" test
cd "$ROOT"
exec "$VPY" -m pytest "$@"
