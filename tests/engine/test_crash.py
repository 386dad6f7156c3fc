"""Real crash tests: a child process runs an engine and is killed with SIGKILL.

The child (``crash_child.py``) queues forty jobs of three kinds on a state dir,
each handler writing an independent, fsynced line log (start/step/end). The
test kills the child at different moments (before the first job finished,
at a random moment mid-queue, right after a flush, and in the middle of a
sidecar write), reads the dead process's sidecar as it was left on disk, then
starts another engine (in this process, or in a second child that is killed
in turn) on the same state dir and lets it run to the end. From the logs and
the adopted engine it checks the requirement:

* every submitted id is there exactly once (ids preserved, nothing lost);
* nothing the sidecar recorded as finished ran again, and it kept its result;
* queued jobs ran and completed;
* running non-resumable jobs are ``interrupted`` with their partial result;
* running resumable jobs resumed with ``ctx.resume_from`` equal to the
  checkpoint on disk, a checkpoint they had written (not from scratch);
* the sidecar never claims more than happened (a job it records completed
  logged its end; a checkpoint it holds was logged);
* ``engine.recovery`` counts what was adopted, and a notice says so.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from blender_taskqueue.engine import JobState
from blender_taskqueue.engine.store import CLAIM_MARK, read_sidecar

CHILD = Path(__file__).with_name("crash_child.py")
_spec = importlib.util.spec_from_file_location("taskqueue_crash_child", CHILD)
child_mod = importlib.util.module_from_spec(_spec)
assert _spec.loader is not None
_spec.loader.exec_module(child_mod)

TERMINAL = {"completed", "failed", "cancelled", "interrupted"}
RESUMABLE_KINDS = child_mod.RESUMABLE_KINDS

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- child process


class Child:
    """One crash_child.py process; its stdout lines are read by a thread into a queue."""

    def __init__(self, tmp_path: Path, state_dir: Path, log: Path, *, mode: str = "submit",
                 trigger: str = "none", name: str = "child") -> None:
        self.stderr_path = tmp_path / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--state-dir", str(state_dir), "--log", str(log),
             "--mode", mode, "--trigger", trigger],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        """The rest of the next stdout line starting with ``prefix`` (waits up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"child never printed {prefix!r}; saw {self.seen}; "
                                     f"stderr: {self.stderr()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"child exited (rc={self.proc.poll()}) before {prefix!r}; "
                                     f"saw {self.seen}; stderr: {self.stderr()}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self) -> float:
        """SIGKILL, then reap (an unreaped zombie would still look like a live owner's pid).
        Returns the monotonic time just before the signal."""
        at = time.monotonic()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.stderr())
        self._stderr.close()
        return at

    def rest(self, timeout: float = 10.0) -> list[str]:
        """Every line the (dead) child printed that was not read yet."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                return out
            self.seen.append(line)
            out.append(line)
        raise AssertionError("the child's stdout did not reach EOF")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._stderr.closed:
            self._stderr.close()


@pytest.fixture
def children():
    made: list[Child] = []
    yield made
    for child in made:
        child.cleanup()


# ----------------------------------------------------------------------------- the line log


class LogView:
    """Parsed handler log: per job id, its starts (attempt, resume_from), steps and ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.starts: dict[str, list[tuple[int, Any]]] = collections.defaultdict(list)
        self.steps: dict[str, list[int]] = collections.defaultdict(list)
        self.ends: collections.Counter[str] = collections.Counter()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        for raw in text.splitlines():
            if not raw:
                continue
            word, job_id, *rest = raw.split(" ")
            if word == "start":
                self.starts[job_id].append((int(rest[0]), json.loads(rest[1])))
            elif word == "step":
                self.steps[job_id].append(int(rest[0]))
            elif word == "end":
                self.ends[job_id] += 1
            else:
                raise AssertionError(f"bad log line {raw!r} in {path}")

    @property
    def n_steps(self) -> int:
        return sum(len(v) for v in self.steps.values())

    @property
    def n_ends(self) -> int:
        return sum(self.ends.values())


def wait_for_log(path: Path, predicate: Callable[[LogView], bool], timeout: float = 30.0) -> LogView:
    """Re-read the fsynced log file until ``predicate`` holds (the file is the event)."""
    deadline = time.monotonic() + timeout
    while True:
        view = LogView(path)
        if predicate(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"log {path} never satisfied the condition: "
                                 f"{view.n_steps} steps, {view.n_ends} ends")
        time.sleep(0.005)


# ----------------------------------------------------------------------------- sidecar on disk


class Snapshot:
    """The dead process's sidecar exactly as it was left on disk."""

    def __init__(self, state_dir: Path, owner_pid: int) -> None:
        files = sorted(p for p in state_dir.glob("queue-*.json"))
        assert len(files) == 1, f"expected exactly the dead child's sidecar, found {files}"
        self.path = files[0]
        self.raw = self.path.read_bytes()
        data = read_sidecar(self.path)  # the file a killed process leaves must always parse
        assert data["owner"]["pid"] == owner_pid, "the sidecar must record its owning process"
        assert data["closed"] is False, "a killed process cannot have closed its sidecar"
        self.jobs: dict[str, dict] = {}
        for entry in data["jobs"]:
            assert entry["id"] not in self.jobs, f"job {entry['id']} twice in one sidecar"
            self.jobs[entry["id"]] = entry

    def count(self, state: str) -> int:
        return sum(1 for e in self.jobs.values() if e["state"] == state)

    def classify(self) -> collections.Counter:
        """What adoption should make of each entry (the keys of Recovery)."""
        out: collections.Counter = collections.Counter()
        for e in self.jobs.values():
            if e["state"] in TERMINAL:
                out["finished"] += 1
            elif e["state"] == "running":
                out["resumed" if e["kind"] in RESUMABLE_KINDS else "interrupted"] += 1
            else:
                out["requeued"] += 1
        return out


def partial_of(entry: dict) -> Any:
    return entry.get("checkpoint") if entry.get("partial_is_checkpoint") else entry.get("partial_result")


def expected_result(entry: dict, job_id: str) -> dict:
    params = entry["params"]
    if entry["kind"] == child_mod.QUICK:
        return {"id": job_id, "tag": params["tag"]}
    return {"id": job_id, "steps": params["steps"], "tag": params["tag"]}


# ----------------------------------------------------------------------------- the checks


def check_sidecar_not_ahead(snap: Snapshot, prev: Optional[Snapshot], logs_so_far: list[LogView],
                            this_log: LogView) -> None:
    """What the sidecar records must have happened: a completion it holds was logged
    by this process; a checkpoint it holds was logged before it was taken."""
    for job_id, e in snap.jobs.items():
        was_completed = prev is not None and prev.jobs.get(job_id, {}).get("state") == "completed"
        if e["state"] == "completed" and not was_completed:
            assert this_log.ends[job_id] >= 1, f"sidecar says {job_id} completed, log has no end"
        ckpt = e.get("checkpoint")
        if ckpt is not None:
            written = {n for log in logs_so_far for n in log.steps.get(job_id, [])}
            assert ckpt["step"] in written, f"sidecar checkpoint {ckpt} of {job_id} never logged"


def check_transition(snap: Snapshot, earlier: list[LogView], later: list[LogView],
                     final: dict, is_final_phase: bool) -> collections.Counter:
    """Adoption of ``snap`` by the phase whose log is ``later[0]``; ``later`` holds the
    logs of every phase from then on, ``final`` the last engine's jobs by id."""
    this_log = later[0]
    seen: collections.Counter = collections.Counter()
    for job_id, e in snap.jobs.items():
        kind, state = e["kind"], e["state"]
        later_starts = [s for log in later for s in log.starts.get(job_id, [])]
        got = final[job_id]
        if state in TERMINAL:
            assert not later_starts, f"{job_id} was recorded {state} but ran again: {later_starts}"
            assert got.state.value == state, (job_id, state, got.state)
            if state == "completed":
                assert got.result == e["result"], (job_id, got.result, e["result"])
                assert got.progress == 1.0
            seen["finished"] += 1
        elif state == "running" and kind not in RESUMABLE_KINDS:
            assert not later_starts, f"running non-resumable {job_id} ran again: {later_starts}"
            assert got.state is JobState.INTERRUPTED, (job_id, got.state)
            assert got.partial_result == partial_of(e), (job_id, got.partial_result, partial_of(e))
            assert got.message, "an interrupted job says why"
            seen["interrupted"] += 1
        else:
            resumable = kind in RESUMABLE_KINDS
            want = e.get("checkpoint") if resumable else None
            starts = this_log.starts.get(job_id, [])
            if starts:
                assert starts[0][1] == want, (
                    f"{job_id} ({kind}, {state} on disk) started with resume_from={starts[0][1]}, "
                    f"expected {want}")
            if resumable and want is not None:
                written = {n for log in earlier for n in log.steps.get(job_id, [])}
                assert want["step"] in written, f"{job_id} resumed from {want}, never written"
                steps = this_log.steps.get(job_id, [])
                if steps:
                    assert steps[0] == want["step"] + 1, f"{job_id} did not go on from {want}: {steps}"
                seen["resumed_from_checkpoint"] += 1
            if is_final_phase:
                assert len(starts) == 1, f"{job_id} started {len(starts)} times in the last run"
                assert this_log.ends[job_id] == 1
                assert got.state is JobState.COMPLETED, (job_id, got.state, got.message, got.error)
                assert got.result == expected_result(e, job_id)
            seen["resumed" if state == "running" else "requeued"] += 1
    return seen


def check_final(engine, submitted: list[str], last: Snapshot) -> None:
    infos = engine.jobs()
    ids = [j.id for j in infos]
    assert len(ids) == len(set(ids)), "a job appears twice"
    assert set(ids) == set(submitted), (
        f"lost: {set(submitted) - set(ids)}, extra: {set(ids) - set(submitted)}")
    assert all(j.is_terminal for j in infos)
    assert {j.state for j in infos} <= {JobState.COMPLETED, JobState.INTERRUPTED}
    rec = engine.recovery
    assert rec is not None, "engine.recovery must report the adopted session"
    want = last.classify()
    assert rec.sources == (last.path.name,)
    assert (rec.requeued, rec.resumed, rec.interrupted, rec.finished) == (
        want["requeued"], want["resumed"], want["interrupted"], want["finished"]), (rec, want)
    assert rec.duplicates == 0 and rec.moved_aside == () and rec.problems == ()
    assert rec.held == 0
    assert rec.adopted == len(submitted)
    # The dead process's file (and the claim made of it) is gone once ours holds its jobs.
    left = [p.name for p in last.path.parent.iterdir()
            if p.name.startswith("queue-") and p not in (engine.sidecar_path, engine.store.lock.path)]
    assert left == [], f"adopted sidecar left behind: {left}"
    on_disk = {j["id"] for j in read_sidecar(engine.sidecar_path)["jobs"]}
    assert on_disk == set(submitted)


def adopt_in_process(make_engine, registry, state_dir: Path, log: Path):
    child_mod.register_kinds(registry, log)
    engine = make_engine(state_dir=state_dir, max_workers=4)
    assert engine.wait(timeout=60), "the adopted queue did not finish"
    assert engine.flush(), engine.stats().write_error
    notices = [e for e in engine.drain_events() if e.type == "notice"]
    assert any("recovered" in (e.message or "") for e in notices), notices
    return engine


def start_child_run(tmp_path: Path, children: list, trigger: str = "none"):
    state = tmp_path / "state"
    state.mkdir()
    log1 = tmp_path / "log1.txt"
    child = Child(tmp_path, state, log1, trigger=trigger, name="child1")
    children.append(child)
    ready = json.loads(child.expect("READY", 60))
    assert ready["flushed"]
    ids = ready["ids"]
    assert len(ids) == child_mod.N_JOBS
    return state, log1, child, ids


# ----------------------------------------------------------------------------- tests

MOMENTS = [
    "before_first_end",
    "mid_queue",
    "after_flush",
    "midwrite:tmp_half",
    "midwrite:before_rename",
    "midwrite:after_rename",
]


RUNS = [(m, rep) for m in MOMENTS for rep in range(6 if m == "mid_queue" else 3)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("moment", "rep"), RUNS)
def test_crash_then_adopt(tmp_path, make_engine, registry, children, moment, rep):
    trigger = moment if moment.startswith("midwrite:") or moment == "after_flush" else "none"
    state, log1, child, ids = start_child_run(tmp_path, children, trigger)
    flushed = None
    if moment == "before_first_end":
        seen = wait_for_log(log1, lambda v: v.n_steps >= 2)
    elif moment == "mid_queue":
        time.sleep(random.Random(f"{moment}-{rep}-{os.getpid()}").uniform(0.1, 0.9))  # a random kill moment
    elif moment == "after_flush":
        rid, pid, ok = child.expect("FLUSHED", 60).split()
        assert ok == "True"
        flushed = (rid, pid)
    else:
        phase, completed = child.expect("MIDWRITE", 60).split()
        assert int(completed) >= 3
    child.kill()

    log1_view = LogView(log1)
    snap = Snapshot(state, child.pid)
    assert set(snap.jobs) == set(ids), "a submit made durable by flush() was lost"
    check_sidecar_not_ahead(snap, None, [log1_view], log1_view)

    tmp = state / f".{snap.path.name}.tmp"
    if moment == "before_first_end" and seen.n_ends == 0:
        assert log1_view.n_steps >= 2
    if moment == "midwrite:tmp_half":
        assert tmp.exists(), "the kill was meant to land in the middle of a write"
        with pytest.raises(ValueError):
            json.loads(tmp.read_bytes())  # half a document was on disk...
        assert snap.count("completed") < 3  # ...while the file still held the previous write
    elif moment == "midwrite:before_rename":
        assert json.loads(tmp.read_bytes())["jobs"]
        assert snap.count("completed") < 3
    elif moment == "midwrite:after_rename":
        assert snap.count("completed") >= 3
    if flushed:
        rid, pid = flushed
        assert snap.jobs[rid]["state"] == "running" and snap.jobs[rid]["checkpoint"] == {"step": 2}
        assert snap.jobs[pid]["state"] == "running" and partial_of(snap.jobs[pid]) == {"step": 1}

    log2 = tmp_path / "log2.txt"
    engine = adopt_in_process(make_engine, registry, state, log2)
    log2_view = LogView(log2)
    final = {j.id: j for j in engine.jobs()}
    seen_kinds = check_transition(snap, [log1_view], [log2_view], final, is_final_phase=True)
    check_final(engine, ids, snap)

    if flushed:
        rid, pid = flushed
        assert log2_view.starts[rid][0][1] == {"step": 2}
        assert log2_view.steps[rid][0] == 3, "resumed, not run from scratch"
        assert final[pid].state is JobState.INTERRUPTED
        assert final[pid].partial_result == {"step": 1}
        assert seen_kinds["resumed_from_checkpoint"] >= 1 and seen_kinds["interrupted"] >= 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rep", range(3))
def test_crash_twice_then_adopt(tmp_path, make_engine, registry, children, rep):
    """Crash, adopt in a second process, crash that one too, adopt again: ids survive
    both, and each adoption starts from what its predecessor's sidecar held."""
    rng = random.Random(f"twice-{rep}-{os.getpid()}")
    state, log1, child1, ids = start_child_run(tmp_path, children)
    wait_for_log(log1, lambda v: v.n_ends >= 2)
    time.sleep(rng.uniform(0.0, 0.3))  # a random kill moment after the first completions
    child1.kill()
    log1_view = LogView(log1)
    snap1 = Snapshot(state, child1.pid)
    assert set(snap1.jobs) == set(ids)
    check_sidecar_not_ahead(snap1, None, [log1_view], log1_view)

    log2 = tmp_path / "log2.txt"
    child2 = Child(tmp_path, state, log2, mode="adopt", name="child2")
    children.append(child2)
    adopted = json.loads(child2.expect("ADOPTED", 60))
    assert adopted["flushed"]
    rec = adopted["recovery"]
    want = snap1.classify()
    assert rec["sources"] == [snap1.path.name]
    assert (rec["requeued"], rec["resumed"], rec["interrupted"], rec["finished"]) == (
        want["requeued"], want["resumed"], want["interrupted"], want["finished"])
    # Kill the adopter while it works through the adopted queue.
    time.sleep(rng.uniform(0.05, 0.5))
    child2.kill()
    log2_view = LogView(log2)
    snap2 = Snapshot(state, child2.pid)
    assert set(snap2.jobs) == set(ids), "the adopter's sidecar lost adopted jobs"
    check_sidecar_not_ahead(snap2, snap1, [log1_view, log2_view], log2_view)
    for job_id, e in snap1.jobs.items():  # history carried over unchanged
        if e["state"] in TERMINAL:
            assert snap2.jobs[job_id]["state"] == e["state"]

    log3 = tmp_path / "log3.txt"
    engine = adopt_in_process(make_engine, registry, state, log3)
    log3_view = LogView(log3)
    final = {j.id: j for j in engine.jobs()}
    check_transition(snap1, [log1_view], [log2_view, log3_view], final, is_final_phase=False)
    check_transition(snap2, [log1_view, log2_view], [log3_view], final, is_final_phase=True)
    check_final(engine, ids, snap2)


@pytest.mark.timeout(60)
def test_live_process_queue_is_never_adopted(tmp_path, make_engine, registry, children):
    """A second engine never touches the sidecar of a process that still runs; once
    that process is killed, the next engine adopts it."""
    state = tmp_path / "state"
    state.mkdir()
    child = Child(tmp_path, state, tmp_path / "log1.txt", mode="idle", name="idle")
    children.append(child)
    ready = json.loads(child.expect("READY", 60))
    ids = ready["ids"]
    theirs = Path(ready["sidecar"])
    before = theirs.read_bytes()

    child_mod.register_kinds(registry, tmp_path / "log2.txt")
    mine = make_engine(state_dir=state, max_workers=2)
    assert mine.recovery is None
    assert mine.jobs() == []
    mine_id = mine.submit(child_mod.QUICK, {"tag": 99})
    assert mine.wait([mine_id], timeout=30)
    assert mine.flush()
    assert theirs.read_bytes() == before, "a live process's sidecar was touched"
    assert not list(state.glob(f"*{CLAIM_MARK}*"))
    assert {j["id"] for j in read_sidecar(mine.sidecar_path)["jobs"]} == {mine_id}
    mine.shutdown()

    child.kill()
    engine = make_engine(state_dir=state, max_workers=4)
    assert engine.recovery is not None
    assert theirs.name in engine.recovery.sources
    assert engine.recovery.requeued == len(ids)
    assert engine.wait(timeout=60)
    got = {j.id: j for j in engine.jobs()}
    assert set(ids) <= set(got)
    assert all(got[i].state is JobState.COMPLETED for i in ids)
    assert mine_id in got and got[mine_id].state is JobState.COMPLETED  # our clean-closed history
    log = LogView(tmp_path / "log2.txt")
    assert all(len(log.starts[i]) == 1 and log.ends[i] == 1 for i in ids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rep", range(3))
def test_crash_while_submitting(tmp_path, make_engine, registry, children, rep):
    """Killed while jobs are being submitted one by one (and running): every submit
    that returned 0.5 s before the kill is in the sidecar (durable within 0.5 s
    without flush), the sidecar holds nothing that was not submitted, and the
    adopter accounts for every job it holds."""
    rng = random.Random(f"submitting-{rep}-{os.getpid()}")
    state = tmp_path / "state"
    state.mkdir()
    log1 = tmp_path / "log1.txt"
    child = Child(tmp_path, state, log1, mode="trickle", name="trickle")
    children.append(child)
    child.expect("READY", 60)
    for _ in range(rng.randint(8, 35)):
        child.expect("SUBMITTED", 30)
    killed_at = child.kill()
    child.rest()  # the lines it printed before it died, not read yet
    printed = {}
    for line in [*child.seen]:
        if line.startswith("SUBMITTED "):
            _, job_id, at = line.split()
            printed[job_id] = float(at)
    assert len(printed) >= 8
    snap = Snapshot(state, child.pid)
    durable_by_now = {i for i, at in printed.items() if at < killed_at - 0.5}
    missing = durable_by_now - set(snap.jobs)
    assert not missing, f"submits older than 0.5 s were not in the sidecar: {sorted(missing)}"
    prefix = next(iter(printed)).rsplit("-", 1)[0]
    top = max(int(i.rsplit("-", 1)[1]) for i in printed)
    in_flight = {f"{prefix}-{top + 1}"}  # returned by submit but killed before it printed
    assert set(snap.jobs) <= set(printed) | in_flight, set(snap.jobs) - set(printed)
    log1_view = LogView(log1)
    check_sidecar_not_ahead(snap, None, [log1_view], log1_view)

    log2 = tmp_path / "log2.txt"
    engine = adopt_in_process(make_engine, registry, state, log2)
    final = {j.id: j for j in engine.jobs()}
    check_transition(snap, [log1_view], [LogView(log2)], final, is_final_phase=True)
    check_final(engine, list(snap.jobs), snap)
