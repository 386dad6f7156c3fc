"""ComfyUI generations in the real add-on (bpy 5.0.1), against the fake ComfyUI
server of scripts/comfyui_fake.py on 127.0.0.1. Run by test_comfyui_bpy.py as
``python bpy_comfyui.py SCENARIO EXTENSION.zip FOLDER``; prints one JSON report.
The shared helpers (boot, pump, prefs, op) are bpy_scenarios.py's.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
import bpy_scenarios as S  # noqa: E402
import comfyui_fake  # noqa: E402

SECRET = "tq-secret-7f3a9c"


def scenario_generate(folder: str) -> dict[str, Any]:
    S.boot()
    bpy, tq = S.bpy, S.tq
    out: dict[str, Any] = {}
    fake = comfyui_fake.FakeComfyUI(root=Path(folder) / "comfy", step_s=0.01, steps=4).start()
    try:
        prefs = S.prefs()
        prefs.comfyui_servers = fake.url
        prefs.comfyui_token = SECRET  # a preference: sent to the server, never stored with a job
        gen = bpy.context.scene.taskqueue_generate
        gen.prompt, gen.random_seed, gen.seed, gen.count = "a red barn", False, 40, 3
        out["generate"] = S.op(bpy.ops.taskqueue.generate)
        ids = [i.id for i in tq.jobs() if i.kind == "comfyui.prompt"]
        out["waited"] = tq.wait(ids, timeout=S.WAIT_S)
        infos = [tq.get(i) for i in ids]
        out["states"] = [i.state.value for i in infos]
        out["errors"] = [i.error.message if i.error else None for i in infos]
        out["seeds"] = sorted(s["prompt"]["3"]["inputs"]["seed"] for s in fake.submissions)
        out["texts"] = sorted({s["prompt"]["6"]["inputs"]["text"] for s in fake.submissions})
        out["auth"] = sorted({h.get("Authorization", "") for h in fake.headers_seen})
        names = [n for i in infos for n in (i.result or {}).get("datablocks", [])]
        out["datablocks"] = names
        out["images"] = {n: list(bpy.data.images[n].size) for n in names if n in bpy.data.images}
        out["image_files"] = [bpy.path.abspath(bpy.data.images[n].filepath) for n in names]
        out["panel_newest"] = S.sub("blender.generate").newest_generation().id
        out["last_id"] = ids[-1] if ids else None
        # Open in an Image Editor: the bpy module has no window, so the operator must
        # say so, not crash.
        out["open_image"] = S.op(bpy.ops.taskqueue.open_image, image=names[0]) if names else None
        # The token is in no file of the queue and not in the saved .blend.
        blend = Path(folder) / "gen.blend"
        tq.flush()
        bpy.ops.wm.save_as_mainfile(filepath=str(blend))
        out["secret_in_blend"] = SECRET.encode() in blend.read_bytes()
        state_dir = Path(tq.engine().sidecar_path).parent
        out["secret_in_state"] = [str(p) for p in state_dir.rglob("*")
                                  if p.is_file() and SECRET.encode() in p.read_bytes()]
        out["secret_in_params"] = SECRET in json.dumps([dict(i.params) for i in infos])
        # A remote server while Online Access is off: refused at submit.
        bpy.context.preferences.system.use_online_access = False
        S.pump().tick()
        try:
            tq.generate(server="http://192.0.2.10:8188", prompt="x")
            out["remote_offline"] = "accepted"
        except Exception as exc:
            out["remote_offline"] = f"{type(exc).__name__}: {exc}"
        # A bad workflow file through the panel's operator: a clear error, nothing queued.
        bad = Path(folder) / "ui.json"
        bad.write_text(json.dumps({"nodes": [], "links": []}))
        gen.workflow_file = str(bad)
        before = len(tq.jobs())
        out["bad_workflow"] = S.op(bpy.ops.taskqueue.generate)
        out["bad_workflow_queued"] = len(tq.jobs()) - before
    finally:
        fake.stop()
    return out


def scenario_pipeline(folder: str) -> dict[str, Any]:
    """The built-in pipeline: render frames -> img2img per frame -> images in Blender."""
    S.boot()
    bpy, tq = S.bpy, S.tq
    panel = S.sub("blender.panel")
    out: dict[str, Any] = {}
    scene = bpy.context.scene
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.frame_start, scene.frame_end = 1, 2
    scene.render.filepath = os.path.join(folder, "frames", "shot_")
    bpy.ops.wm.save_as_mainfile(filepath=os.path.join(folder, "shot.blend"))
    fake = comfyui_fake.FakeComfyUI(root=Path(folder) / "comfy", step_s=0.01, steps=3).start()
    try:
        S.prefs().comfyui_servers = fake.url
        # Held: the generations wait for the render, and say so.
        render, *gens = tq.render_and_generate(prompt="as watercolour", seed=3, held=True, memory_mb=None)
        S.pump().tick()
        out["held_depends"] = [list(tq.get(g).depends_on) == [render] for g in gens]
        tq.pause()  # nothing starts: the generations stay waiting on the render
        tq.release([render, *gens])
        out["waiting_texts"] = [panel.progress_text(tq.get(g)) for g in gens]
        out["waiting_short"] = panel.short_progress_text(tq.get(gens[0]))
        out["row_label"] = panel.row_label(tq.get(gens[0]))
        out["cancel"] = S.op(bpy.ops.taskqueue.cancel, job_id=render, with_dependents=True)
        out["cancelled"] = [tq.get(i).state.value for i in (render, *gens)]
        tq.resume()
        # Through the Generate panel: Input "Render Frames".
        gen = scene.taskqueue_generate
        gen.input_source, gen.prompt, gen.random_seed, gen.seed = "FRAMES", "as watercolour", False, 7
        out["generate"] = S.op(bpy.ops.taskqueue.generate)
        ids = [j.id for j in tq.jobs() if j.id not in (render, *gens)]
        out["waited"] = tq.wait(ids, timeout=S.WAIT_S * 4)
        infos = [tq.get(i) for i in ids]
        out["kinds"] = sorted(i.kind for i in infos)
        out["states"] = [i.state.value for i in infos]
        out["errors"] = [i.error.message if i.error else None for i in infos]
        out["uploads"] = sorted(fake.uploads)
        out["datablocks"] = sorted(n for i in infos for n in (i.result or {}).get("datablocks", [])
                                   if i.kind == "comfyui.prompt")
        out["loaded"] = [n in bpy.data.images for n in out["datablocks"]]
    finally:
        fake.stop()
    return out


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}

if __name__ == "__main__":
    try:
        name, S.ZIP, *args = sys.argv[1:]
        report = SCENARIOS[name](*args)
        print(S.REPORT_PREFIX + json.dumps(report, default=repr), flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(2)
    sys.exit(0)
