#!/usr/bin/env bash
# The demo, inside real Blender: builds the extension zip, installs it into
# Blender-as-a-module (bpy 5.0.1, set up in .venv-bpy on first use) in a temporary
# profile, runs a mixed batch through the console API with the panel's view of it
# in the terminal, saves a .blend, and reopens it in a fresh profile.
# Without bpy (no Python 3.11 here) it falls back to the bpy-free engine demo.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
out="$ROOT/build/demo"
mkdir -p "$out"
if ! "$VPY" scripts/build_extension.py --out "$out" --platform linux-x64 --offline >/dev/null 2>&1; then
    "$VPY" scripts/build_extension.py --out "$out" --platform linux-x64 >/dev/null
fi
zip="$(ls "$out"/blender_taskqueue-*-linux_x64.zip | head -n 1)"
if ! bpy_python="$(bash scripts/setup_bpy.sh)"; then
    echo "demo: bpy 5.0.1 is not available here; running the engine demo without Blender" >&2
    exec "$VPY" -m blender_taskqueue demo "$@"
fi
blend="$out/demo-queue.blend"
rm -f "$blend" "$out/demo-queue.ids"
"$bpy_python" scripts/demo_bpy.py --phase main --zip "$zip" --blend "$blend"
"$bpy_python" scripts/demo_bpy.py --phase reopen --zip "$zip" --blend "$blend"
