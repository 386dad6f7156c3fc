"""The demo inside real Blender (bpy 5.0.1 as a Python module).

Run by scripts/demo.sh with the bpy venv's python, twice:

* ``--phase main``: installs the built extension with Blender's own installer
  into a temporary profile, submits a mixed batch through the console API
  (``import blender_taskqueue as tq``), two ComfyUI generations through the
  Generate section (against scripts/comfyui_fake.py on 127.0.0.1), cancels one
  job with the panel's operator, shows the queue in the terminal as the panel shows it (the same
  labels, progress texts and counts), queues three more jobs on a paused queue
  and saves a .blend.
* ``--phase reopen``: a fresh profile, as on another machine: installs the
  extension, opens that .blend. Its jobs come back held (a file never starts jobs
  by itself), are released, and run.

The bpy module has no event loop, so ``tq.wait`` and ``tq.pump`` drive the pump.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _isolate() -> Path:
    """A throwaway profile: Blender's user folders and the XDG folders (queue, logs)."""
    root = Path(tempfile.mkdtemp(prefix="taskqueue-demo-profile-"))
    os.environ["BLENDER_USER_RESOURCES"] = str(root / "blender")
    for var in ("XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        os.environ[var] = str(root / var.lower())
    return root


def _install(zip_path: Path) -> object:
    import bpy

    result = bpy.ops.extensions.package_install_files(
        filepath=str(zip_path), repo="user_default", enable_on_install=True
    )
    if "FINISHED" not in result:
        raise SystemExit(f"demo: Blender could not install {zip_path}: {result}")
    import blender_taskqueue as tq  # the console alias the add-on provides

    return tq


def _show(tq: object, started: float, tty: bool, drawn: int) -> int:
    """Print the queue as the panel shows it; returns the lines drawn."""
    from bl_ext.user_default.blender_taskqueue.blender import panel, runtime  # type: ignore

    pump = runtime.pump()
    mirror = pump.mirror
    stats = mirror.stats
    lines = []
    if stats is not None:
        lines.append(
            f"Running {stats.running}/{stats.max_workers}  Queued {stats.queued - stats.held}"
            + (f" +{stats.held} held" if stats.held else "")
            + f"  Done {stats.completed}  Failed {stats.failed + stats.interrupted}"
            + f"  t={time.monotonic() - started:4.1f}s"
        )
    for job_id in mirror.order:
        info = mirror.info(job_id)
        if info is None:
            continue
        bar = int(round((1.0 if info.state.value == "completed" else info.progress) * 20))
        lines.append(
            f"  [{panel.state_icon(info):<9}] {panel.row_label(info)[:28]:<28} "
            f"{'█' * bar}{'░' * (20 - bar)} {panel.progress_text(info)[:40]}"
        )
    if tty:
        if drawn:
            sys.stdout.write(f"\x1b[{drawn}F")
        sys.stdout.write("\n".join(f"{line}\x1b[K" for line in lines) + "\n")
        sys.stdout.flush()
        return len(lines)
    return 0


def phase_main(zip_path: Path, blend: Path) -> int:
    _isolate()
    tq = _install(zip_path)
    import bpy

    from bl_ext.user_default.blender_taskqueue.kinds.demo import DEMO_BATCH, external_jobs  # type: ignore

    print(f"Installed the extension into Blender {bpy.app.version_string} (bpy module).")
    print("import blender_taskqueue as tq; tq.submit_many(DEMO_BATCH) ...\n")

    @tq.job_kind("demo.add_empties")
    def add_empties(ctx: object, params: dict) -> dict:
        """Touches bpy the sanctioned way: on the main thread, through the pump."""
        names = []
        for i in range(params["count"]):
            ctx.progress(i / params["count"], stage=f"empty {i + 1}/{params['count']}")
            names.append(ctx.call_on_main(lambda i=i: bpy.data.objects.new(f"TQ_Empty_{i}", None).name))
            ctx.sleep(0.1)
        return {"objects": names}

    ids = tq.submit_many(DEMO_BATCH)
    ids.append(tq.submit("demo.add_empties", {"count": 5}, label="Add empties (main thread)"))
    # Real programs: an external tool (process.run), and this very file rendered by a
    # background Blender (blender.render) through the panel's "Render in Background".
    ids += tq.submit_many(external_jobs(sys.executable))
    scene = bpy.context.scene
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y = 160, 90
    scene.frame_start, scene.frame_end = 1, 8
    scene.render.filepath = str(blend.parent / "renders" / "demo_")  # where F12 would write too
    bpy.ops.taskqueue.render_in_background(frames="RANGE", format="PNG")
    from bl_ext.user_default.blender_taskqueue.blender import runtime  # type: ignore

    render_id = runtime.selected_job_id()
    ids.append(render_id)
    # AI generation, the product's main job: two ComfyUI generations through the
    # Generate section, against the protocol-faithful ComfyUI server that the tests
    # use (scripts/comfyui_fake.py), on 127.0.0.1 (a real ComfyUI is the same URL).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfyui_fake

    comfy = comfyui_fake.FakeComfyUI(step_s=0.05, steps=12).start()
    prefs = bpy.context.preferences.addons["bl_ext.user_default.blender_taskqueue"].preferences
    prefs.comfyui_servers = comfy.url
    gen = scene.taskqueue_generate
    gen.prompt, gen.random_seed, gen.seed, gen.count = "a lighthouse in a storm", False, 7, 2
    bpy.ops.taskqueue.generate()
    generations = [i.id for i in tq.jobs() if i.kind == "comfyui.prompt"]
    ids += generations
    # A pipeline (the Generate section's "Render Frames" input, here from the console):
    # render frames 1-3 in the background, then each frame through an image-to-image
    # workflow once the render is done, the results loaded into Blender.
    pipeline = tq.render_and_generate(1, 3, prompt="the same shot as a watercolour", seed=11,
                                      label="Watercolour", memory_mb=None,
                                      output_dir=str(blend.parent / "renders" / "pipeline"))
    ids += pipeline
    turntable = ids[5]
    tty = sys.stdout.isatty()
    started = time.monotonic()
    drawn = 0
    cancelled = False
    last_print = 0.0
    while not tq.wait(ids, timeout=0.1):
        if not cancelled and tq.get(turntable).progress >= 0.15:
            bpy.ops.taskqueue.cancel(job_id=turntable)  # the panel's Cancel button
            cancelled = True
        if tty:
            drawn = _show(tq, started, tty, drawn)
        elif time.monotonic() - last_print >= 1.0:
            last_print = time.monotonic()
            stats = tq.stats()
            print(f"  t={last_print - started:4.1f}s running {stats.running} queued {stats.queued} "
                  f"done {stats.completed} failed {stats.failed} cancelled {stats.cancelled}")
    tq.pump()
    _show(tq, started, True, drawn if tty else 0)
    print()
    for info in tq.jobs():
        if info.error is not None:
            print(f"  {info.label}: {info.error.type}: {info.error.message} (stage {info.error.stage})")
    render = tq.get(render_id)
    if render.result:
        files = render.result["files"]
        print(f"\nBackground render (Blender {render.result['blender']}): {len(files)} frames in "
              f"{render.result['output_dir']}; this Blender stayed free while it ran.")
    for info in (tq.get(i) for i in generations):
        if info.result:
            print(f"\nComfyUI generation '{info.label}': prompt {info.result['prompt_id']} on "
                  f"{info.result['server']} -> {', '.join(Path(f).name for f in info.result['files'])}, "
                  f"loaded as image(s) {', '.join(info.result.get('datablocks') or [])}")
    steps = [tq.get(i) for i in pipeline]
    print(f"\nPipeline: {steps[0].label} -> {len(steps) - 1} image-to-image generations, each after it "
          f"({', '.join(i.state.value for i in steps)}); images "
          + ", ".join(n for i in steps[1:] for n in (i.result or {}).get("datablocks", [])))
    print(f"ComfyUI saw {len(comfy.submissions)} prompt(s) for {len(generations) + len(steps) - 1} "
          "generation job(s).")
    comfy.stop()
    made = sorted(o.name for o in bpy.data.objects if o.name.startswith("TQ_Empty_"))
    print(f"\nObjects made on the main thread: {', '.join(made)}")

    tq.pause()
    later = tq.submit_many(
        [
            {"kind": "demo.render", "label": f"Overnight shot {n}", "params": {"frames": 6, "seconds_per_frame": 0.05}}
            for n in (1, 2, 3)
        ]
    )
    # A chain, kept with its edges in the .blend: the comp runs only after the plate.
    later += tq.pipeline([
        ("demo.render", {"frames": 4, "seconds_per_frame": 0.05}, {"label": "Overnight plate"}),
        ("demo.render", {"frames": 4, "seconds_per_frame": 0.05}, {"label": "Overnight comp (after the plate)"}),
    ])
    tq.pump()
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    print(f"\nPaused the queue, queued {len(later)} more jobs, saved {blend}")
    with open(blend.with_suffix(".ids"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(later))
    return 0


def phase_reopen(zip_path: Path, blend: Path) -> int:
    _isolate()
    tq = _install(zip_path)
    import bpy

    bpy.ops.wm.open_mainfile(filepath=str(blend))
    expected = blend.with_suffix(".ids").read_text(encoding="utf-8").split()
    from bl_ext.user_default.blender_taskqueue.blender import runtime  # type: ignore

    recovery = runtime.pump().mirror.recovery
    held = [i for i in tq.jobs() if i.held]
    print(f"\nOpened {blend.name} in a fresh profile: {recovery.summary if recovery else 'nothing restored'}")
    print(f"Held (waiting for the go-ahead): {', '.join(i.label for i in held)}")
    if sorted(i.id for i in held) != sorted(expected):
        print(f"demo: expected the saved jobs {expected} back held, got {[i.id for i in held]}")
        return 1
    print("Releasing them (the panel's Resume button) ...")
    bpy.ops.taskqueue.release()
    if not tq.wait(expected, timeout=60):
        print("demo: the restored jobs did not finish")
        return 1
    for info in (tq.get(i) for i in expected):
        print(f"  {info.label}: {info.state.value}")
    plate, comp = (tq.get(i) for i in expected[-2:])
    if comp.depends_on != (plate.id,) or (comp.started_at or 0) < (plate.finished_at or 1e18):
        print("demo: the chain saved in the .blend did not run in order")
        return 1
    print(f"  '{comp.label}' started {comp.started_at - plate.finished_at:.2f} s after the plate ended: "
          "the chain came back from the .blend with its edge")
    return 0


def main() -> int:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    parser = argparse.ArgumentParser(prog="demo_bpy.py")
    parser.add_argument("--phase", choices=("main", "reopen"), required=True)
    parser.add_argument("--zip", type=Path, required=True)
    parser.add_argument("--blend", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.phase == "main":
        return phase_main(args.zip, args.blend)
    return phase_reopen(args.zip, args.blend)


if __name__ == "__main__":
    sys.exit(main())
