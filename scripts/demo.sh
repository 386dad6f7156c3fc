#!/usr/bin/env bash
# The demo: a mixed batch of jobs (renders, generation calls, a failure, a timeout,
# a retry, a cancel) with live progress in the terminal.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec "$VPY" -m blender_taskqueue demo "$@"
