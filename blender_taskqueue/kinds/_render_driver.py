"""Runs inside the background Blender that ``blender.render`` starts.

Not imported by the add-on: Blender runs this file with ``--python`` (or a Python
that has the ``bpy`` module runs it directly, with ``"open": true`` so it opens
the .blend itself, its scripts off unless the job is ``trusted``). Its one
argument, after ``--``, is a JSON object made by ``render.driver_args``, or the
path of a file that holds it. It talks back
through stdout lines that start with ``TASKQUEUE `` followed by a JSON object
with an ``event``:

* ``plan``: the frames it will render, the scene, the engine, the file extension;
* ``skip``: a frame whose file already exists and is kept (resume, no overwrite);
* ``frame``: a frame starts (``index`` of ``total``);
* ``saved``: a frame's file is complete on disk;
* ``error``: what went wrong (then the process exits with code 3).

Every frame is saved to a hidden temporary name and renamed into place, so a
file with a frame's final name is always complete: that is what makes resuming
from the first missing frame safe after a crash.

Runs on Blender's own Python (3.10 in Blender 3.4): standard library only, and
nothing newer than 3.10.
"""

import json
import os
import sys
import time
import traceback

TAG = "TASKQUEUE "
ERROR_EXIT = 3
ORPHAN_EXIT = 4


def emit(event, **data):
    data["event"] = event
    sys.stdout.write(TAG + json.dumps(data) + "\n")
    sys.stdout.flush()


class Refused(Exception):
    """A problem with the file or the params, reported without a traceback."""


def frame_path(out, prefix, frame, ext):
    return os.path.join(out, "%s%04d%s" % (prefix, frame, ext))


def setup(bpy, args):
    if args.get("open"):
        # The file's own scripts run only for a trusted job (the Blender child gets
        # --disable-autoexec on its command line instead).
        bpy.ops.wm.open_mainfile(
            filepath=args["blend_file"], load_ui=False, use_scripts=args.get("trusted") is True
        )
    if args.get("scene"):
        scene = bpy.data.scenes.get(args["scene"])
        if scene is None:
            names = ", ".join(repr(s.name) for s in bpy.data.scenes)
            raise Refused("the file has no scene named %r (it has %s)" % (args["scene"], names))
    else:
        scene = bpy.context.scene
    render = scene.render
    if args.get("engine"):
        try:
            render.engine = args["engine"]
        except TypeError:
            raise Refused(
                "render engine %r is not available in this Blender (%s)"
                % (args["engine"], bpy.app.version_string)
            ) from None
    settings = render.image_settings
    if args.get("format"):
        if hasattr(settings, "media_type"):  # Blender 5.0+: still images, not video
            try:
                multilayer = args["format"] == "OPEN_EXR_MULTILAYER"
                settings.media_type = "MULTI_LAYER_IMAGE" if multilayer else "IMAGE"
            except (TypeError, AttributeError):
                pass
        try:
            settings.file_format = args["format"]
        except TypeError:
            raise Refused(
                "image format %r is not available in this Blender" % args["format"]
            ) from None
    elif render.is_movie_format:
        raise Refused(
            "the scene renders to a movie (%s); blender.render writes one image per "
            "frame so it can resume: pass a format such as 'PNG'" % settings.file_format
        )
    if args.get("resolution_percentage"):
        render.resolution_percentage = args["resolution_percentage"]
    if args.get("samples"):
        if render.engine == "CYCLES":
            scene.cycles.samples = args["samples"]
        elif hasattr(scene, "eevee"):
            scene.eevee.taa_render_samples = args["samples"]
    return scene


def plan(scene, args):
    if args.get("frames"):
        return list(args["frames"])
    start = args.get("frame_start")
    end = args.get("frame_end")
    start = scene.frame_start if start is None else start
    end = scene.frame_end if end is None else end
    step = args.get("frame_step") or scene.frame_step or 1
    if end < start:
        raise Refused("the frame range is empty (start %d, end %d)" % (start, end))
    return list(range(start, end + 1, step))


def orphaned(parent):
    """True once the process that started this one is gone (we were re-parented).
    POSIX only: on Windows the parent id never changes, and a dead parent shows as a
    broken stdout pipe at the next report instead."""
    return os.name == "posix" and os.getppid() != parent


def watch_parent(parent):
    """Exit as soon as the parent dies: a crashed Blender must not leave a render
    running that the resumed job would then race. Checked between frames too, in
    case Blender holds Python's lock for the whole of a frame."""
    import threading

    def loop():
        while True:
            time.sleep(0.2)
            if orphaned(parent):
                os._exit(ORPHAN_EXIT)

    threading.Thread(target=loop, name="taskqueue-parent-watch", daemon=True).start()


def fix_relative_outputs(scene, base):
    """Point the compositor's File Output nodes that write to '//' paths at ``base``
    (the user's folder): in a copy saved elsewhere, '//' means the copy's folder, and
    saving a copy does not remap these paths. Returns how many were changed."""
    fixed = 0
    trees = []
    for attr in ("node_tree", "compositing_node_group"):  # the latter: Blender 5.0+
        tree = getattr(scene, attr, None)
        if tree is not None and tree not in trees:
            trees.append(tree)
    for tree in trees:
        for node in tree.nodes:
            if node.bl_idname != "CompositorNodeOutputFile":
                continue
            for attr in ("base_path", "directory"):
                value = getattr(node, attr, None)
                if isinstance(value, str) and value.startswith("//"):
                    setattr(node, attr, os.path.join(base, value[2:]))
                    fixed += 1
    return fixed


def keep_existing(path, args):
    """Whether the frame file at ``path`` is kept instead of rendered again."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_size == 0:
        return False  # never a complete image
    if not args.get("overwrite", True):
        return True
    if path in (args.get("keep") or ()):
        return True  # this job wrote it before it was interrupted
    since = args.get("since")
    return since is not None and st.st_mtime >= since  # written by this job after its last checkpoint


def save_frame(bpy, scene, partial, final):
    """Write the render result to ``partial``, flush it to disk, rename it to ``final``."""
    bpy.data.images["Render Result"].save_render(partial, scene=scene)
    try:
        fd = os.open(partial, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # fsync is best effort (a file system that cannot, a read-only handle)
    for attempt in range(50):  # a viewer or a virus scanner may hold it (Windows)
        try:
            os.replace(partial, final)
            return
        except PermissionError:
            if attempt == 49:
                raise
            time.sleep(0.1)


def main():
    given = sys.argv[sys.argv.index("--") + 1]
    if given.lstrip().startswith("{"):
        args = json.loads(given)
    else:  # a file that holds them (what blender.render passes)
        with open(given, encoding="utf-8") as fh:
            args = json.load(fh)
    parent = os.getppid()  # the job's worker process, not a wrapper that started us
    watch_parent(parent)
    import bpy

    scene = setup(bpy, args)
    fixed = fix_relative_outputs(scene, args["relative_base"]) if args.get("relative_base") else 0
    frames = plan(scene, args)
    out = args["output_dir"]
    prefix = args.get("file_prefix", "frame_")
    ext = scene.render.file_extension
    os.makedirs(out, exist_ok=True)
    emit(
        "plan", frames=frames, scene=scene.name, engine=scene.render.engine, ext=ext,
        output_dir=out, blender=bpy.app.version_string, relative_outputs_fixed=fixed,
    )
    total = len(frames)
    for index, frame in enumerate(frames, 1):
        if orphaned(parent):
            os._exit(ORPHAN_EXIT)
        final = frame_path(out, prefix, frame, ext)
        if keep_existing(final, args):
            emit("skip", frame=frame, index=index, total=total, path=final)
            continue
        emit("frame", frame=frame, index=index, total=total)
        scene.frame_set(frame)
        bpy.ops.render.render(scene=scene.name)
        # Hidden, and per process: two renders of one frame never share a temporary.
        partial = os.path.join(out, ".%s%04d.partial-%d%s" % (prefix, frame, os.getpid(), ext))
        save_frame(bpy, scene, partial, final)
        emit("saved", frame=frame, index=index, total=total, path=final)
    emit("done", frames=total)


def run():
    try:
        main()
    except Refused as exc:
        emit("error", message=str(exc))
        sys.stdout.flush()
        os._exit(ERROR_EXIT)
    except BaseException as exc:  # noqa: BLE001 - report anything, then fail the process
        emit("error", message="%s: %s" % (type(exc).__name__, exc), traceback=traceback.format_exc())
        sys.stdout.flush()
        os._exit(ERROR_EXIT)


if __name__ == "__main__":
    run()
