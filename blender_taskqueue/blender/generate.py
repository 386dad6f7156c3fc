"""The "Generate" section of the Task Queue tab: ComfyUI generations from Blender.

Pick a workflow (the embedded text-to-image one by default), edit the prompt
and seed (found in the workflow automatically), choose how many to queue, and
optionally send the last render or an image as the input image. Each
generation is a ``comfyui.prompt`` job: it runs on a worker thread, and when it
finishes its images are loaded as image datablocks on the main thread; the
section shows the newest one and opens it in an Image Editor.

The settings live on the Scene (``scene.taskqueue_generate``), so they travel
with the .blend; they hold no secret (the token is a preference, in memory for
the kind, never in a job or a file). A .blend from elsewhere can only preset
these fields: nothing runs until the user presses Generate.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import bpy

from ..engine import JobState
from ..kinds import comfyui
from . import runtime
from .pump import CATEGORY

INPUTS = [
    ("NONE", "None", "Text to image: no input image"),
    ("RENDER", "Last Render", "Send the last render result as the input image"),
    ("IMAGE", "Image", "Send an image datablock as the input image"),
    ("FRAMES", "Render Frames",
     "A pipeline: render the scene's frame range in the background, then send each frame "
     "through the workflow (image to image; the embedded one if none is picked), then load the results"),
]
MAX_PIPELINE_FRAMES = 1000


def render_and_generate(
    frame_start: Optional[int] = None,
    frame_end: Optional[int] = None,
    *,
    workflow_file: Optional[str] = None,
    prompt: Optional[str] = None,
    negative: Optional[str] = None,
    seed: Optional[int] = None,
    server: Any = None,
    label: Optional[str] = None,
    held: bool = False,
    **render_options: Any,
) -> list[str]:
    """The built-in pipeline: a background render of frames ``frame_start``..``frame_end``
    (the scene's range by default), then one ComfyUI image-to-image generation per
    frame that waits for the render and takes its frame, then the images loaded
    into Blender. Returns ``[render id, generation ids...]``. The generations are
    checked before anything is queued; the render waits (held) until they are
    queued, so a refusal leaves no half pipeline running."""
    scene: Any = bpy.context.scene
    start = int(scene.frame_start if frame_start is None else frame_start)
    end = int(scene.frame_end if frame_end is None else frame_end)
    if not 1 <= end - start + 1 <= MAX_PIPELINE_FRAMES:
        raise ValueError(f"frames {start}..{end}: a pipeline takes 1 to {MAX_PIPELINE_FRAMES} frames")
    if server is None:  # the servers of the add-on's preferences, as the Generate button uses
        server = _servers(bpy.context)
    batch = comfyui.generation_params(
        workflow_file or str(comfyui.IMG2IMG_WORKFLOW), prompt=prompt, negative=negative, seed=seed,
        count=end - start + 1, server=server, input_from_previous=True,
    )
    from . import background

    queue = runtime.engine()
    render_id = background.render_current_file(frame_start=start, frame_end=end, held=True, **render_options)
    name = label or (prompt or "img2img")[:30]
    try:
        ids = queue.submit_many([
            {"kind": comfyui.KIND, "params": p, "label": f"{name} · frame {start + i}",
             "depends_on": [render_id], "held": held}
            for i, p in enumerate(batch)
        ])
    except BaseException:
        queue.cancel(render_id)
        raise
    if not held:
        queue.release([render_id])
    runtime.poke()
    return [render_id, *ids]


def load_images(paths: list[str]) -> list[str]:
    """Load ``paths`` as image datablocks (main thread); return their names."""
    names = []
    for path in paths:
        if not path.lower().endswith(comfyui.INPUT_SUFFIXES):
            continue
        image = bpy.data.images.load(path, check_existing=True)
        image.reload()  # the same path may hold a newer generation
        names.append(image.name)
    return names


def _servers(context: Any) -> Optional[list[str]]:
    from . import preferences

    prefs = preferences.preferences(context)
    text = getattr(prefs, "comfyui_servers", "") if prefs is not None else ""
    servers = [s.strip() for s in text.replace("\n", ",").split(",") if s.strip()]
    return servers or None


def input_image_path(context: Any, settings: Any) -> Optional[str]:
    """The file to upload as the input image, writing one where needed."""
    if settings.input_source == "NONE":
        return None
    if settings.input_source == "RENDER":
        image = bpy.data.images.get("Render Result")
        if image is None or not image.has_data and not _render_has_pixels(image):
            raise ValueError("there is no render yet: render first (F12), or pick an image")
    else:
        image = settings.input_image
        if image is None:
            raise ValueError("pick the input image")
        path = bpy.path.abspath(image.filepath) if image.filepath else ""
        if path and os.path.isfile(path) and not image.is_dirty and path.lower().endswith(comfyui.INPUT_SUFFIXES):
            return path
    folder = Path(tempfile.gettempdir()) / "blender_taskqueue_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="input-", suffix=".png", dir=folder)
    os.close(fd)
    if settings.input_source == "RENDER":
        image.save_render(name, scene=context.scene)
    else:
        image.save_render(name)
    return name


def _render_has_pixels(image: Any) -> bool:
    try:
        return bool(image.size[0] and image.size[1])
    except Exception:
        return False


class TASKQUEUE_PG_generate(bpy.types.PropertyGroup):
    workflow_file: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Workflow",
        description="An API-format ComfyUI workflow (ComfyUI: Workflow > Export (API)); "
        "empty: the embedded text-to-image workflow",
        subtype="FILE_PATH", default="",
    )
    prompt: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Prompt", description="The positive prompt text", default="a castle on a hill at dawn",
    )
    negative: bpy.props.StringProperty(  # type: ignore[valid-type]
        name="Negative", description="The negative prompt text (empty: the workflow's own)", default="",
    )
    seed: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Seed", description="The first job's seed; each further job adds one", default=0, min=0,
    )
    random_seed: bpy.props.BoolProperty(  # type: ignore[valid-type]
        name="Random Seed", description="A new random seed for each batch", default=True,
    )
    count: bpy.props.IntProperty(  # type: ignore[valid-type]
        name="Count", description="Generations to queue, with consecutive seeds", default=1, min=1, max=64,
    )
    input_source: bpy.props.EnumProperty(name="Input", items=INPUTS, default="NONE")  # type: ignore[valid-type]
    input_image: bpy.props.PointerProperty(name="Input Image", type=bpy.types.Image)  # type: ignore[valid-type]


class TASKQUEUE_OT_generate(bpy.types.Operator):
    """Queue ComfyUI generations with this prompt and seed"""

    bl_idname = "taskqueue.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}

    def execute(self, context: Any) -> set[str]:
        settings = context.scene.taskqueue_generate
        if settings.input_source == "FRAMES":
            try:
                ids = render_and_generate(
                    workflow_file=bpy.path.abspath(settings.workflow_file) if settings.workflow_file else None,
                    prompt=settings.prompt or None, negative=settings.negative or None,
                    seed=None if settings.random_seed else int(settings.seed), server=_servers(context),
                )
            except Exception as exc:
                self.report({"ERROR"}, f"Generate: {exc}")
                return {"CANCELLED"}
            runtime.select(ids[-1])
            self.report({"INFO"}, f"Queued a render and {len(ids) - 1} generation(s) after it")
            return {"FINISHED"}
        try:
            image = input_image_path(context, settings)
            batch = comfyui.generation_params(
                bpy.path.abspath(settings.workflow_file) if settings.workflow_file else None,
                prompt=settings.prompt or None,
                negative=settings.negative or None,
                seed=None if settings.random_seed else int(settings.seed),
                count=int(settings.count),
                server=_servers(context),
                input_image=image,
            )
            ids = runtime.engine().submit_many(
                [{"kind": comfyui.KIND, "params": p, "label": _label(settings, p)} for p in batch])
        except Exception as exc:  # bad workflow, no render, refused by the engine: say which
            self.report({"ERROR"}, f"Generate: {exc}")
            return {"CANCELLED"}
        runtime.select(ids[-1])
        runtime.poke()
        self.report({"INFO"}, f"Queued {len(ids)} generation(s)")
        return {"FINISHED"}


def _label(settings: Any, params: dict) -> str:
    seed = next((v for k, v in params["overrides"].items() if k.endswith(comfyui.SEED_INPUTS)), None)
    text = (settings.prompt or "generation")[:40]
    return f"{text} · seed {seed}" if seed is not None else text


class TASKQUEUE_OT_open_image(bpy.types.Operator):
    """Show this image in an Image Editor (a new window if none is open)"""

    bl_idname = "taskqueue.open_image"
    bl_label = "Open Image"

    image: bpy.props.StringProperty(name="Image")  # type: ignore[valid-type]

    def execute(self, context: Any) -> set[str]:
        image = bpy.data.images.get(self.image)
        if image is None:
            self.report({"ERROR"}, f"no image named {self.image!r}")
            return {"CANCELLED"}
        for window in context.window_manager.windows:
            for area in window.screen.areas:
                if area.type == "IMAGE_EDITOR":
                    area.spaces.active.image = image
                    area.tag_redraw()
                    return {"FINISHED"}
        before = set(context.window_manager.windows[:])
        bpy.ops.wm.window_new()
        new = [w for w in context.window_manager.windows if w not in before]
        if not new:
            self.report({"ERROR"}, "could not open a window for the Image Editor")
            return {"CANCELLED"}
        area = new[0].screen.areas[0]
        area.type = "IMAGE_EDITOR"
        area.spaces.active.image = image
        return {"FINISHED"}


def newest_generation() -> Any:
    """The newest finished ``comfyui.prompt`` job in the pump's mirror, or None."""
    pump = runtime.pump()
    if pump is None:
        return None
    mirror = pump.mirror
    newest = None
    for job_id in mirror.order:
        info = mirror.info(job_id)
        if info is not None and info.kind == comfyui.KIND and info.state is JobState.COMPLETED and (
                newest is None or (info.finished_at or 0) > (newest.finished_at or 0)):
            newest = info
    return newest


class VIEW3D_PT_taskqueue_generate(bpy.types.Panel):
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = CATEGORY
    bl_label = "Generate"
    bl_parent_id = "VIEW3D_PT_taskqueue"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: Any) -> None:
        layout: Any = self.layout
        settings = context.scene.taskqueue_generate
        col = layout.column()
        col.prop(settings, "workflow_file", text="")
        frames = settings.input_source == "FRAMES"
        if not settings.workflow_file:
            col.label(text="Embedded image-to-image workflow" if frames else
                      "Embedded text-to-image workflow", icon="NODETREE")
        col.prop(settings, "prompt", text="")
        col.prop(settings, "negative", text="Negative")
        row = col.row(align=True)
        row.prop(settings, "random_seed", text="", icon="FILE_REFRESH")
        sub = row.row(align=True)
        sub.enabled = not settings.random_seed
        sub.prop(settings, "seed")
        if not frames:
            col.prop(settings, "count")
        col.prop(settings, "input_source")
        if frames:
            scene = context.scene
            n = scene.frame_end - scene.frame_start + 1
            col.label(text=f"Render {scene.frame_start}-{scene.frame_end}, then {n} generation(s)",
                      icon="LINKED")
        if settings.input_source == "IMAGE":
            col.template_ID(settings, "input_image", open="image.open")
        servers = _servers(context) or [comfyui.DEFAULT_SERVER]
        col.label(text=f"Server: {servers[0]}" + (f" +{len(servers) - 1}" if len(servers) > 1 else ""),
                  icon="URL")
        col.operator("taskqueue.generate", icon="RENDER_STILL",
                     text="Render, then Generate" if frames else
                     f"Generate {settings.count}" if settings.count > 1 else "Generate")
        info = newest_generation()
        names = (info.result or {}).get("datablocks") if info is not None and isinstance(info.result, dict) else None
        if names:
            box = layout.box()
            box.label(text=info.label, icon="IMAGE_DATA")
            image = bpy.data.images.get(names[0])
            if image is not None:
                try:
                    preview = image.preview_ensure()
                    box.template_icon(icon_value=preview.icon_id, scale=6.0)
                except Exception:  # no previews in background mode
                    pass
                box.operator("taskqueue.open_image", icon="WINDOW").image = image.name
            if len(names) > 1:
                box.label(text=f"and {len(names) - 1} more image(s)")


classes = (TASKQUEUE_PG_generate, TASKQUEUE_OT_generate, TASKQUEUE_OT_open_image,
           VIEW3D_PT_taskqueue_generate)
_register_classes: Callable[[], None]
_unregister_classes: Callable[[], None]
_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)  # type: ignore[func-returns-value, misc]


def register() -> None:
    _register_classes()
    bpy.types.Scene.taskqueue_generate = bpy.props.PointerProperty(type=TASKQUEUE_PG_generate)  # type: ignore[attr-defined, func-returns-value]
    comfyui.image_loader = load_images


def unregister() -> None:
    if comfyui.image_loader is load_images:
        comfyui.image_loader = None
    del bpy.types.Scene.taskqueue_generate  # type: ignore[attr-defined]
    _unregister_classes()
