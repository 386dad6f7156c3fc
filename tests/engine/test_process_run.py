"""The built-in ``process.run`` kind against real child processes.

The children are small Python scripts written to ``tmp_path`` and run with
``sys.executable``. Tests synchronise with them through files (the child writes
its pids or waits for a "go" file), never through sleeps.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest

from blender_taskqueue.engine import InvalidParams, JobState
from blender_taskqueue.kinds import process as process_kind

from support import wait_until

pytestmark = pytest.mark.timeout(60)

KIND = process_kind.KIND
PY = sys.executable
POSIX = os.name == "posix"

# Spawns a grandchild, writes "<child pid> <grandchild pid>" to argv[1] once both are
# ready, prints "ready" and sleeps. argv[2] == "ignore": both ignore SIGTERM.
# argv[3] == "exit": the child exits at once instead, leaving the grandchild behind
# (holding the output pipes).
TREE = r"""
import os, signal, subprocess, sys, time
pidfile, mode, after = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready = pidfile + ".grandchild"
grandchild = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").close()
print("grandchild up", flush=True)
time.sleep(120)
''', ready, mode])
while not os.path.exists(ready):
    time.sleep(0.005)
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(pidfile + ".tmp", pidfile)
print("ready", flush=True)
if after == "exit":
    sys.exit(0)
time.sleep(120)
"""

# Prints argv[2] (a progress line), then waits for the file argv[1] to appear.
STEP = r"""
import os, sys, time
print("starting up", flush=True)
print(sys.argv[2], flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
print("done", flush=True)
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


def read_pids(path: Path) -> list[int]:
    wait_until(path.exists, what=f"{path.name} written by the child")
    return [int(x) for x in path.read_text().split()]


@pytest.fixture
def engine(make_engine, registry, tmp_path):
    process_kind.register(registry)
    return make_engine(max_workers=2, work_dir=tmp_path / "work")


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail a test that leaves a reader thread behind; kill any process a failed test
    left (so one failure does not leak into the next test)."""
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


def finish(engine, job_id: str, timeout: float = 20.0):
    assert engine.wait([job_id], timeout=timeout), f"job {job_id} did not finish"
    return engine.get(job_id)


# ---------------------------------------------------------------- running


def test_runs_with_cwd_env_and_logs_both_streams(engine, tmp_path):
    folder = tmp_path / "here"
    folder.mkdir()
    go = tmp_path / "go"
    script = write(tmp_path, "hello.py", (
        "import os, sys, time\n"
        "print('oops on stderr', file=sys.stderr, flush=True)\n"
        # The two pipes race each other: wait until the test saw the stderr line.
        "while not os.path.exists(sys.argv[1]):\n"
        "    time.sleep(0.005)\n"
        "print('cwd', os.getcwd(), flush=True)\n"
        "print('greeting', os.environ['TQ_GREETING'], flush=True)\n"
        "print('the last line', flush=True)\n"
    ))
    job = engine.submit(KIND, {"argv": [PY, script, str(go)], "cwd": str(folder),
                               "env": {"TQ_GREETING": "hi there"}})
    wait_until(lambda: engine.get(job).message == "oops on stderr", what="the stderr line")
    go.touch()
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert info.result["exit_code"] == 0
    assert info.result["duration_s"] >= 0
    log = Path(info.result["log"])
    assert log.name == "output.log" and log.parent == engine.workdir_for(job)
    lines = log.read_text().splitlines()
    assert f"cwd {folder}" in lines
    assert "greeting hi there" in lines
    assert "oops on stderr" in lines
    assert lines[-1] == "the last line"
    assert info.message == "the last line"
    assert info.progress == 1.0


def test_relative_program_is_found_from_cwd(engine, tmp_path):
    if not POSIX:
        pytest.skip("a script with a shebang is a POSIX executable")
    tool = tmp_path / "bin" / "tool.sh"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho tool ran in \"$PWD\"\n")
    tool.chmod(0o755)
    job = engine.submit(KIND, {"argv": ["./bin/tool.sh"], "cwd": str(tmp_path)})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert info.message == f"tool ran in {tmp_path}"


@pytest.mark.parametrize(
    ("regex", "line", "expected"),
    [
        (r"(?P<fraction>[0-9.]+) done", "0.25 done", 0.25),
        (r"(?P<percent>\d+(\.\d+)?)%", "progress: 40% of frames", 0.40),
        (r"frame (?P<current>\d+)/(?P<total>\d+)", "frame 3/12 rendered", 0.25),
    ],
    ids=["fraction", "percent", "current-total"],
)
def test_progress_from_output(engine, tmp_path, regex, line, expected):
    go = tmp_path / "go"
    script = write(tmp_path, "step.py", STEP)
    job = engine.submit(KIND, {"argv": [PY, script, str(go), line], "progress_regex": regex})
    wait_until(
        lambda: engine.get(job).progress == pytest.approx(expected)
        and engine.get(job).message == line,
        what=f"progress {expected} from {line!r}",
    )
    assert engine.get(job).stage == "running"
    go.touch()
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert info.message == "done"


def test_progress_from_carriage_returns(engine, tmp_path):
    """A progress bar that rewrites one line with \\r (tqdm-style) still reports."""
    go = tmp_path / "go"
    script = write(tmp_path, "bar.py", (
        "import os, sys, time\n"
        "for i in range(1, 8):\n"
        "    sys.stderr.write(f'\\r{i * 10}%|####')\n"
        "    sys.stderr.flush()\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    time.sleep(0.005)\n"
        "sys.stderr.write('\\n')\n"
    ))
    job = engine.submit(KIND, {"argv": [PY, script, str(go)],
                               "progress_regex": r"(?P<percent>\d+)%"})
    wait_until(lambda: engine.get(job).progress == pytest.approx(0.7), what="70% from \\r lines")
    assert engine.get(job).message == "70%|####"
    go.touch()
    assert finish(engine, job).state == JobState.COMPLETED


def test_non_zero_exit_fails_with_code_and_stderr_tail(engine, tmp_path):
    script = write(tmp_path, "fail.py", (
        "import sys\n"
        "print('some output')\n"
        "for i in range(30):\n"
        "    print(f'error line {i}', file=sys.stderr)\n"
        "sys.exit(3)\n"
    ))
    job = engine.submit(KIND, {"argv": [PY, script]})
    info = finish(engine, job)
    assert info.state == JobState.FAILED
    assert info.error.type == "ProcessFailed"
    assert "exited with code 3" in info.error.message
    assert "error line 29" in info.error.message
    assert "error line 20" in info.error.message
    assert "error line 19\n" not in info.error.message  # only the last lines
    assert "output.log" in info.error.message
    assert info.error.stage == "running"


@pytest.mark.skipif(not POSIX, reason="signals are POSIX")
def test_killed_by_signal_is_named(engine, tmp_path):
    script = write(tmp_path, "selfkill.py", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    info = finish(engine, engine.submit(KIND, {"argv": [PY, script]}))
    assert info.state == JobState.FAILED
    assert "killed by signal SIGKILL" in info.error.message


# ---------------------------------------------------------------- stopping


def _start_tree(engine, tmp_path, no_leftovers, *, mode="term", after="sleep", **params):
    pidfile = tmp_path / "pids"
    script = write(tmp_path, "tree.py", TREE)
    job = engine.submit(KIND, {"argv": [PY, script, str(pidfile), mode, after], **params})
    pids = read_pids(pidfile)
    no_leftovers.extend(pids)
    for pid in pids:
        assert psutil.pid_exists(pid)
    return job, pids


def test_cancel_stops_child_and_grandchild(engine, tmp_path, no_leftovers):
    job, pids = _start_tree(engine, tmp_path, no_leftovers)
    wait_until(lambda: engine.get(job).message in ("ready", "grandchild up"), what="child running")
    t0 = time.perf_counter()
    assert engine.cancel(job)
    info = finish(engine, job)
    latency = time.perf_counter() - t0
    print(f"\ncancel -> cancelled in {latency * 1000:.0f} ms (child + grandchild)")
    assert info.state == JobState.CANCELLED
    assert latency < 5.0
    wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=5.0, what="the tree to be gone")


@pytest.mark.skipif(not POSIX, reason="ignoring SIGTERM is POSIX")
def test_cancel_kills_a_tree_that_ignores_terminate(engine, tmp_path, no_leftovers):
    job, pids = _start_tree(engine, tmp_path, no_leftovers, mode="ignore", grace_s=0.3)
    t0 = time.perf_counter()
    assert engine.cancel(job)
    info = finish(engine, job)
    latency = time.perf_counter() - t0
    print(f"\ncancel (SIGTERM ignored, grace 0.3 s) -> cancelled in {latency * 1000:.0f} ms")
    assert info.state == JobState.CANCELLED
    assert 0.25 <= latency < 5.0
    wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=5.0, what="the tree to be gone")


def test_own_timeout_stops_the_tree(engine, tmp_path, no_leftovers):
    job, pids = _start_tree(engine, tmp_path, no_leftovers, timeout_s=1.0)
    info = finish(engine, job)
    assert info.state == JobState.FAILED
    assert info.error.type == "ProcessTimeout"
    assert "timed out after 1 s" in info.error.message
    assert info.error.stage == "stopping"
    wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=5.0, what="the tree to be gone")


def test_engine_timeout_stops_the_tree(engine, tmp_path, no_leftovers):
    pidfile = tmp_path / "pids"
    script = write(tmp_path, "tree.py", TREE)
    job = engine.submit(KIND, {"argv": [PY, script, str(pidfile), "term", "sleep"]}, timeout=1.0)
    pids = read_pids(pidfile)
    no_leftovers.extend(pids)
    info = finish(engine, job)
    assert info.state == JobState.FAILED
    assert info.error.type == "Timeout"
    wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=5.0, what="the tree to be gone")


@pytest.mark.skipif(not POSIX, reason="process groups are POSIX")
def test_no_orphan_after_the_child_exits(engine, tmp_path, no_leftovers):
    """The child exits 0 at once; its grandchild (holding the pipes) is stopped too
    and the job does not hang on the open pipes."""
    job, pids = _start_tree(engine, tmp_path, no_leftovers, after="exit", grace_s=1.0)
    info = finish(engine, job, timeout=10.0)
    assert info.state == JobState.COMPLETED, info.error
    wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=5.0, what="the tree to be gone")


# ---------------------------------------------------------------- volume


def test_huge_output_no_deadlock_bounded_memory(engine, tmp_path):
    """200,000 stdout lines and 20,000 stderr lines, as fast as Python prints them:
    no pipe deadlock, every line in the log, and memory that does not grow with it."""
    n_out, n_err = 200_000, 20_000
    script = write(tmp_path, "flood.py", (
        "import sys\n"
        f"n_out, n_err = {n_out}, {n_err}\n"
        "pad = 'x' * 60\n"
        "for i in range(n_out):\n"
        "    print(f'out {i} {pad} step {i + 1}/{n_out}')\n"
        "    if i % 10 == 0:\n"
        "        print(f'err {i // 10} {pad}', file=sys.stderr)\n"
    ))
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        job = engine.submit(KIND, {"argv": [PY, script],
                                   "progress_regex": r"step (?P<current>\d+)/(?P<total>\d+)"})
        info = finish(engine, job, timeout=50.0)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = psutil.Process().memory_info().rss - rss_before
    assert info.state == JobState.COMPLETED, info.error
    log = Path(info.result["log"])
    size = log.stat().st_size
    print(f"\n{n_out + n_err} lines ({size / 1e6:.1f} MB) in {elapsed:.2f} s; traced peak "
          f"{peak / 1e6:.2f} MB, RSS growth {rss_growth / 1e6:.1f} MB")
    counts = {"out": 0, "err": 0}
    with open(log, encoding="utf-8") as f:
        for line in f:
            counts[line.split(" ", 1)[0]] += 1  # a stray fragment would raise KeyError
    assert counts == {"out": n_out, "err": n_err}
    assert size > 15e6
    assert peak < 8e6, f"traced memory peaked at {peak / 1e6:.1f} MB for {size / 1e6:.1f} MB of output"
    assert rss_growth < 100e6


# ---------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"argv": ["tq-no-such-program-xyz"]}, "not found on PATH"),
        ({"argv": ["/no/such/dir/prog"]}, "does not exist"),
        ({"argv": [PY], "cwd": "/no/such/folder/at/all"}, "cwd '/no/such/folder/at/all' does not exist"),
        ({"argv": [PY], "progress_regex": "(?P<fraction>[0-9"}, "does not compile"),
        ({"argv": [PY], "progress_regex": r"(\d+)%"}, "needs a named group"),
        ({"argv": [PY], "progress_regex": r"(?P<current>\d+)"}, "no group named 'total'"),
        ({"argv": f"{PY} -c print(1)"}, "not a shell string"),
        ({"argv": []}, "argv"),
        ({"argv": [""]}, "must not be empty"),
        ({"argv": [PY], "timeout_s": 0}, "timeout_s"),
        ({"argv": [PY], "env": {"A=B": "x"}}, "invalid environment variable"),
        ({}, "argv"),
        ({"argv": [PY], "time_out": 5}, "time_out"),
    ],
    ids=["missing-exe", "missing-path", "missing-cwd", "bad-regex", "regex-no-group",
         "regex-no-total", "shell-string", "empty-argv", "empty-program", "zero-timeout",
         "bad-env", "no-argv", "misspelt-param"],
)
def test_bad_params_rejected_at_submit(engine, params, expected):
    with pytest.raises(InvalidParams, match="process.run") as caught:
        engine.submit(KIND, params)
    assert expected in str(caught.value)
    assert engine.jobs() == []


def test_folder_and_non_executable_rejected(engine, tmp_path):
    with pytest.raises(InvalidParams, match="is a folder"):
        engine.submit(KIND, {"argv": [str(tmp_path)]})
    if POSIX:
        plain = tmp_path / "plain.txt"
        plain.write_text("not a program")
        with pytest.raises(InvalidParams, match="is not executable"):
            engine.submit(KIND, {"argv": [str(plain)]})
    assert engine.jobs() == []


def test_path_from_env_is_used(engine, tmp_path):
    if not POSIX:
        pytest.skip("a script with a shebang is a POSIX executable")
    bindir = tmp_path / "mybin"
    bindir.mkdir()
    tool = bindir / "only-here"
    tool.write_text("#!/bin/sh\necho found me\n")
    tool.chmod(0o755)
    with pytest.raises(InvalidParams, match="not found on PATH"):
        engine.submit(KIND, {"argv": ["only-here"]})
    job = engine.submit(KIND, {"argv": ["only-here"],
                               "env": {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}})
    info = finish(engine, job)
    assert info.state == JobState.COMPLETED, info.error
    assert info.message == "found me"


def test_import_registers_in_the_shared_registry():
    from blender_taskqueue.engine import registry

    spec = registry.get(KIND)
    assert spec.handler is process_kind.run_process
    assert spec.params is process_kind.ProcessRun


# ---------------------------------------------------------------- output parsing


def test_each_line_is_passed_on_once_however_the_reads_split_it():
    import io

    seen: list[tuple[str, str]] = []
    out = process_kind._Output(io.BytesIO(), None, lambda stream, line: seen.append((stream, line)))
    # "\r\n" split across two reads, a progress bar redrawn with "\r", a line in pieces.
    for chunk in (b"one\r", b"\ntwo\n", b"\r10%", b"\r20%", b"\r30%\n", b"thr", b"ee\n", b"last"):
        out.feed("stdout", chunk)
    out.close("stdout")
    assert seen == [("stdout", x) for x in ("one", "two", "10%", "20%", "30%", "three", "last")]
    assert list(out.tail) == ["one", "two", "10%", "20%", "30%", "three", "last"]


def test_a_progress_bar_still_being_redrawn_moves_the_message():
    import io

    out = process_kind._Output(io.BytesIO(), process_kind.progress_pattern(r"(?P<percent>\d+)%"))
    out.feed("stderr", b"\r 40%|####")
    assert out.snapshot()[1:] == (0.4, "40%|####")
    assert list(out.tail) == [], "an unfinished line is not in the tail yet"


def test_a_line_parser_that_raises_does_not_stop_the_reading():
    import io

    calls: list[str] = []

    def parser(stream: str, line: str) -> None:
        calls.append(line)
        if line == "bad":
            raise AttributeError("a parser bug")

    out = process_kind._Output(io.BytesIO(), None, parser)
    out.feed("stdout", b"good\nbad\nafter\n")
    assert calls == ["good", "bad", "after"] and out._on_line_errors == 1
