"""Trust by path and the release dialog in the real add-on (bpy 5.0.1). Run by
test_trust_bpy.py as ``python bpy_trust.py SCENARIO EXTENSION.zip ARGS...``;
prints one JSON report. The shared helpers (boot, prefs, op, sub) are
bpy_scenarios.py's.

``save FOLDER`` saves FOLDER/untrusted/queue.blend holding two queued demo jobs
and a held ``blender.render`` job with ``trusted: true``. ``open BLEND MODE``
opens it in a fresh profile with Auto Run on and auto-resume on, and MODE saying
what Excluded Paths hold: ``folder`` (the file's folder), ``prefix`` (a string
prefix of it, no trailing slash), ``glob`` (a pattern), ``none``; ``off`` turns
Auto Run off instead.
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
import bpy_scenarios as S  # noqa: E402

# A param far longer than a sidebar line, or the old 80-character cut.
LONG = "/".join(f"a-rather-long-folder-name-{n}" for n in range(10))


def scenario_save(folder: str) -> dict[str, Any]:
    S.boot()
    bpy, tq = S.bpy, S.tq
    target = Path(folder) / "untrusted"
    target.mkdir(parents=True, exist_ok=True)
    blend = str(target / "queue.blend")
    out: dict[str, Any] = {"blend": blend, "long": LONG}
    # A script that registers itself on load: whether it ran is Blender's own verdict
    # on the file's trust, to hold ours against.
    probe = bpy.data.texts.new("tq_trust_probe.py")
    probe.write("import builtins\nbuiltins.tq_trust_probe_ran = True\n")
    probe.use_module = True
    out["first_save"] = S.op(bpy.ops.wm.save_as_mainfile, filepath=blend)  # the render needs the file to exist
    tq.pause()  # saved queued, never run here
    out["demo"] = [tq.submit("demo.render", {"frames": 1, "seconds_per_frame": 0}, label=f"demo {n}")
                   for n in range(2)]
    out["render"] = tq.submit("blender.render", {"blend_file": blend, "frame": 1, "trusted": True,
                                                 "output_dir": str(Path(folder) / LONG)},
                              label="render with its scripts", held=True)
    out["save"] = S.op(bpy.ops.wm.save_as_mainfile, filepath=blend)
    out["trusted_here"] = S.sub("blender.handlers").file_is_trusted()
    return out


def scenario_open(blend: str, mode: str) -> dict[str, Any]:
    S.boot()
    bpy, tq = S.bpy, S.tq
    prefs = bpy.context.preferences
    S.prefs().auto_resume = True
    prefs.filepaths.use_scripts_auto_execute = mode != "off"
    folder = os.path.dirname(blend)
    entry = {"folder": (folder + os.sep, False), "prefix": (folder[:-3], False),
             "glob": (os.path.dirname(folder) + os.sep + "untr*", True)}.get(mode)
    if entry is not None:
        path = prefs.autoexec_paths.new()
        path.path, path.use_glob = entry
    out: dict[str, Any] = {"excluded": [[p.path, p.use_glob] for p in prefs.autoexec_paths]}
    out["open"] = S.op(bpy.ops.wm.open_mainfile, filepath=blend)
    handlers = S.sub("blender.handlers")
    out["file_is_trusted"] = handlers.file_is_trusted()
    import builtins

    out["blender_ran_its_script"] = bool(getattr(builtins, "tq_trust_probe_ran", False))
    out["blender_autoexec_fail"] = bool(bpy.app.autoexec_fail)
    out["our_rule"] = S.sub("blender.trust").is_trusted(
        bpy.data.filepath, prefs.filepaths.use_scripts_auto_execute,
        [(p.path, p.use_glob) for p in prefs.autoexec_paths], windows=sys.platform == "win32")
    out["jobs"] = {i.id: {"held": i.held, "state": i.state.value, "kind": i.kind} for i in tq.jobs()}
    render = next(i for i in tq.jobs() if i.kind == "blender.render")
    out["render_trusted"] = render.params.get("trusted")
    demo = [i.id for i in tq.jobs() if i.kind == "demo.render"]
    if mode == "folder":
        out.update(_release(demo, render.id))
    else:
        unheld = [i for i in demo if not tq.get(i).held]
        out["waited"] = tq.wait(unheld, timeout=S.WAIT_S) if unheld else None
        out["final"] = {i: tq.get(i).state.value for i in demo}
    tq.cancel(render.id)  # never render here
    return out


def _release(demo: list[str], render_id: str) -> dict[str, Any]:
    bpy, tq = S.bpy, S.tq
    ops = S.sub("blender.operators")
    out: dict[str, Any] = {}
    # What the dialog shows: the kind's whole description, lines wrapped, nothing cut.
    lines = ops.what_will_run([tq.get(render_id)])
    out["will_run"] = lines
    wrapped = ops.wrap_lines(lines, ops.RELEASE_DIALOG_CHARS)
    out["wrapped_max"] = max(len(line) for line in wrapped)
    squash = "".join("".join(lines).split())
    out["wrapped_keeps_everything"] = "".join("".join(wrapped).split()) == squash
    # The text block, for reading it all in the Text Editor.
    out["details"] = S.op(bpy.ops.taskqueue.release_details, job_id=render_id)
    text = bpy.data.texts.get(ops.RELEASE_TEXT_NAME)
    out["text"] = text.as_string() if text is not None else None
    # A script's release (execute, no dialog): only the named job.
    out["release_one"] = S.op(bpy.ops.taskqueue.release, job_id=demo[0])
    out["held_after_one"] = {i: tq.get(i).held for i in (*demo, render_id)}
    # The dialog's confirm: exactly the jobs it showed.
    out["release_shown"] = S.op(bpy.ops.taskqueue.release, shown_ids=json.dumps([demo[1]]))
    out["held_after_shown"] = {i: tq.get(i).held for i in (*demo, render_id)}
    out["discard_one"] = S.op(bpy.ops.taskqueue.discard_held, job_id=render_id)
    out["render_after_discard"] = tq.get(render_id).state.value
    out["discard_not_held"] = S.op(bpy.ops.taskqueue.discard_held, job_id=demo[0])
    out["waited"] = tq.wait(demo, timeout=S.WAIT_S)
    out["final"] = {i: tq.get(i).state.value for i in demo}
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
