"""Quitting with a stuck job must not hang the interpreter (nor Blender).

Each test runs a small script in a fresh interpreter (``sys.executable -c``). A
handler there ignores cancellation forever; the script either shuts the engine
down or just ends. The child must exit on its own well within the subprocess
timeout (the test fails if it hangs), and it reports what the engine recorded
as JSON on its last line of stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXIT_TIMEOUT_S = 20.0

pytestmark = pytest.mark.timeout(60)


def _run_child(script: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    # The default engine logs under platformdirs' user folders: keep them in tmp.
    env.update(
        HOME=str(home),
        XDG_STATE_HOME=str(home / "state"),
        XDG_CACHE_HOME=str(home / "cache"),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        PYTHONUNBUFFERED="1",
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the interpreter did not exit within {EXIT_TIMEOUT_S:g} s\n"
            f"stdout:\n{exc.stdout!r}\nstderr:\n{exc.stderr!r}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report from the child (rc={proc.returncode})\nstderr:\n{proc.stderr}"
    return proc, json.loads(lines[-1])


STUCK_WITH_SHUTDOWN = """
import json, sys, threading, time
from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry, KindSpec

block, state_dir, log_dir = sys.argv[1], sys.argv[2] or None, sys.argv[3]
started = threading.Event()
never = threading.Event()

def stuck(ctx, params):
    started.set()
    if block == "event":
        never.wait()                 # ignores ctx.cancelled forever
    elif block == "sleep":
        time.sleep(3600)
    elif block == "spin":
        while True:                  # pure Python, never looks at ctx.cancelled
            sum(range(1000))
    return "unreachable"

registry = KindRegistry()
registry.register(KindSpec(name="exit.stuck", handler=stuck))
registry.register(KindSpec(name="exit.quick", handler=lambda ctx, params: "ran"))
config = EngineConfig(max_workers=1, state_dir=state_dir, log_dir=log_dir, console_log=False)
engine = Engine(config, registry=registry).start()
stuck_id = engine.submit("exit.stuck")
queued_id = engine.submit("exit.quick")
assert started.wait(10), "the stuck job never started"
engine.shutdown(timeout=0.5)

report = {
    "stuck": engine.get(stuck_id).state.value,
    "stuck_message": engine.get(stuck_id).message,
    "queued": engine.get(queued_id).state.value,
    "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("taskqueue-")),
}
if state_dir:
    from pathlib import Path
    from blender_taskqueue.engine.store import read_sidecar
    files = sorted(Path(state_dir).glob("queue-*.json"))
    report["sidecars"] = len(files)
    if files:
        report["sidecar"] = {j["id"]: j["state"] for j in read_sidecar(files[0])["jobs"]}
report["ids"] = [stuck_id, queued_id]
print(json.dumps(report), flush=True)
# main returns here while the stuck handler still runs on its worker thread
"""


@pytest.mark.parametrize("block", ["event", "sleep", "spin"])
def test_exit_after_shutdown_with_a_job_that_ignores_cancellation(tmp_path, block) -> None:
    proc, report = _run_child(STUCK_WITH_SHUTDOWN, tmp_path, block, "", str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    assert report["stuck"] == "interrupted", report
    assert "shutdown" in (report["stuck_message"] or ""), report
    assert report["queued"] == "queued", "queued jobs stay queued at shutdown"
    # Only the stuck worker is left; the watchdog, the log thread and idle workers stopped.
    assert len(report["threads"]) == 1 and report["threads"][0].startswith("taskqueue-worker"), (
        report
    )


def test_exit_after_shutdown_with_a_sidecar_records_the_stuck_job(tmp_path) -> None:
    state_dir = tmp_path / "state"
    proc, report = _run_child(
        STUCK_WITH_SHUTDOWN, tmp_path, "event", str(state_dir), str(tmp_path / "logs")
    )
    assert proc.returncode == 0, proc.stderr
    assert (report["stuck"], report["queued"]) == ("interrupted", "queued"), report
    assert len(report["threads"]) == 1, report  # the writer thread stopped too
    stuck_id, queued_id = report["ids"]
    assert report["sidecars"] == 1, report
    assert report["sidecar"] == {stuck_id: "interrupted", queued_id: "queued"}, report


DEFAULT_ENGINE_NO_SHUTDOWN = """
import atexit, json, sys, threading

how = sys.argv[1]
ids = []

def report():
    # Registered before the default engine exists, so it runs after the engine's own
    # atexit shutdown (atexit runs callbacks last-in, first-out).
    import blender_taskqueue as tq
    info = tq.get(ids[0])
    print(json.dumps({
        "state": info.state.value,
        "message": info.message,
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("taskqueue-")),
    }), flush=True)

atexit.register(report)

import blender_taskqueue as tq

started = threading.Event()
never = threading.Event()

@tq.job_kind("exit.stuck_default")
def stuck(ctx, params):
    started.set()
    never.wait()  # ignores cancellation forever

ids.append(tq.submit("exit.stuck_default"))
assert started.wait(10), "the stuck job never started"
if how == "exit":
    sys.exit(3)
if how == "raise":
    raise RuntimeError("the script fails while a job is stuck")
# how == "return": main just ends
"""


@pytest.mark.parametrize("how, code", [("return", 0), ("exit", 3), ("raise", 1)])
def test_exit_without_shutdown_with_the_default_engine(tmp_path, how, code) -> None:
    proc, report = _run_child(DEFAULT_ENGINE_NO_SHUTDOWN, tmp_path, how)
    assert proc.returncode == code, proc.stderr
    assert report["state"] == "interrupted", report
    assert "shutdown" in (report["message"] or ""), report
    assert all(name.startswith("taskqueue-worker") for name in report["threads"]), report
    if how == "raise":
        assert "the script fails while a job is stuck" in proc.stderr


STUCK_ON_MAIN_THREAD_CALL = """
import json, sys, threading
from blender_taskqueue.engine import Engine, EngineConfig, KindRegistry, KindSpec

asked = threading.Event()

def needs_main(ctx, params):
    asked.set()
    return ctx.call_on_main(lambda: "never runs: nobody pumps")

registry = KindRegistry()
registry.register(KindSpec(name="exit.main_call", handler=needs_main))
engine = Engine(
    EngineConfig(max_workers=2, log_dir=sys.argv[1], console_log=False), registry=registry
).start()
job_id = engine.submit("exit.main_call")
assert asked.wait(10)
engine.shutdown(timeout=10.0)
info = engine.get(job_id)
print(json.dumps({
    "state": info.state.value,
    "message": info.message,
    "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("taskqueue-")),
}), flush=True)
"""


def test_a_job_blocked_on_a_main_thread_call_stops_at_shutdown(tmp_path) -> None:
    """A worker waiting in call_on_main while the main thread shuts down (and so never
    pumps) is released by the stop request: it ends interrupted by itself, and no
    thread is left behind."""
    proc, report = _run_child(STUCK_ON_MAIN_THREAD_CALL, tmp_path, str(tmp_path / "logs"))
    assert proc.returncode == 0, proc.stderr
    assert report["state"] == "interrupted", report
    assert report["message"] == "stopped by shutdown", report  # it stopped, it was not abandoned
    assert report["threads"] == [], report
