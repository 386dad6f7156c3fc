"""The built-in ``blender.render`` kind against a real background Blender.

Uses Debian's ``blender`` (3.4, installed by ``.ci/run``); skipped where it is not
on the PATH. The scenes are tiny: Workbench at 48x32 for the quick tests, Cycles
with many samples where a test needs a render to still be running (cancel, crash).
Tests wait on files and job states, never on sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from blender_taskqueue.engine import InvalidParams, JobState
from blender_taskqueue.kinds import render as render_kind

from support import FakeProbe, wait_until

BLENDER = shutil.which("blender")
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(BLENDER is None, reason="needs `blender` on the PATH (apt-get install blender)"),
]
KIND = render_kind.KIND
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLOW = {"engine": "CYCLES", "samples": 3000}  # about 0.8 s a frame on 2 cores

MAKE_SCENES = """
import bpy, sys
out = sys.argv[sys.argv.index("--") + 1]
def setup(scene, start, end):
    r = scene.render
    r.engine = "BLENDER_WORKBENCH"
    r.resolution_x, r.resolution_y, r.resolution_percentage = 48, 32, 100
    scene.frame_start, scene.frame_end = start, end
    scene.cycles.device = "CPU"
    scene.cycles.use_denoising = False
    scene.cycles.use_adaptive_sampling = False
main = bpy.context.scene
setup(main, 1, 6)
alt = main.copy()
alt.name = "Alt"
alt.use_fake_user = True
setup(alt, 10, 11)
movie = main.copy()
movie.name = "Movie"
movie.use_fake_user = True
movie.render.image_settings.file_format = "FFMPEG"
comp = main.copy()
comp.name = "Comp"
comp.use_fake_user = True
comp.use_nodes = True
tree = comp.node_tree
layers = next(n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers")
output = tree.nodes.new("CompositorNodeOutputFile")
output.base_path = "//fo/"
tree.links.new(layers.outputs[0], output.inputs[0])
bpy.ops.wm.save_as_mainfile(filepath=out)
"""


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("scenes")
    script = folder / "make.py"
    script.write_text(MAKE_SCENES)
    path = folder / "tiny.blend"
    subprocess.run(
        [BLENDER, "-b", "--factory-startup", "--python", str(script), "--python-exit-code", "1",
         "--", str(path)],
        check=True, capture_output=True, timeout=60,
    )
    return str(path)


@pytest.fixture
def engine(make_engine, registry, tmp_path):
    render_kind.register(registry)
    return make_engine(max_workers=2, work_dir=tmp_path / "work")


def finish(engine, job_id: str, timeout: float = 60.0):
    assert engine.wait([job_id], timeout=timeout), f"job {job_id} did not finish"
    return engine.get(job_id)


def blender_processes(marker: str) -> list[psutil.Process]:
    """Running processes whose command line mentions ``marker`` (an output folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(p.info["cmdline"] or ()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def frame_files(folder: Path) -> dict[int, Path]:
    return {int(p.stem.split("_")[-1]): p for p in folder.glob("frame_*.png")}


# ---------------------------------------------------------------- rendering


def test_renders_the_scene_range(engine, blend):
    job = engine.submit(KIND, {"blend_file": blend})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    out = engine.workdir_for(job) / "frames"
    expected = [str(out / f"frame_{n:04d}.png") for n in range(1, 7)]
    assert info.result["files"] == expected
    assert info.result["frames"] == [1, 2, 3, 4, 5, 6]
    assert info.result["rendered"] == [1, 2, 3, 4, 5, 6] and info.result["kept"] == []
    assert info.result["engine"] == "BLENDER_WORKBENCH" and info.result["scene"] == "Scene"
    for f in expected:
        assert Path(f).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*partial*")), "temporary frame files left behind"
    assert info.progress == 1.0
    assert info.stage == "frame 6/6"
    assert info.message == f"6 of 6 frames written to {out}"
    log = Path(info.result["log"]).read_text()
    assert '"event": "saved"' in log and "Blender quit" in log
    assert not blender_processes(str(out))


def test_single_frame_scene_format_and_relative_output(engine, blend):
    one = engine.submit(KIND, {"blend_file": blend, "frame": 3, "format": "JPEG",
                               "output_dir": "//renders/one", "file_prefix": "shot_"})
    alt = engine.submit(KIND, {"blend_file": blend, "scene": "Alt", "output_dir": "//renders/alt"})
    info = finish(engine, one)
    assert info.state == JobState.COMPLETED, info.error
    target = Path(blend).parent / "renders" / "one" / "shot_0003.jpg"
    assert info.result["files"] == [str(target)]
    assert target.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    info = finish(engine, alt)
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["frames"] == [10, 11] and info.result["scene"] == "Alt"
    assert sorted(frame_files(Path(blend).parent / "renders" / "alt")) == [10, 11]


def test_progress_is_per_frame_with_stages(engine, blend):
    seen: list[tuple[float, str]] = []

    def record():
        info = engine.get(job)
        if info.stage and (not seen or seen[-1] != (info.progress, info.stage)):
            seen.append((info.progress, info.stage))
        return info.is_terminal

    job = engine.submit(KIND, {"blend_file": blend, "frame_end": 3, "engine": "CYCLES",
                               "samples": 600})
    wait_until(record, timeout=60, what="the render to finish")
    info = engine.get(job)
    assert info.state == JobState.COMPLETED, info.error
    stages = [s for _, s in seen]
    assert "frame 2/3" in stages and stages[-1] == "frame 3/3"
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions), "progress went backwards"
    assert any(0 < f < 1 for f in fractions) and fractions[-1] == 1.0


def test_sample_lines_move_progress_within_a_frame():
    state = render_kind._Progress()
    state.on_line("stdout", 'TASKQUEUE {"event": "plan", "frames": [1, 2, 3, 4]}')
    state.on_line("stdout", 'TASKQUEUE {"event": "frame", "frame": 1, "index": 1, "total": 4}')
    state.on_line("stdout", "Fra:1 Mem:9M | Time:00:00.81 | Scene, ViewLayer | Sample 8/16")
    fraction, stage, message, done = state.view()
    assert (fraction, stage, done) == (0.125, "frame 1/4", 0)
    assert message == "rendering frame 1, sample 8/16"
    state.on_line("stdout", 'TASKQUEUE {"event": "saved", "frame": 1, "index": 1, "total": 4, "path": "/a"}')
    state.on_line("stdout", 'TASKQUEUE {"event": "frame", "frame": 2, "index": 2, "total": 4}')
    state.on_line("stdout", "Fra:2 Mem:9M | Rendering 16 / 64 samples")
    fraction, stage, message, done = state.view()
    assert (fraction, stage, done) == (0.25 + 0.0625, "frame 2/4", 1)
    state.on_line("stdout", "TASKQUEUE {not json")  # ignored, never raises
    assert state.files() == ["/a"]


def test_overwrite_false_keeps_frames_that_exist(engine, blend, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "frame_0002.png").write_bytes(b"an older render")
    job = engine.submit(KIND, {"blend_file": blend, "frame_end": 3, "output_dir": str(out),
                               "overwrite": False})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["kept"] == [2] and info.result["rendered"] == [1, 3]
    assert (out / "frame_0002.png").read_bytes() == b"an older render"
    assert "1 kept from before" in info.message or info.message.startswith("3 of 3")


# ---------------------------------------------------------------- failures


def test_a_missing_scene_fails_with_the_scenes_it_has(engine, blend):
    info = finish(engine, engine.submit(KIND, {"blend_file": blend, "scene": "Nope"}))
    assert info.state == JobState.FAILED
    assert "the file has no scene named 'Nope'" in info.error.message
    assert "'Alt'" in info.error.message and "Log:" in info.error.message
    assert info.error.type == "RenderFailed"


def test_a_movie_scene_needs_an_image_format(engine, blend):
    info = finish(engine, engine.submit(KIND, {"blend_file": blend, "scene": "Movie", "format": None}))
    assert info.state == JobState.FAILED
    assert "renders to a movie (FFMPEG)" in info.error.message
    assert "pass a format such as 'PNG'" in info.error.message


def test_an_unknown_engine_fails_naming_it(engine, blend):
    info = finish(engine, engine.submit(KIND, {"blend_file": blend, "engine": "NO_SUCH_ENGINE"}))
    assert info.state == JobState.FAILED
    assert "render engine 'NO_SUCH_ENGINE' is not available" in info.error.message


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"blend_file": "/no/such/file.blend"}, "does not exist"),
        ({"blend_file": "relative.blend"}, "must be an absolute path"),
        ({"blend_file": __file__}, "is not a .blend file"),
        ({"frame": 2, "frame_start": 1}, "either frame or frame_start/frame_end"),
        ({"frame_start": 5, "frame_end": 2}, "frame_end (2) is before frame_start (5)"),
        ({"output_dir": "renders"}, "must be absolute or start with '//'"),
        ({"output_dir": "//tiny.blend"}, "exists and is not a folder"),
        ({"file_prefix": "a/b"}, "must be a plain file name part"),
        ({"format": "FFMPEG"}, "format"),
        ({"engine": "cycles"}, "engine"),
        ({"samples": 0}, "samples"),
        ({"blender": "/no/such/blender"}, "Blender from the job's 'blender' param"),
        ({"frame_step": 0}, "frame_step"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_params_are_refused_at_submit(engine, blend, change, problem):
    params = {"blend_file": blend, **change}
    before = engine.stats()
    with pytest.raises(InvalidParams) as caught:
        engine.submit(KIND, params)
    assert problem in str(caught.value)
    assert engine.stats().queued == before.queued


def test_no_blender_anywhere_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(render_kind.BLENDER_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "bpy", raising=False)
    render_kind.set_default_blender(None)
    with pytest.raises(ValueError, match="no Blender to render with"):
        render_kind.find_blender()
    tool = tmp_path / "blender"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert render_kind.find_blender() == str(tool)
    monkeypatch.setenv(render_kind.BLENDER_ENV, "/missing/blender")
    with pytest.raises(ValueError, match=r"Blender from \$BLENDER_TASKQUEUE_BLENDER"):
        render_kind.find_blender()


# ---------------------------------------------------------------- cancel, memory, crash


def test_cancel_mid_range_leaves_no_blender_process(engine, blend, tmp_path):
    out = tmp_path / "cancelled"
    job = engine.submit(KIND, {"blend_file": blend, "output_dir": str(out), **SLOW})
    wait_until(lambda: len(frame_files(out)) >= 1, timeout=60, what="the first frame")
    child = engine.get(job).partial_result["child"]
    assert psutil.pid_exists(child["pid"])
    engine.cancel(job)
    info = finish(engine, job, timeout=10)
    assert info.state == JobState.CANCELLED
    assert info.message.startswith("render cancelled;") and str(out) in info.message
    assert not blender_processes(str(out)), "a Blender process outlived the cancel"
    assert is_gone(child["pid"]), "the background Blender still runs"
    files = info.partial_result["files"]
    assert files and all(Path(f).exists() for f in files)


def test_two_big_renders_do_not_start_together(make_engine, registry, blend, tmp_path):
    render_kind.register(registry)
    probe = FakeProbe(available=4096.0)
    engine = make_engine(max_workers=2, work_dir=tmp_path / "work", memory_probe=probe)
    params = {"blend_file": blend, "frame_end": 2}
    first = engine.submit(KIND, params, memory_mb=3000)
    second = engine.submit(KIND, params, memory_mb=3000)
    wait_until(lambda: (engine.get(second).message or "").startswith("waiting for memory"),
               timeout=30, what="the second render to wait for memory")
    assert engine.get(first).state in (JobState.RUNNING, JobState.COMPLETED)
    a, b = finish(engine, first), finish(engine, second)
    assert a.state == b.state == JobState.COMPLETED, (a.error, b.error)
    assert b.started_at >= a.finished_at


CRASH_CHILD = """
import json, sys, threading
from blender_taskqueue import Engine, EngineConfig
from blender_taskqueue.kinds import render  # registers blender.render
state, work, logs, params = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
engine = Engine(EngineConfig(state_dir=state, work_dir=work, log_dir=logs, console_log=False))
engine.start()
job = engine.submit("blender.render", params)
engine.flush()
print("JOB", job, flush=True)
threading.Event().wait()
"""


def test_sigkill_mid_range_then_adopt_resumes_without_rerendering(make_engine, registry, blend, tmp_path):
    out = tmp_path / "frames"
    state, work = tmp_path / "state", tmp_path / "work"
    params = {"blend_file": blend, "output_dir": str(out), **SLOW}
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CRASH_CHILD))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, str(script), str(state), str(work), str(tmp_path / "logs"), json.dumps(params)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = child.stdout.readline()
        assert line.startswith("JOB "), line
        job = line.split()[1]
        wait_until(lambda: len(frame_files(out)) >= 2, timeout=60, what="two frames written")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    # The orphaned background Blender sees its parent die and stops by itself.
    wait_until(lambda: not blender_processes(str(out)), timeout=20,
               what="the orphaned Blender to exit")
    before = {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in frame_files(out).items()}
    assert 2 <= len(before) < 6, f"the crash should land mid-range, found frames {sorted(before)}"

    render_kind.register(registry)
    engine = make_engine(max_workers=1, state_dir=state, work_dir=work)
    info = finish(engine, job, timeout=90)
    assert info.state == JobState.COMPLETED, info.error
    assert info.attempt == 1, "a resume continues the interrupted attempt"
    assert info.result["kept"] == sorted(before)
    assert info.result["rendered"] == [n for n in range(1, 7) if n not in before]
    after = frame_files(out)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for n, stamp in before.items():
        assert (after[n].stat().st_ino, after[n].stat().st_mtime_ns) == stamp, f"frame {n} was rendered again"
    log = Path(info.result["log"]).read_text()
    assert "--- attempt 1 resumed ---" in log


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, **_: object) -> None:
        self.warnings.append(message)


class _Ctx:
    def __init__(self) -> None:
        self.log = _Log()


def test_a_leftover_render_is_stopped_only_if_it_is_the_same_process(tmp_path):
    """A resumed job stops the Blender its crashed run left, named by pid and start
    time; a pid since reused by another process is left alone."""
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                start_new_session=True)
    try:
        started = psutil.Process(leftover.pid).create_time()
        ctx = _Ctx()
        render_kind.stop_leftover(ctx, {"pid": leftover.pid, "started": started - 5.0})
        assert leftover.poll() is None and not ctx.log.warnings, "another process with a reused pid"
        render_kind.stop_leftover(ctx, {"pid": leftover.pid, "started": started})
        assert leftover.wait(timeout=10) is not None
        assert ctx.log.warnings == ["stopping the background Blender left by the interrupted run"]
        render_kind.stop_leftover(ctx, None)
        render_kind.stop_leftover(ctx, {"pid": leftover.pid, "started": started})  # gone: no error
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_a_copy_made_for_the_job_is_removed_only_once_it_is_done(engine, blend, tmp_path):
    done_copy, failed_copy = tmp_path / "done.blend", tmp_path / "failed.blend"
    shutil.copy(blend, done_copy)
    shutil.copy(blend, failed_copy)
    done = engine.submit(KIND, {"blend_file": str(done_copy), "frame": 1, "blend_is_copy": True})
    failed = engine.submit(KIND, {"blend_file": str(failed_copy), "scene": "Nope",
                                  "blend_is_copy": True})
    assert finish(engine, done).state == JobState.COMPLETED
    assert finish(engine, failed).state == JobState.FAILED
    assert not done_copy.exists(), "a finished render's copy is removed"
    assert failed_copy.exists(), "a failed render keeps its copy for a retry"


def test_a_first_run_renders_over_frames_it_did_not_write(engine, blend, tmp_path):
    """Only a resume keeps frames: a fresh job never takes a file it finds for its
    own, even one with a future mtime (another job's, a skewed network clock)."""
    out = tmp_path / "fresh"
    out.mkdir()
    junk = out / "frame_0002.png"
    junk.write_bytes(b"junk")
    future = time.time() + 3600
    os.utime(junk, (future, future))
    info = finish(engine, engine.submit(KIND, {"blend_file": blend, "frame_end": 2,
                                               "output_dir": str(out)}))
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["rendered"] == [1, 2] and info.result["kept"] == []
    assert junk.read_bytes()[:8] == PNG_MAGIC


def test_an_empty_frame_file_is_never_kept(engine, blend, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "frame_0001.png").write_bytes(b"")
    info = finish(engine, engine.submit(KIND, {"blend_file": blend, "frame_end": 1,
                                               "output_dir": str(out), "overwrite": False}))
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["rendered"] == [1] and (out / "frame_0001.png").stat().st_size > 0


def test_a_copy_saved_elsewhere_writes_file_outputs_beside_the_original(engine, blend, tmp_path):
    """In a copy, '//' would mean the copy's folder; relative_base points the
    compositor's File Output nodes back at the user's folder."""
    original, elsewhere = tmp_path / "project", tmp_path / "copies"
    original.mkdir()
    elsewhere.mkdir()
    copy = elsewhere / "copy.blend"
    shutil.copy(blend, copy)
    info = finish(engine, engine.submit(KIND, {
        "blend_file": str(copy), "scene": "Comp", "frame": 1, "relative_base": str(original),
        "output_dir": "//renders"}))
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["output_dir"] == str(original / "renders")
    assert list((original / "fo").glob("*0001.png")), "the File Output node wrote beside the original"
    assert not (elsewhere / "fo").exists()


def test_a_blender_started_through_a_wrapper_script_renders(engine, blend, tmp_path):
    """A wrapper that runs Blender without exec (a site launcher, flatpak) is the
    driver's parent: that must not look like an orphaned render."""
    wrapper = tmp_path / "blender-wrapper"
    wrapper.write_text(f'#!/bin/sh\n"{BLENDER}" "$@"\nexit $?\n')
    wrapper.chmod(0o755)
    info = finish(engine, engine.submit(KIND, {"blend_file": blend, "frame_end": 2,
                                               "blender": str(wrapper)}))
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["rendered"] == [1, 2]


class _FakeCtx:
    """Enough of a JobContext to run the handler directly with a chosen checkpoint."""

    def __init__(self, workdir: Path, resume_from: dict) -> None:
        self.workdir, self.resume_from = workdir, resume_from
        self.job_id, self.kind, self.attempt = "fake-1", KIND, 1
        self.cancelled = False
        self.log = _Log()
        self.log.info = lambda *a, **k: None  # type: ignore[attr-defined]
        self.checkpoints: list[dict] = []

    def raise_if_cancelled(self) -> None:
        pass

    def progress(self, *args: object, **kwargs: object) -> None:
        pass

    def checkpoint(self, data: dict) -> None:
        self.checkpoints.append(data)


def test_a_resume_that_keeps_thousands_of_frames_still_starts(blend, tmp_path):
    """The kept frames reach the child in a file: on the command line, a long range's
    list would pass what one argument may hold (128 KiB on Linux)."""
    work, out = tmp_path / "work", tmp_path / "long"
    work.mkdir()
    many = [str(out / f"frame_{n:06d}_{'x' * 60}.png") for n in range(5000)]
    ctx = _FakeCtx(work, {"since": time.time() - 60, "files": many, "child": None})
    params = render_kind.BlenderRender(blend_file=blend, frame_end=1, output_dir=str(out))
    result = render_kind.render(ctx, params)
    assert result["rendered"] == [1]
    assert (work / "render-args.json").stat().st_size > 128 * 1024, "the list really is that long"
    argv = render_kind.command(BLENDER, params, work / "render-args.json")
    assert max(len(a) for a in argv) < 4096
