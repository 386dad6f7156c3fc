"""Hardening of ``process.run`` and ``blender.render`` (issue 11): a log that cannot
be written or grows without end, daemons that escape the process tree, progress
regexes that backtrack catastrophically, scripts inside a rendered .blend, and what
a held job will do, told before it is released.

The children are small Python scripts written to ``tmp_path``. Tests synchronise
with them through files and job states, never through sleeps.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blender_taskqueue.engine import InvalidParams, JobState
from blender_taskqueue.kinds import process as process_kind
from blender_taskqueue.kinds import render as render_kind

from support import wait_until

pytestmark = pytest.mark.timeout(60)

KIND = process_kind.KIND
PY = sys.executable
POSIX = os.name == "posix"
LINUX = sys.platform.startswith("linux")

# Prints argv[1] bytes to stdout (numbered lines of 100 bytes) and a tenth of that to
# stderr, then "the end".
FLOOD = r"""
import sys
total = int(sys.argv[1])
for i in range(total // 100):
    sys.stdout.write(f"out {i:09d} " + "x" * 85 + "\n")
    if i % 10 == 0:
        sys.stderr.write(f"err {i:09d} " + "y" * 85 + "\n")
sys.stdout.write("the end\n")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""

# Double-forks a daemon into a session of its own (os.setsid), which writes its pid
# to argv[1] and sleeps 60 s. argv[2]: "closed" (the daemon closes its output, as
# daemons do) or "pipes" (it keeps the job's pipes open). argv[3]: "exit" (the
# program exits once the daemon is up) or "wait" (it waits to be cancelled).
DAEMON = r"""
import os, sys, time
pidfile, output, after = sys.argv[1], sys.argv[2], sys.argv[3]
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        if output == "closed":
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.waitpid(first, 0)
while not os.path.exists(pidfile):
    time.sleep(0.005)
print("daemon up", flush=True)
if after == "wait":
    time.sleep(120)
"""


def write(tmp_path: Path, name: str, code: str) -> str:
    path = tmp_path / name
    path.write_text(code, encoding="utf-8")
    return str(path)


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def engine(make_engine, registry, tmp_path):
    process_kind.register(registry)
    return make_engine(max_workers=2, work_dir=tmp_path / "work")


@pytest.fixture(autouse=True)
def no_leftovers():
    """Kill any process a failed test left; fail a test that leaves a reader behind."""
    spawned: list[int] = []
    yield spawned
    for pid in spawned:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("process.run-")],
        timeout=5.0,
        what="process.run reader threads to end",
    )


def finish(engine, job_id: str, timeout: float = 30.0):
    assert engine.wait([job_id], timeout=timeout), f"job {job_id} did not finish"
    return engine.get(job_id)


# ---------------------------------------------------------------- (7) the log


class FullDisk:
    """A log file on a disk that fills after ``room`` bytes: every write past that
    raises ENOSPC. Counts the writes tried after the first failure."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room
        self.failures = 0
        self.tried_after_failure = 0

    def write(self, data: Any) -> int:
        if self.failures:
            self.tried_after_failure += 1
        if len(data) > self.room:
            self.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every output.log that process.run opens is on a disk with 4 KiB left."""
    opened: list[FullDisk] = []

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = open(path, mode, *args, **kwargs)
        if Path(path).name == process_kind.LOG_NAME:
            opened.append(FullDisk(real, room=4096))
            return opened[-1]
        return real

    monkeypatch.setattr(process_kind, "open", fake_open, raising=False)
    return opened


def test_a_full_disk_does_not_hang_the_job(engine, tmp_path, full_disk):
    """The program prints 2 MB after the log's disk filled at 4 KiB: its output is
    still drained (no pipe deadlock), the job completes with a visible warning, and
    the failed write is not retried."""
    script = write(tmp_path, "flood.py", FLOOD)
    job = engine.submit(KIND, {"argv": [PY, script, str(2_000_000)]})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert "No space left on device" in info.result["log_error"]
    assert any("output.log could not be written" in w for w in info.result["warnings"])
    assert "WARNING" in info.message and "output.log" in info.message
    assert len(full_disk) == 1 and full_disk[0].failures == 1
    assert full_disk[0].tried_after_failure == 0, "a failed log is not written to again"


def test_a_failed_program_says_its_log_is_incomplete(engine, tmp_path, full_disk):
    script = write(tmp_path, "flood.py", FLOOD)
    info = finish(engine, engine.submit(KIND, {"argv": [PY, script, str(200_000), "3"]}))
    assert info.state == JobState.FAILED
    assert info.error.type == "ProcessFailed"
    assert "exited with code 3" in info.error.message
    assert "incomplete: No space left on device" in info.error.message


@pytest.mark.skipif(not (LINUX and os.path.exists("/dev/full")), reason="/dev/full is Linux's")
def test_a_log_on_dev_full_does_not_hang_the_job(engine, tmp_path):
    """A real ENOSPC: output.log is a link to /dev/full, where every write fails."""
    engine.pause()
    script = write(tmp_path, "flood.py", FLOOD)
    job = engine.submit(KIND, {"argv": [PY, script, str(1_000_000)]})
    workdir = engine.workdir_for(job)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / process_kind.LOG_NAME).symlink_to("/dev/full")
    engine.resume()
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert "No space left on device" in info.result["log_error"]


def test_the_log_is_capped_and_rotated(engine, tmp_path):
    """A program that prints 3 MB with a 64 KiB cap leaves output.log and
    output.log.1, each at most the cap, both of whole lines, the newest last."""
    cap = 64 * 1024
    script = write(tmp_path, "flood.py", FLOOD)
    job = engine.submit(KIND, {"argv": [PY, script, str(3_000_000)], "log_max_bytes": cap})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    log = Path(info.result["log"])
    old = log.with_name(log.name + ".1")
    assert log.stat().st_size <= cap and old.stat().st_size <= cap
    assert log.stat().st_size + old.stat().st_size <= 2 * cap
    lines = old.read_text().splitlines() + log.read_text().splitlines()
    assert "the end" in log.read_text().splitlines()  # the two pipes race: not always last
    assert all(len(line) == 99 for line in lines if line != "the end"), "lines stay whole"
    outs = [int(line.split()[1]) for line in lines if line.startswith("out ")]
    assert outs == sorted(outs) and outs[-1] == 3_000_000 // 100 - 1
    assert "warnings" not in info.result


def test_the_log_cap_has_a_floor(engine):
    with pytest.raises(InvalidParams, match="log_max_bytes"):
        engine.submit(KIND, {"argv": [PY], "log_max_bytes": 10})


def test_log_file_rotation_keeps_one_old_file(tmp_path):
    path = tmp_path / "output.log"
    log = process_kind.LogFile(path, max_bytes=100)
    for i in range(30):
        log.write(f"line {i:03d}\n".encode())  # 9 bytes a line
    log.write(b"z" * 250)  # longer than the cap: split across files, none above it
    log.close()
    assert path.stat().st_size <= 100 and path.with_name("output.log.1").stat().st_size <= 100
    assert not path.with_name("output.log.2").exists()
    assert log.rotations >= 3


def test_a_reader_keeps_draining_when_the_log_raises():
    """The reader itself: a sink that raises on every write does not stop the
    reading, and only the first write is tried."""

    class Broken:
        calls = 0

        def write(self, data: bytes) -> int:
            Broken.calls += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    out = process_kind._Output(Broken(), None)
    pipe = io.BytesIO(b"".join(f"line {i}\n".encode() for i in range(100_000)))
    process_kind._read(pipe, "stdout", out)
    assert pipe.tell() == len(pipe.getvalue()), "everything was read"
    assert out.last_line == "line 99999"
    assert Broken.calls == 1 and out.log_failures == 1 and out.log_dropped > 0


# ---------------------------------------------------------------- (8) escaped daemons


def _start_daemon(engine, tmp_path, no_leftovers, output: str, after: str) -> tuple[str, int]:
    pidfile = tmp_path / "daemon.pid"
    script = write(tmp_path, "daemon.py", DAEMON)
    job = engine.submit(KIND, {"argv": [PY, script, str(pidfile), output, after], "grace_s": 1.0})
    wait_until(pidfile.exists, what="the daemon's pid file")
    pid = int(pidfile.read_text())
    no_leftovers.append(pid)
    # Out of the tree (re-parented) and out of the program's group: the session (and
    # group) of the intermediate child, which called setsid and exited.
    assert psutil.Process(pid).ppid() != os.getpid()
    assert os.getpgid(pid) == os.getsid(pid) != pid
    return job, pid


@pytest.mark.skipif(not POSIX, reason="fork and setsid are POSIX")
def test_cancel_stops_a_daemon_that_left_the_tree(engine, tmp_path, no_leftovers):
    job, pid = _start_daemon(engine, tmp_path, no_leftovers, "closed", "wait")
    wait_until(lambda: engine.get(job).message == "daemon up", what="the program running")
    assert engine.cancel(job)
    info = finish(engine, job)
    assert info.state == JobState.CANCELLED
    wait_until(lambda: is_gone(pid), timeout=10.0, what="the daemon to be stopped")


@pytest.mark.skipif(not POSIX, reason="fork and setsid are POSIX")
@pytest.mark.parametrize("output", ["closed", "pipes"])
def test_completion_stops_a_daemon_that_left_the_tree(engine, tmp_path, no_leftovers, output):
    """The program exits 0 once its daemon is up; the daemon (holding the job's pipes
    or not) is stopped, and the job completes."""
    job, pid = _start_daemon(engine, tmp_path, no_leftovers, output, "exit")
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    wait_until(lambda: is_gone(pid), timeout=10.0, what="the daemon to be stopped")


def test_marked_processes_finds_only_the_marked(tmp_path, no_leftovers):
    import subprocess

    marker = process_kind.new_marker("job-1")
    sleep = [PY, "-c", "import sys; sys.stdin.read()"]
    marked = subprocess.Popen(sleep, stdin=subprocess.PIPE,
                              env={**os.environ, process_kind.MARKER_ENV: marker})
    other = subprocess.Popen(sleep, stdin=subprocess.PIPE,
                             env={**os.environ, process_kind.MARKER_ENV: marker + "x"})
    no_leftovers.extend([marked.pid, other.pid])
    try:
        found = {p.pid for p in process_kind.marked_processes(marker)}
        assert marked.pid in found and other.pid not in found and os.getpid() not in found
        future = psutil.Process(marked.pid).create_time() + 3600
        assert process_kind.marked_processes(marker, since=future) == []
    finally:
        for p in (marked, other):
            p.stdin.close()
            p.wait(timeout=10)


# ---------------------------------------------------------------- (11) the progress regex


@pytest.mark.parametrize(
    "regex",
    [r"(?P<fraction>(a+)+)$", r"(?P<percent>(\d+)*)%", r"(?P<percent>(?:a|ab)+)%",
     r".*(?P<percent>\d+)%", r"(?P<fraction>.*.*)=", r"(?P<percent>\d+\d*)%"],
    ids=["nested", "nested-star", "alternation", "leading-dot-star", "two-dot-stars", "adjacent"],
)
def test_catastrophic_regexes_are_refused_at_submit(engine, regex):
    with pytest.raises(InvalidParams, match="could take very long"):
        engine.submit(KIND, {"argv": [PY], "progress_regex": regex})
    assert engine.jobs() == []


@pytest.mark.parametrize(
    "regex",
    [r"(?P<fraction>[0-9.]+) done", r"(?P<percent>\d+)%", r"(?P<percent>\d+(\.\d+)?)%",
     r"frame (?P<current>\d+)/(?P<total>\d+)", r"(?P<current>\d+)\s*/\s*(?P<total>\d+)",
     r"Fra:(?P<current>\d+).*Sample (?P<total>\d+)", r"^.*(?P<percent>\d+)%",
     r"(?P<percent>(?>\d+)+)%", r"(?P<fraction>\d*\.\d+)"],
)
def test_usual_regexes_are_accepted(regex):
    assert process_kind.progress_pattern(regex).pattern == regex


@pytest.mark.timeout(30)
def test_the_regex_only_sees_the_end_of_a_long_line():
    """Even an accepted pattern is quadratic in the line's length where it does not
    match: on a line of 200,000 digits, minutes; on its last REGEX_WINDOW
    characters, milliseconds. Progress still works after it, and from the end."""
    out = process_kind._Output(io.BytesIO(), process_kind.progress_pattern(r"(?P<percent>\d+)%"))
    out.feed("stdout", b"1" * 200_000 + b"\n")
    assert out.warnings == [], "not even slow enough to be turned off"
    out.feed("stdout", b"x" * 100_000 + b" 50%\n")
    assert out.fraction == 0.5


@pytest.mark.timeout(30)
def test_a_slow_regex_is_turned_off_with_a_warning(monkeypatch):
    monkeypatch.setattr(process_kind, "REGEX_SLOW_S", 0.0)
    out = process_kind._Output(io.BytesIO(), re.compile(r"(?P<fraction>[0-9.]+)="))
    out.feed("stdout", b"0.25=\n")
    assert out.fraction == 0.25
    out.feed("stdout", b"0.5=\n")
    assert out.fraction == 0.25, "the regex is not used again"
    assert any("progress_regex took" in w for w in out.warnings)


def test_long_lines_of_digits_do_not_stall_a_job(engine, tmp_path):
    """End to end, on a worker thread: lines of 60,000 digits with no '%', quadratic
    for '\\d+%' on the whole line, cost next to nothing on its end."""
    script = write(tmp_path, "digits.py", (
        "import sys\n"
        "for _ in range(20):\n"
        "    sys.stdout.write('1' * 60000 + '\\n')\n"
        "    sys.stdout.flush()\n"
        "print('50%', flush=True)\n"
    ))
    job = engine.submit(KIND, {"argv": [PY, script], "progress_regex": r"(?P<percent>\d+)%"})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert info.message == "50%"


# ---------------------------------------------------------------- autoexec of the rendered file


@pytest.fixture
def fake_blender(tmp_path) -> tuple[str, str]:
    """A .blend and an executable that stands in for Blender (only its path matters)."""
    blend = tmp_path / "scene.blend"
    blend.write_bytes(b"BLENDER-v300")
    exe = tmp_path / "bin" / "blender"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return str(blend), str(exe)


def test_an_untrusted_file_is_rendered_with_autoexec_disabled(fake_blender, tmp_path):
    blend, exe = fake_blender
    params = render_kind.BlenderRender(blend_file=blend, blender=exe, factory_startup=True)
    assert params.trusted is False
    argv = render_kind.command(exe, params, tmp_path / "args.json")
    assert argv[:4] == [exe, "-b", "--factory-startup", "--disable-autoexec"]
    assert argv.index("--disable-autoexec") < argv.index(blend), "before the file it applies to"
    assert "--enable-autoexec" not in argv and "-y" not in argv


def test_a_trusted_file_leaves_autoexec_to_blender(fake_blender, tmp_path):
    blend, exe = fake_blender
    params = render_kind.BlenderRender(blend_file=blend, blender=exe, trusted=True)
    argv = render_kind.command(exe, params, tmp_path / "args.json")
    assert argv == [exe, "-b", blend, "--python", str(render_kind.DRIVER), "--",
                    str(tmp_path / "args.json")]
    assert "--enable-autoexec" not in argv and "--disable-autoexec" not in argv


def test_the_bpy_module_driver_is_told_whether_the_file_is_trusted(fake_blender, tmp_path):
    blend, exe = fake_blender
    for trusted in (False, True):
        params = render_kind.BlenderRender(blend_file=blend, blender=exe, trusted=trusted)
        args = render_kind.driver_args(params, tmp_path, None, opens=True)
        assert args["trusted"] is trusted
        argv = render_kind.command("/opt/py/python3.11", params, tmp_path / "args.json")
        assert "--enable-autoexec" not in argv


# ---------------------------------------------------------------- (9) describe


def test_process_describe_says_everything_it_will_run(tmp_path, registry):
    if not POSIX:
        pytest.skip("a script with a shebang is a POSIX executable")
    bindir = tmp_path / "mybin"
    bindir.mkdir()
    tool = bindir / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    long_arg = "--x=" + "y" * 5000
    params = {
        "argv": ["tool", "-v", long_arg, "two words", "new\nline"],
        "cwd": str(tmp_path),
        "env": {"PATH": str(bindir), "LD_PRELOAD": "/tmp/evil.so", "MODE": "fast"},
        "timeout_s": 30,
    }
    spec = process_kind.register(registry)
    assert spec.describe is process_kind.describe
    lines = spec.what_it_runs(params)
    text = "\n".join(lines)
    assert not any("cannot describe" in line for line in lines)
    assert "WARNING: env sets PATH: the program is looked up in" in text
    assert json.dumps([str(bindir)]) in text
    assert f"runs the program {tool}" in text  # resolved with the job's own PATH
    for i, arg in enumerate(params["argv"]):
        assert f"  argv[{i}] = {json.dumps(arg)}" in lines, f"argv[{i}] shown in full"
    assert f"in the folder {json.dumps(str(tmp_path))}" in lines
    assert any("LD_PRELOAD" in line and "WARNING" in line for line in lines)
    assert '  sets MODE = "fast"' in lines
    assert any(process_kind.MARKER_ENV in line for line in lines)
    assert any("output.log" in line for line in lines)
    assert any("30 s" in line and "timeout_s" in line for line in lines)
    assert not any(line.startswith("WARNING: these params do not validate") for line in lines)


def test_process_describe_resolves_as_the_job_does(registry):
    lines = process_kind.describe({"argv": ["python3"]})
    assert f"runs the program {process_kind.resolve_executable('python3', None, {})}" in "\n".join(lines)
    assert any("cwd is not set" in line for line in lines)
    assert any("no timeout" in line for line in lines)


@pytest.mark.parametrize(
    "params",
    [
        {}, {"argv": "rm -rf ~"}, {"argv": []}, {"argv": [None, 3, {"a": 1}]},
        {"argv": ["tq-no-such-program-xyz"]}, {"argv": ["/" + "a" * 5000]},
        {"argv": ["x\0y"], "cwd": 7, "env": "PATH=/tmp"},
        {"argv": [PY], "env": {"PATH": None, "": 5, "A=B": "x"}},
        {"argv": [PY], "timeout_s": "never", "log_max_bytes": "big", "surprise": [1, 2]},
        {"argv": [PY], "progress_regex": "(" * 500},
    ],
)
def test_process_describe_never_raises_for_hostile_params(params):
    lines = process_kind.SPEC.what_it_runs(params)
    assert lines and all(isinstance(line, str) for line in lines)
    assert not any("cannot describe" in line for line in lines)


def test_render_describe_says_everything_it_will_run(fake_blender, registry, tmp_path):
    blend, exe = fake_blender
    params = render_kind.BlenderRender(
        blend_file=blend, blender=exe, output_dir=str(tmp_path / "out"), frame_start=3,
        frame_end=9, frame_step=2, timeout_s=600, blend_is_copy=True,
    ).model_dump(mode="json")
    spec = render_kind.register(registry)
    assert spec.describe is render_kind.describe
    lines = spec.what_it_runs(params)
    text = "\n".join(lines)
    assert not any("cannot describe" in line for line in lines)
    assert f"runs Blender: {exe}" in text and "WARNING: the job names the program" in text
    argv = render_kind.command(exe, render_kind.BlenderRender.model_validate(params),
                               Path("<the job's own folder>") / "render-args.json")
    for i, arg in enumerate(argv):
        assert f"  argv[{i}] = {json.dumps(arg)}" in lines
    assert f"opens the .blend {json.dumps(blend)}" in lines
    assert any("autoexec disabled: --disable-autoexec" in line for line in lines)
    assert f"writes the frames to {tmp_path / 'out' / 'frame_####'}.png" in text
    assert "frames 3 to 9, step 2" in lines
    assert any(line.startswith("WARNING: DELETES") and blend in line for line in lines)
    assert any("600 s" in line for line in lines)
    assert f"in the folder {Path(blend).parent}" in lines

    trusted = spec.what_it_runs({**params, "trusted": True})
    assert any(line.startswith("WARNING: trusted = true") for line in trusted)
    assert "--disable-autoexec" not in "\n".join(trusted)


def test_render_describe_of_a_file_from_elsewhere(registry):
    """Params naming a .blend and a Blender this machine does not have: said, with
    as much as can be told."""
    lines = render_kind.SPEC.what_it_runs({
        "blend_file": "/elsewhere/shot.blend", "blender": "/opt/evil/blender",
        "output_dir": "//renders/", "frame": 7,
    })
    text = "\n".join(lines)
    assert lines[0].startswith("WARNING: these params do not validate")
    assert "none can be found now" in text
    assert '"/elsewhere/shot.blend"' in text
    assert "writes the frames to /elsewhere/renders/frame_####.png" in text
    assert "frame 7" in lines


# Values that go wrong in different layers, as in test_kind_params_fuzz.
TEXT = st.one_of(st.text(max_size=40), st.just("/" + "a" * 5000 + ".blend"),
                 st.just("/tmp/x\0y.blend"), st.just("//renders/"), st.just(sys.executable))
VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                  TEXT, st.lists(TEXT, max_size=4), st.dictionaries(TEXT, TEXT, max_size=3))


@pytest.mark.timeout(300)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_describe_never_raises_for_fuzzed_params(data):
    spec, model = data.draw(st.sampled_from([
        (process_kind.SPEC, process_kind.ProcessRun), (render_kind.SPEC, render_kind.BlenderRender),
    ]))
    names = list(model.model_fields) + ["not_a_param"]
    params = data.draw(st.dictionaries(st.sampled_from(names), VALUE, max_size=6))
    assert spec.describe is not None
    lines = spec.describe(params)  # the raw seam: no wrapper to catch for it
    assert lines and all(isinstance(line, str) for line in lines)
