"""Pipelines across a crash: an engine process running chains is SIGKILLed at
random points; a new engine adopts its sidecar and finishes the work. Checked
from the handlers' own fsynced log: no job ever starts before each of its
prerequisites ended, no step that ended before the kill runs again, results
passed along after the restart are the ones the prerequisites returned, and
the job waiting for its time keeps exactly its time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blender_taskqueue.engine import JobState

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pipeline_crash_child as child_mod  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def read_log(path: Path) -> list[tuple[str, str, str]]:
    out = []
    for raw in path.read_text().splitlines() if path.exists() else []:
        word, job_id, *rest = raw.split(" ", 2)
        out.append((word, job_id, rest[0] if rest else ""))
    return out


def wait_for_ends(path: Path, n: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while sum(1 for w, _, _ in read_log(path) if w == "end") < n:
        assert proc.poll() is None, "the child died by itself"
        assert time.monotonic() < deadline, f"fewer than {n} jobs ended"
        tick.wait(0.005)


@pytest.mark.parametrize("kill_after", [0, 2, 5, 9])
def test_chains_survive_a_kill_with_order_results_and_times(tmp_path, make_engine, registry, kill_after):
    state, log = tmp_path / "state", tmp_path / "handlers.log"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "pipeline_crash_child.py"), "--state-dir", str(state), "--log", str(log)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("READY "), first
        ready = json.loads(first[len("READY "):])
        wait_for_ends(log, kill_after, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    before = read_log(log)
    ended_before = {j for w, j, _ in before if w == "end"}

    registry.register(child_mod.make_kind(log))
    engine = make_engine(state_dir=state, max_workers=2)
    all_ids = [i for chain in ready["chains"] for i in chain]
    assert engine.wait(all_ids, timeout=60)
    events = read_log(log)
    after = events[len(before):]

    # Nothing that ended before the kill ran again.
    rerun = [j for w, j, _ in after if w == "start" and j in ended_before]
    assert rerun == [], rerun
    # No step started before each of its prerequisites had ended (across both runs).
    ended_at: dict[str, int] = {}
    for n, (word, job_id, _) in enumerate(events):
        if word == "end":
            ended_at.setdefault(job_id, n)
    for chain in ready["chains"]:
        for prev, nxt in zip(chain, chain[1:]):
            for n, (word, job_id, _) in enumerate(events):
                if word == "start" and job_id == nxt:
                    assert prev in ended_at and ended_at[prev] < n, (prev, nxt)
    # Every step ended completed, or interrupted by the kill (plain jobs are not
    # re-run), and then its dependents failed naming it; none is lost.
    for chain in ready["chains"]:
        states = [engine.get(i).state for i in chain]
        for k, (job_id, state) in enumerate(zip(chain, states)):
            assert state in (JobState.COMPLETED, JobState.INTERRUPTED, JobState.FAILED), (job_id, state)
            if state is JobState.FAILED:
                error = engine.get(job_id).error
                assert error.type == "DependencyFailed" and chain[k - 1] in error.message
            if state is JobState.COMPLETED and k:
                assert states[k - 1] is JobState.COMPLETED
        # Results passed along are the prerequisites' own, whichever run they came from.
        for prev, nxt in zip(chain, chain[1:]):
            starts = [rest for w, j, rest in events if w == "start" and j == nxt]
            # (A step whose completion the kill kept off the disk comes back interrupted,
            # with no result, though a dependent may have started on it before the kill.)
            if starts and engine.get(prev).state is JobState.COMPLETED:
                assert json.loads(starts[-1]) == {prev: engine.get(prev).result}
    later = engine.get(ready["later"])
    assert later.state in (JobState.QUEUED, JobState.FAILED)
    if later.state is JobState.QUEUED:
        assert later.not_before == ready["not_before"] and later.depends_on == (ready["chains"][0][0],)
