#!/usr/bin/env python3
"""Benchmark of the blender_taskqueue engine against a raw ThreadPoolExecutor.

Run from the repository root::

    python scripts/bench.py              # full run (15-30 s on 2 cores)
    python scripts/bench.py --quick      # CI smoke run (well under 20 s)
    python scripts/bench.py --json-only  # only the JSON line

What is measured, and why
-------------------------
The engine adds bookkeeping on top of "run a callable on a thread": job records,
a priority scheduler, state events for the UI pump, logging, limits. This script
measures what that bookkeeping costs on the paths that matter to a user:

* **Throughput** – 10,000 no-op jobs, from the first ``submit`` until
  ``Engine.wait`` returns (engine with ``max_workers=4``), against the same
  number of no-op callables on ``concurrent.futures.ThreadPoolExecutor(4)``
  until ``concurrent.futures.wait`` returns. Several rounds, alternating which
  side goes first; the figure is the median of the per-round ratios (each
  round runs both sides back to back), next to the median jobs/s of each
  side. The JSON details keep every round and the process's context switches
  per job: on a busy machine the engine's threads can fall into a lock convoy
  (several switches per job, half the throughput), which the per-round
  figures make visible.
* **Submit latency** – p50/p99 of single ``submit`` calls into a *paused*
  engine (so dispatch does not interfere), against ``ThreadPoolExecutor.submit``
  into a pool whose four workers are blocked (so its futures also stay queued).
* **Cancel and move latency** – in the same paused engine with 10,000 jobs
  queued: p99 of ``cancel`` on 2,000 random queued jobs, then of 10,000
  ``move(job, top|up|down|bottom)`` calls on random jobs of the 8,000 left.
  ``Future.cancel`` on a queued future is the cancel baseline; the executor
  has no equivalent of ``move``. Latency figures are the median over a few
  rounds. The garbage collector stays enabled: its pauses are part of what a
  caller feels, and they are what sets the p99 of ``submit``.
* **Memory per queued job** – the ``tracemalloc`` difference before and after
  queueing 10,000 jobs in a paused engine, divided by 10,000 (the undrained
  state events count, as they are part of what a queued job costs until the
  pump runs; the figure after ``drain_events`` is reported too). The baseline
  is a queued ``Future`` of the blocked executor.
* **drain_events cost** – eight jobs (``max_workers=8``) call ``ctx.progress``
  in a tight loop while the main thread calls ``drain_events`` every 10 ms,
  like Blender's pump, and records each call's wall time (which includes
  waiting for the engine lock and the GIL against eight busy threads: that is
  what Blender's main thread would feel). Given as context: progress calls per
  second, the longest gap between two pumps (a starved main thread), and how
  many drains reported dropped events (the event queue overflowed; the pump
  then re-reads the jobs, as the resync notice asks).
* **process.run overhead** – the built-in ``process.run`` kind (submit until
  ``Engine.wait`` returns) against ``subprocess.run(argv, capture_output=True)``
  on the same command, for a command that sleeps 100 ms and for one that prints
  100,000 lines (the kind streams them to its log file and parses progress from
  every line with a ``current/total`` regex). Paired rounds, alternating which
  side goes first; the figure is the median per-round ratio.

Why ratios against an in-run baseline: absolute numbers depend on the machine,
the Python build and whatever else the CPU is doing (CI runners and laptops are
noisy). The raw executor is measured in the same process, on the same data and
interleaved with the engine, so ``engine / raw`` cancels most of that noise and
says what the engine itself adds. The absolute targets (µs, KiB, ms) are kept
because they are what a Blender user notices.

Each figure gets a verdict (meets / misses target). A missed target never makes
the script fail: speed is reported here, not asserted. The exit status is
non-zero (1) only when something could not be measured because the code under
test raised; such a section is reported as an error (table and JSON
``errors``) and the other sections still run. The last line of stdout is
always one JSON object with every figure.

Only the standard library and the package itself are used; the repository root
is put on ``sys.path`` so the script also runs without the package installed
(its runtime dependencies, e.g. pydantic and structlog, must be importable).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

try:
    from blender_taskqueue import __file__ as _package_file
    from blender_taskqueue.engine import Engine, EngineConfig, JobContext, KindRegistry, job_kind
except ImportError as _exc:  # pragma: no cover - environment problem, not a bench result
    print(
        f"bench: cannot import blender_taskqueue ({_exc}); install its dependencies "
        "(pip install -e .) or run with the project's virtualenv",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

try:
    import resource  # Unix only: context switches are a diagnostic, not a figure
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

NOOP_KIND = "bench.noop"
PROGRESS_KIND = "bench.progress"
MOVE_WHERE = ("top", "up", "down", "bottom")
WAIT_TIMEOUT_S = 300.0
SEED = 20240601

# Targets: (comparison, limit). "min" means value >= limit, "max" means value < limit.
TARGETS: dict[str, tuple[str, float]] = {
    "throughput_ratio": ("min", 0.40),
    "submit_p99_us": ("max", 50.0),
    "cancel_p99_us": ("max", 100.0),
    "move_p99_us": ("max", 100.0),
    "memory_per_job_bytes": ("max", 2048.0),
    "drain_p99_ms": ("max", 1.0),
    "sidecar_write_ms": ("max", 100.0),
    "adoption_ms": ("max", 500.0),
    "process_overhead_ratio": ("max", 1.5),
    "render_overhead_ratio": ("max", 1.5),
    "cancel_stop_ms": ("max", 1000.0),
    "comfyui_overhead_ratio": ("max", 1.1),
    "pipeline_throughput_ratio": ("min", 0.8),
    "submit_depends_p99_us": ("max", 50.0),
}


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    throughput_jobs: int
    throughput_rounds: int
    queued_jobs: int  # jobs queued for the submit / move / cancel / memory sections
    latency_rounds: int
    moves: int
    cancels: int
    progress_jobs: int
    progress_iterations: int  # ctx.progress calls per job
    pump_interval_s: float
    process_rounds: int  # paired rounds of each process.run command
    process_lines: int  # lines printed by the "many lines" command
    render_rounds: int  # paired rounds of blender.render against `blender -b -a`
    comfyui_rounds: int = 3  # paired rounds of comfyui.prompt against a plain client


FULL = Sizes(
    throughput_jobs=10_000,
    throughput_rounds=5,
    queued_jobs=10_000,
    latency_rounds=3,
    moves=10_000,
    cancels=2_000,
    progress_jobs=8,
    progress_iterations=300_000,
    pump_interval_s=0.010,
    process_rounds=5,
    process_lines=100_000,
    render_rounds=4,
    comfyui_rounds=8,
)
QUICK = Sizes(
    throughput_jobs=5_000,
    throughput_rounds=3,
    queued_jobs=5_000,
    latency_rounds=1,
    moves=5_000,
    cancels=1_000,
    progress_jobs=8,
    progress_iterations=100_000,
    pump_interval_s=0.010,
    process_rounds=2,
    process_lines=100_000,
    render_rounds=2,
)


@dataclass
class Figure:
    """One line of the report."""

    key: str
    label: str
    unit: str
    value: float
    baseline: Optional[float] = None  # the raw executor's figure, where there is one
    target: Optional[str] = None  # key into TARGETS; None = context only
    note: str = ""
    paired_ratio: Optional[float] = None  # median of per-round ratios, when rounds were paired

    @property
    def ratio(self) -> Optional[float]:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def meets_target(self) -> Optional[bool]:
        if self.target is None:
            return None
        kind, limit = TARGETS[self.target]
        measured = self.ratio if self.target.endswith("_ratio") else self.value
        if measured is None:
            return None
        return measured >= limit if kind == "min" else measured < limit

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        kind, limit = TARGETS[self.target]
        what = "ratio" if self.target.endswith("_ratio") else self.unit
        return f"{what} {'>=' if kind == 'min' else '<'} {limit:g}"

    def as_json(self) -> dict[str, Any]:
        return {
            "value": _round(self.value),
            "unit": self.unit,
            "baseline": _round(self.baseline),
            "ratio": _round(self.ratio),
            "target": self.target_text or None,
            "meets_target": self.meets_target,
        }


@dataclass
class Report:
    mode: str
    sizes: Sizes
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # figure or section key -> what broke

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)

    def fail(self, key: str, message: str) -> None:
        """Record that ``key`` could not be measured because the code under test broke."""
        self.errors.setdefault(key, message)


# --------------------------------------------------------------------------- helpers


def _round(x: Optional[float]) -> Optional[float]:
    if x is None:
        return None
    if x == 0 or not math.isfinite(x):
        return x
    digits = max(0, 3 - int(math.floor(math.log10(abs(x)))))
    return round(x, digits)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def _us(ns_samples: Sequence[int], q: float) -> float:
    return percentile(ns_samples, q) / 1000.0


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"  .. {message}", file=sys.stderr, flush=True)


def _describe_error(exc: BaseException, during: str) -> str:
    """One line naming the exception and the innermost frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = (
        f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"
        if frames
        else ""
    )
    return f"{type(exc).__name__}: {exc} (during {during}{where})"


def _context_switches() -> int:
    """Voluntary + involuntary context switches of this process so far (0 where unknown)."""
    if resource is None:
        return 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def _timed_job(engine: Engine, kind: str, params: dict[str, Any]) -> float:
    """Seconds from submit until ``kind``'s job completed; raise if it did not."""
    t0 = time.perf_counter()
    job = engine.submit(kind, params)
    if not engine.wait([job], timeout=WAIT_TIMEOUT_S):
        raise RuntimeError(f"{kind} job {job} did not finish")
    elapsed = time.perf_counter() - t0
    info = engine.get(job)
    if info.state != "completed":
        raise RuntimeError(f"{kind} job ended {info.state}: {info.error}")
    return elapsed


def _paired(
    report: Report,
    key: str,
    label: str,
    rounds: int,
    engine_side: Callable[[int], float],
    raw_side: Callable[[int], float],
    target: str,
    note: str,
    details_key: Optional[str] = None,
) -> None:
    """Run ``rounds`` pairs, alternating which side goes first, and report the median
    engine time against the median raw time with the median of per-pair ratios (as
    figure ``<key>_ms``; the samples under ``details_key``, default ``key``)."""
    eng: list[float] = []
    raw: list[float] = []
    for r in range(rounds):
        pair = (engine_side, raw_side) if r % 2 == 0 else (raw_side, engine_side)
        for side in pair:
            (eng if side is engine_side else raw).append(side(r))
    report.add(Figure(
        f"{key}_ms", f"{label} (median of {rounds})", "ms",
        statistics.median(eng) * 1000, statistics.median(raw) * 1000,
        target=target, note=note,
        paired_ratio=statistics.median([e / b for e, b in zip(eng, raw, strict=True)]),
    ))
    report.details[details_key or key] = {
        "engine_ms": [_round(x * 1000) for x in eng], "raw_ms": [_round(x * 1000) for x in raw],
    }


def _noop_raw() -> None:
    return None


def _block_on(gate: threading.Event, started: threading.Semaphore) -> None:
    started.release()
    gate.wait()


@contextlib.contextmanager
def blocked_pool(workers: int = 4) -> Iterator[cf.ThreadPoolExecutor]:
    """A ThreadPoolExecutor whose workers all wait on a gate, so new futures stay queued
    (the executor's equivalent of a paused engine)."""
    pool = cf.ThreadPoolExecutor(workers)
    gate = threading.Event()
    started = threading.Semaphore(0)
    try:
        for _ in range(workers):
            pool.submit(_block_on, gate, started)
        for _ in range(workers):
            if not started.acquire(timeout=10.0):
                raise RuntimeError("executor workers did not start")
        yield pool
    finally:
        gate.set()
        pool.shutdown(wait=True, cancel_futures=True)


class Bench:
    """Owns the private kinds registry and the temporary log folder."""

    def __init__(self, sizes: Sizes, quiet: bool) -> None:
        self.sizes = sizes
        self.quiet = quiet
        self.registry = KindRegistry()
        self._tmp = tempfile.TemporaryDirectory(prefix="tq-bench-")
        self.log_dir = Path(self._tmp.name)

        @job_kind(NOOP_KIND, registry=self.registry)
        def noop(ctx: JobContext, params: dict[str, Any]) -> None:
            return None

        self.progress_spans: list[tuple[float, float]] = []
        spans = self.progress_spans

        @job_kind(PROGRESS_KIND, registry=self.registry)
        def progress(ctx: JobContext, params: dict[str, Any]) -> int:
            n = int(params["iterations"])
            report = ctx.progress
            start = time.perf_counter()
            for i in range(n):
                report(i / n)
            spans.append((start, time.perf_counter()))  # list.append is atomic
            return n

    def close(self) -> None:
        self._tmp.cleanup()

    @contextlib.contextmanager
    def engine(self, max_workers: int = 4, *, paused: bool = False) -> Iterator[Engine]:
        config = EngineConfig(max_workers=max_workers, log_dir=self.log_dir, console_log=False)
        engine = Engine(config, registry=self.registry)
        if paused:
            engine.pause()
        engine.start()
        try:
            yield engine
        finally:
            engine.shutdown(wait=True, timeout=10.0)

    # ----------------------------------------------------------------------- throughput

    def _engine_throughput_round(self, n: int) -> tuple[float, float]:
        with self.engine(4) as engine:
            warm = [engine.submit(NOOP_KIND) for _ in range(16)]
            if not engine.wait(warm, timeout=WAIT_TIMEOUT_S):
                raise RuntimeError("engine warm-up jobs did not finish")
            engine.drain_events()
            gc.collect()
            submit = engine.submit
            switches = _context_switches()
            t0 = time.perf_counter()
            ids = [submit(NOOP_KIND) for _ in range(n)]
            finished = engine.wait(ids, timeout=WAIT_TIMEOUT_S)
            elapsed = time.perf_counter() - t0
            switches = _context_switches() - switches
            if not finished:
                raise RuntimeError(f"engine did not finish {n} jobs in {WAIT_TIMEOUT_S:g} s")
            stats = engine.stats()
            if stats.completed != n + len(warm):
                raise RuntimeError(f"expected {n + len(warm)} completed jobs, stats say {stats}")
        return n / elapsed, switches / n

    def _raw_throughput_round(self, n: int) -> tuple[float, float]:
        with cf.ThreadPoolExecutor(4) as pool:
            cf.wait([pool.submit(_noop_raw) for _ in range(16)])
            gc.collect()
            submit = pool.submit
            switches = _context_switches()
            t0 = time.perf_counter()
            futures = [submit(_noop_raw) for _ in range(n)]
            _, not_done = cf.wait(futures, timeout=WAIT_TIMEOUT_S)
            elapsed = time.perf_counter() - t0
            switches = _context_switches() - switches
            if not_done:
                raise RuntimeError(f"executor did not finish {n} callables in {WAIT_TIMEOUT_S:g} s")
        return n / elapsed, switches / n

    def throughput(self, report: Report) -> None:
        n, rounds = self.sizes.throughput_jobs, self.sizes.throughput_rounds
        eng: list[tuple[float, float]] = []
        raw: list[tuple[float, float]] = []
        for r in range(rounds):
            _log(self.quiet, f"throughput round {r + 1}/{rounds} ({n} no-op jobs each side)")
            # Alternate the order so slow drift of the machine hits both sides alike.
            if r % 2 == 0:
                eng.append(self._engine_throughput_round(n))
                raw.append(self._raw_throughput_round(n))
            else:
                raw.append(self._raw_throughput_round(n))
                eng.append(self._engine_throughput_round(n))
        ratios = [e[0] / r[0] for e, r in zip(eng, raw, strict=True)]
        report.add(
            Figure(
                "throughput_jobs_per_s",
                f"throughput, {n:,} no-op jobs (median of {rounds})",
                "jobs/s",
                statistics.median(e[0] for e in eng),
                statistics.median(r[0] for r in raw),
                target="throughput_ratio",
                note=f"round ratios {min(ratios):.2f}..{max(ratios):.2f}" if rounds > 1 else "",
                # Each round runs both sides back to back, so the ratio within a round is
                # the least noisy comparison; its median is the figure.
                paired_ratio=statistics.median(ratios),
            )
        )
        report.details["throughput_rounds"] = {
            "engine_jobs_per_s": [_round(e[0]) for e in eng],
            "raw_jobs_per_s": [_round(r[0]) for r in raw],
            "ratio": [_round(x) for x in ratios],
            # Many switches per job mean the threads convoy on a lock instead of running.
            "engine_context_switches_per_job": [_round(e[1]) for e in eng],
            "raw_context_switches_per_job": [_round(r[1]) for r in raw],
        }

    # ----------------------------------------------------------------------- latencies

    def _engine_latency_round(self, seed: int) -> tuple[dict[str, list[int]], dict[str, str]]:
        """Submit ``queued_jobs`` into a paused engine, cancel random ones, then move random
        ones. Returns the samples (ns) per operation and the errors of operations that broke
        (a broken ``move`` must not hide the submit and cancel figures)."""
        n, moves, cancels = self.sizes.queued_jobs, self.sizes.moves, self.sizes.cancels
        rng = random.Random(seed)
        ns = time.perf_counter_ns
        samples: dict[str, list[int]] = {}
        errors: dict[str, str] = {}
        with self.engine(4, paused=True) as engine:
            warm = [engine.submit(NOOP_KIND) for _ in range(16)]
            for job_id in warm:
                engine.cancel(job_id)
            engine.drain_events()
            gc.collect()

            submit = engine.submit
            ids: list[str] = [""] * n
            submit_ns = samples["submit"] = [0] * n
            for i in range(n):
                t0 = ns()
                ids[i] = submit(NOOP_KIND)
                submit_ns[i] = ns() - t0

            doomed = rng.sample(range(n), cancels)
            cancel = engine.cancel
            cancel_ns = samples["cancel"] = [0] * cancels
            for i, index in enumerate(doomed):
                job_id = ids[index]
                t0 = ns()
                ok = cancel(job_id)
                cancel_ns[i] = ns() - t0
                if not ok:
                    raise RuntimeError(f"cancel({job_id!r}) of a queued job returned False")
            if engine.stats().queued != n - cancels:
                raise RuntimeError("queue length is off after the cancels")

            gone = set(doomed)
            queued = [job_id for i, job_id in enumerate(ids) if i not in gone]
            plan = [
                (queued[rng.randrange(len(queued))], MOVE_WHERE[rng.randrange(4)])
                for _ in range(moves)
            ]
            move = engine.move
            move_ns: list[int] = []
            try:
                for job_id, where in plan:
                    t0 = ns()
                    move(job_id, where)
                    move_ns.append(ns() - t0)
            except Exception as exc:
                errors["move"] = _describe_error(exc, f"move #{len(move_ns) + 1} ({where!r})")
            if "move" not in errors:  # partial samples of a broken run would mislead
                samples["move"] = move_ns
        return samples, errors

    def _raw_latency_round(self, seed: int) -> dict[str, list[int]]:
        n, cancels = self.sizes.queued_jobs, self.sizes.cancels
        rng = random.Random(seed)
        ns = time.perf_counter_ns
        with blocked_pool(4) as pool:
            gc.collect()
            submit = pool.submit
            futures: list[Any] = [None] * n
            submit_ns = [0] * n
            for i in range(n):
                t0 = ns()
                futures[i] = submit(_noop_raw)
                submit_ns[i] = ns() - t0
            cancel_ns = [0] * cancels
            for i, fut in enumerate(rng.sample(futures, cancels)):
                t0 = ns()
                ok = fut.cancel()
                cancel_ns[i] = ns() - t0
                if not ok:
                    raise RuntimeError("Future.cancel() of a queued future returned False")
        return {"submit": submit_ns, "cancel": cancel_ns}

    def latencies(self, report: Report) -> None:
        rounds = self.sizes.latency_rounds
        per_round: dict[str, list[float]] = {}

        def keep(name: str, samples: list[int]) -> None:
            per_round.setdefault(f"{name}_p50_us", []).append(_us(samples, 50))
            per_round.setdefault(f"{name}_p99_us", []).append(_us(samples, 99))

        for r in range(rounds):
            _log(
                self.quiet,
                f"latency round {r + 1}/{rounds} ({self.sizes.queued_jobs} submits, "
                f"{self.sizes.cancels} cancels, {self.sizes.moves} moves)",
            )
            # Alternate the order so slow drift of the machine hits both sides alike.
            if r % 2 == 0:
                eng, errors = self._engine_latency_round(SEED + r)
                raw = self._raw_latency_round(SEED + r)
            else:
                raw = self._raw_latency_round(SEED + r)
                eng, errors = self._engine_latency_round(SEED + r)
            for name, samples in eng.items():
                keep(f"engine_{name}", samples)
            for name, samples in raw.items():
                keep(f"raw_{name}", samples)
            for name, message in errors.items():
                report.fail(f"{name}_p99_us", message)

        med = {k: statistics.median(v) for k, v in per_round.items()}
        note = f"median of {rounds} rounds" if rounds > 1 else ""
        q = f"{self.sizes.queued_jobs:,} queued"
        report.add(
            Figure(
                "submit_p50_us",
                "submit latency p50 (paused)",
                "µs",
                med["engine_submit_p50_us"],
                med["raw_submit_p50_us"],
                note=note,
            )
        )
        report.add(
            Figure(
                "submit_p99_us",
                "submit latency p99 (paused)",
                "µs",
                med["engine_submit_p99_us"],
                med["raw_submit_p99_us"],
                target="submit_p99_us",
                note=note,
            )
        )
        report.add(
            Figure(
                "cancel_p50_us",
                f"cancel latency p50 ({q})",
                "µs",
                med["engine_cancel_p50_us"],
                med["raw_cancel_p50_us"],
                note=note,
            )
        )
        report.add(
            Figure(
                "cancel_p99_us",
                f"cancel latency p99 ({q})",
                "µs",
                med["engine_cancel_p99_us"],
                med["raw_cancel_p99_us"],
                target="cancel_p99_us",
                note=note,
            )
        )
        if "move_p99_us" not in report.errors:
            report.add(
                Figure(
                    "move_p50_us",
                    f"move latency p50 ({q})",
                    "µs",
                    med["engine_move_p50_us"],
                    note=note,
                )
            )
            report.add(
                Figure(
                    "move_p99_us",
                    f"move latency p99 ({q})",
                    "µs",
                    med["engine_move_p99_us"],
                    target="move_p99_us",
                    note=note,
                )
            )
        report.details["latency_rounds_us"] = {
            k: [_round(x) for x in v] for k, v in per_round.items()
        }

    # ----------------------------------------------------------------------- memory

    @staticmethod
    def _traced() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    def memory(self, report: Report) -> None:
        n = self.sizes.queued_jobs
        _log(self.quiet, f"memory: {n} queued jobs under tracemalloc")
        tracemalloc.start()
        try:
            with self.engine(4, paused=True) as engine:
                for job_id in [engine.submit(NOOP_KIND) for _ in range(16)]:
                    engine.cancel(job_id)  # first-use allocations happen before "before"
                engine.drain_events()
                ids: list[Any] = [None] * n
                submit = engine.submit
                before = self._traced()
                for i in range(n):
                    ids[i] = submit(NOOP_KIND)
                after = self._traced()
                engine.drain_events()  # result dropped at once, as the pump would
                drained = self._traced()
            with blocked_pool(4) as pool:
                futures: list[Any] = [None] * n
                raw_before = self._traced()
                for i in range(n):
                    futures[i] = pool.submit(_noop_raw)
                raw_after = self._traced()
                del futures
        finally:
            tracemalloc.stop()
        raw_per = (raw_after - raw_before) / n
        report.add(
            Figure(
                "memory_per_job_bytes",
                "memory per queued job (events pending)",
                "B",
                (after - before) / n,
                raw_per,
                target="memory_per_job_bytes",
            )
        )
        report.add(
            Figure(
                "memory_per_job_drained_bytes",
                "memory per queued job (after drain)",
                "B",
                (drained - before) / n,
                raw_per,
            )
        )

    # ----------------------------------------------------------------------- drain_events

    # ----------------------------------------------------------------------- pipelines

    def _pipeline_round(self, n: int, chain: int) -> float:
        """Dispatch rate (jobs/s) of ``n`` no-op jobs in chains of ``chain`` (each after
        the one before; 1 = independent jobs): queued by one submit_many into a paused
        engine, timed from resume() to the last one finished. (Submit's own cost with
        depends_on is the next figure.)"""
        with self.engine(4, paused=True) as engine:
            specs = [
                {"kind": NOOP_KIND, "name": f"s{i}",
                 **({"depends_on": [f"@s{i - 1}"]} if i % chain else {})}
                for i in range(n)
            ]
            ids = engine.submit_many(specs)
            gc.collect()
            t0 = time.perf_counter()
            engine.resume()
            finished = engine.wait(ids, timeout=WAIT_TIMEOUT_S)
            elapsed = time.perf_counter() - t0
            if not finished:
                raise RuntimeError(f"engine did not finish {n} jobs in chains of {chain}")
            if engine.stats().completed != n:
                raise RuntimeError(f"not every job completed: {engine.stats()}")
        return n / elapsed

    def pipelines(self, report: Report) -> None:
        n, rounds, chain = self.sizes.throughput_jobs, self.sizes.throughput_rounds, 10
        chained: list[float] = []
        flat: list[float] = []
        small: list[float] = []
        for r in range(rounds):
            _log(self.quiet, f"pipelines round {r + 1}/{rounds} ({n} jobs in chains of {chain}, "
                             f"{n} independent, {n // 5} in chains)")
            if r % 2 == 0:
                chained.append(self._pipeline_round(n, chain))
                flat.append(self._pipeline_round(n, 1))
            else:
                flat.append(self._pipeline_round(n, 1))
                chained.append(self._pipeline_round(n, chain))
            small.append(self._pipeline_round(n // 5, chain))
        ratios = [c / f for c, f in zip(chained, flat, strict=True)]
        report.add(Figure(
            "pipeline_jobs_per_s", f"dispatch, {n:,} no-op jobs in chains of {chain} vs independent",
            "jobs/s", statistics.median(chained), statistics.median(flat),
            target="pipeline_throughput_ratio",
            note=f"round ratios {min(ratios):.2f}..{max(ratios):.2f}" if rounds > 1 else "",
            paired_ratio=statistics.median(ratios),
        ))
        scaling = [c / s_ for c, s_ in zip(chained, small, strict=True)]
        report.add(Figure(
            "pipeline_scaling", f"dispatch in chains, {n:,} jobs vs {n // 5:,} (1.0 = flat cost)",
            "jobs/s", statistics.median(chained), statistics.median(small),
            paired_ratio=statistics.median(scaling),
        ))
        # Submit latency with depends_on (an earlier queued job) against plain submit,
        # in a paused engine holding the same number of jobs.
        ns = time.perf_counter_ns
        rng = random.Random(7)
        n = min(n, 4000)  # plain + linked + a 1001-job chain stay below max_queued
        with self.engine(4, paused=True) as engine:
            submit = engine.submit
            plain = [0] * n
            ids = [""] * n
            for i in range(n):
                t0 = ns()
                ids[i] = submit(NOOP_KIND)
                plain[i] = ns() - t0
            linked = [0] * n
            for i in range(n):
                dep = [ids[rng.randrange(n)]]
                t0 = ns()
                submit(NOOP_KIND, depends_on=dep)
                linked[i] = ns() - t0
            # Failing one prerequisite of a long chain: the cascade's cost.
            root = submit(NOOP_KIND)
            prev = root
            for _ in range(1000):
                prev = submit(NOOP_KIND, depends_on=[prev])
            t0 = ns()
            engine.cancel(root)
            cascade_ms = (ns() - t0) / 1e6
        report.add(Figure("submit_depends_p99_us", f"submit p99 with depends_on ({n:,} queued)", "us",
                          _us(linked, 0.99), _us(plain, 0.99), target="submit_depends_p99_us"))
        report.details["pipelines"] = {
            "chained_jobs_per_s": [_round(x) for x in chained],
            "small_chained_jobs_per_s": [_round(x) for x in small],
            "independent_jobs_per_s": [_round(x) for x in flat],
            "submit_p50_us": {"depends_on": _round(_us(linked, 0.5)), "plain": _round(_us(plain, 0.5))},
            "cancel_root_of_1000_chain_ms": _round(cascade_ms),
        }
        _log(self.quiet, f"cancelling the root of a 1000-job chain: {cascade_ms:.1f} ms")

    def drain(self, report: Report) -> None:
        jobs, iterations = self.sizes.progress_jobs, self.sizes.progress_iterations
        interval = self.sizes.pump_interval_s
        _log(
            self.quiet,
            f"drain_events: {jobs} jobs x {iterations} progress calls, pump every "
            f"{interval * 1000:g} ms",
        )
        self.progress_spans.clear()
        wall_ns: list[int] = []
        cpu_ns: list[int] = []
        sizes: list[int] = []
        starts: list[int] = []  # when each drain began: the gaps show a starved main thread
        resyncs = 0  # drains that reported dropped events
        ns, cpu = time.perf_counter_ns, time.thread_time_ns
        with self.engine(max_workers=jobs) as engine:
            engine.drain_events()
            ids = {engine.submit(PROGRESS_KIND, {"iterations": iterations}) for _ in range(jobs)}
            unfinished = set(ids)
            deadline = time.monotonic() + WAIT_TIMEOUT_S
            next_tick = time.perf_counter()
            while unfinished:
                next_tick += interval
                delay = next_tick - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_tick = time.perf_counter()  # late: do not try to catch up
                c0, t0 = cpu(), ns()
                events = engine.drain_events()
                t1, c1 = ns(), cpu()
                starts.append(t0)
                wall_ns.append(t1 - t0)
                cpu_ns.append(c1 - c0)
                sizes.append(len(events))
                finished = []
                for event in events:
                    info = event.info
                    if event.type == "state" and info is not None and info.is_terminal:
                        finished.append(info)
                    elif event.type == "notice" and event.level == "resync":
                        # Events were dropped (the queue overflowed between two drains):
                        # a pump re-reads the jobs, as the notice asks.
                        resyncs += 1
                        finished.extend(engine.get(i) for i in unfinished)
                for info in finished:
                    if info.is_terminal:
                        if info.state != "completed":
                            raise RuntimeError(f"progress job ended {info.state}: {info.error}")
                        unfinished.discard(info.id)
                if time.monotonic() > deadline:
                    raise RuntimeError("progress jobs did not finish in time")
        spans = self.progress_spans
        if len(spans) != jobs:
            raise RuntimeError(f"expected {jobs} progress spans, got {len(spans)}")
        busy = max(end for _, end in spans) - min(start for start, _ in spans)
        rate = jobs * iterations / busy
        report.add(
            Figure(
                "drain_p50_ms",
                f"drain_events p50 ({len(wall_ns)} pumps)",
                "ms",
                percentile(wall_ns, 50) / 1e6,
            )
        )
        report.add(
            Figure(
                "drain_p99_ms",
                "drain_events p99 (wall)",
                "ms",
                percentile(wall_ns, 99) / 1e6,
                target="drain_p99_ms",
            )
        )
        report.add(Figure("drain_max_ms", "drain_events max (wall)", "ms", max(wall_ns) / 1e6))
        # The CPU the call itself used; the rest of the wall time is lock/GIL waiting.
        report.add(
            Figure(
                "drain_cpu_p99_ms",
                "drain_events p99 (main-thread CPU)",
                "ms",
                percentile(cpu_ns, 99) / 1e6,
            )
        )
        report.add(
            Figure("progress_calls_per_s", f"ctx.progress calls/s ({jobs} jobs)", "calls/s", rate)
        )
        gaps = [b - a for a, b in itertools.pairwise(starts)] or [0]
        report.add(
            Figure(
                "pump_gap_max_ms",
                f"longest gap between pumps (asked: {interval * 1000:g} ms)",
                "ms",
                max(gaps) / 1e6,
            )
        )
        report.add(
            Figure(
                "drain_resyncs",
                "drains that reported dropped events",
                "drains",
                resyncs,
            )
        )
        report.details["drain"] = {
            "pumps": len(wall_ns),
            "pump_gap_p99_ms": _round(percentile(gaps, 99) / 1e6),
            "events_per_drain_p50": percentile(sizes, 50),
            "events_per_drain_max": max(sizes),
            "progress_busy_s": _round(busy),
        }

    # ----------------------------------------------------------------------- sidecar

    def sidecar(self, report: Report) -> None:
        """Snapshot store: full write time and size, writes per burst, adoption time.

        Baselines: a plain ``json.dumps`` of the same jobs written with the same
        atomic write (the least any JSON sidecar costs), and a burst of submits
        into an engine without a ``state_dir`` (the submit path without a store).
        """
        from blender_taskqueue.engine.store import _capture, job_to_dict, write_atomic

        counts = (1_000, self.sizes.queued_jobs)
        for n in counts:
            _log(self.quiet, f"sidecar: {n} jobs, full write and adoption")
            state_dir = self.log_dir / f"state-{n}"
            config = EngineConfig(max_workers=4, state_dir=state_dir, log_dir=self.log_dir,
                                  console_log=False)
            engine = Engine(config, registry=self.registry)
            engine.pause()
            engine.start()
            store = engine.store
            assert store is not None
            writes_before = store.writes
            submit = engine.submit
            lat_store = [0] * n
            ns = time.perf_counter_ns
            for i in range(n):
                t0 = ns()
                submit(NOOP_KIND, {"i": i, "prompt": "a teapot"}, label=f"job {i}")
                lat_store[i] = ns() - t0
            if not engine.flush(timeout=60):
                raise RuntimeError(f"flush failed: {engine.stats().write_error}")
            burst_writes = store.writes - writes_before
            write_s = statistics.median(store.rewrite_all() for _ in range(3))
            size = store.last_size
            with engine._lock:  # the same job dicts the store encodes
                docs = [job_to_dict(_capture(rec), engine.workdir_for)
                        for rec in engine._jobs.values()]
            baseline_path = state_dir / "baseline.json"
            t0 = time.perf_counter()
            write_atomic(baseline_path, json.dumps(docs).encode())
            raw_s = time.perf_counter() - t0
            baseline_path.unlink()
            engine.shutdown()
            with self.engine(4, paused=True) as plain:
                lat_plain = [0] * n
                for i in range(n):
                    t0 = ns()
                    plain.submit(NOOP_KIND, {"i": i, "prompt": "a teapot"}, label=f"job {i}")
                    lat_plain[i] = ns() - t0
            adopter = Engine(config, registry=self.registry)
            adopter.pause()
            t0 = time.perf_counter()
            adopter.start()
            adopt_s = time.perf_counter() - t0
            recovered = adopter.recovery.adopted if adopter.recovery else 0
            adopter.shutdown()
            if recovered != n:
                raise RuntimeError(f"adopted {recovered} of {n} jobs")
            report.add(Figure(f"sidecar_write_ms_{n}", f"sidecar full write, {n:,} jobs",
                              "ms", write_s * 1000, raw_s * 1000,
                              target="sidecar_write_ms" if n == counts[-1] else None,
                              note="baseline: one json.dumps of the same jobs + atomic write"))
            report.add(Figure(f"sidecar_bytes_per_job_{n}", f"sidecar size per job, {n:,} jobs",
                              "B", size / n))
            report.add(Figure(f"sidecar_burst_writes_{n}",
                              f"sidecar writes during a burst of {n:,} submits", "writes",
                              burst_writes))
            report.add(Figure(f"submit_p99_with_store_us_{n}",
                              f"submit p99 with a sidecar, {n:,} jobs", "µs",
                              _us(lat_store, 99), _us(lat_plain, 99),
                              note="baseline: same engine without state_dir"))
            report.add(Figure(f"adoption_ms_{n}", f"adoption of a {n:,}-job sidecar", "ms",
                              adopt_s * 1000,
                              target="adoption_ms" if n == counts[-1] else None))

    # ----------------------------------------------------------------------- process.run

    def process_run(self, report: Report) -> None:
        """``process.run`` against ``subprocess.run`` on the same command."""
        import subprocess

        from blender_taskqueue.kinds import process as process_kind

        if process_kind.KIND not in self.registry:
            process_kind.register(self.registry)
        lines = self.sizes.process_lines
        commands = {
            "sleep_100ms": [sys.executable, "-c", "import time; time.sleep(0.1)"],
            "lines": [
                sys.executable, "-c",
                f"n = {lines}\nfor i in range(n): print(f'frame {{i + 1}}/{{n}} rendered')",
            ],
        }
        regex = r"frame (?P<current>\d+)/(?P<total>\d+)"
        rounds = self.sizes.process_rounds
        config = EngineConfig(max_workers=2, log_dir=self.log_dir, console_log=False,
                              work_dir=self.log_dir / "process-work")
        engine = Engine(config, registry=self.registry)
        engine.start()
        try:
            for key, argv in commands.items():
                _log(self.quiet, f"process.run vs subprocess.run: {key} ({rounds} rounds)")

                def engine_side(_r: int, argv: list[str] = argv) -> float:
                    return _timed_job(engine, process_kind.KIND,
                                      {"argv": argv, "progress_regex": regex})

                def raw_side(_r: int, argv: list[str] = argv) -> float:
                    t0 = time.perf_counter()
                    subprocess.run(argv, capture_output=True, check=True)
                    return time.perf_counter() - t0

                raw_side(-1)  # warm the OS caches for both sides
                label = ("process.run, 100 ms command" if key == "sleep_100ms"
                         else f"process.run, {lines:,} output lines")
                _paired(report, f"process_run_{key}", label, rounds, engine_side, raw_side,
                        "process_overhead_ratio", "baseline: subprocess.run(capture_output=True)")
        finally:
            engine.shutdown(wait=True, timeout=10.0)

    # ----------------------------------------------------------------------- blender.render

    def blender_render(self, report: Report) -> None:
        """``blender.render`` against ``blender -b file -a`` for the same frames, and how
        long a cancel takes to stop a rendering Blender (and ``process.run``'s tree)."""
        import shutil
        import subprocess

        from blender_taskqueue.kinds import process as process_kind
        from blender_taskqueue.kinds import render as render_kind

        blender = shutil.which("blender")
        if blender is None:
            report.details["blender_render"] = "skipped: no `blender` on the PATH"
            return
        for module in (render_kind, process_kind):
            if module.KIND not in self.registry:
                module.register(self.registry)
        work = self.log_dir / "render-work"
        work.mkdir(parents=True, exist_ok=True)
        scene = work / "bench.blend"
        subprocess.run(
            [blender, "-b", "--factory-startup", "--python-expr",
             "import bpy, sys\ns = bpy.context.scene\ns.render.engine = 'BLENDER_WORKBENCH'\n"
             "s.render.resolution_x, s.render.resolution_y = 320, 180\n"
             "s.frame_start, s.frame_end = 1, 12\n"
             "s.cycles.samples = 100000\ns.cycles.use_adaptive_sampling = False\n"
             "bpy.ops.wm.save_as_mainfile(filepath=sys.argv[-1])", "--", str(scene)],
            check=True, capture_output=True, timeout=120,
        )
        config = EngineConfig(max_workers=2, log_dir=self.log_dir, console_log=False, work_dir=work)
        engine = Engine(config, registry=self.registry)
        engine.start()
        rounds = self.sizes.render_rounds
        try:
            _log(self.quiet, f"blender.render vs blender -b -a: 12 frames ({rounds} rounds)")

            def engine_side(r: int) -> float:
                return _timed_job(engine, render_kind.KIND, {"blend_file": str(scene),
                                                             "output_dir": str(work / f"job{r}")})

            def raw_side(r: int) -> float:
                t0 = time.perf_counter()
                subprocess.run([blender, "-b", str(scene), "-o", str(work / f"raw{r}" / "frame_####"),
                                "-F", "PNG", "-a"], capture_output=True, check=True)
                return time.perf_counter() - t0

            raw_side(-1)  # warm the caches (and the shader cache) for both sides
            _paired(report, "blender_render_12_frames", "blender.render, 12 frames", rounds,
                    engine_side, raw_side, "render_overhead_ratio",
                    "baseline: blender -b file -a, same frames", details_key="blender_render")

            # Cancel: from cancel() to the job's end, every process of its tree stopped.
            stops: dict[str, list[float]] = {"render": [], "process": []}
            for r in range(rounds):
                for what in stops:
                    if what == "render":
                        job = engine.submit(render_kind.KIND, {
                            "blend_file": str(scene), "engine": "CYCLES",
                            "output_dir": str(work / f"cancel{r}")})
                        started = lambda job=job: (engine.get(job).stage or "").startswith("frame")  # noqa: E731
                    else:
                        job = engine.submit(process_kind.KIND, {"argv": [
                            sys.executable, "-c",
                            "import subprocess, sys, time\n"
                            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                            "print('up', flush=True)\ntime.sleep(60)"]})
                        started = lambda job=job: engine.get(job).message == "up"  # noqa: E731
                    deadline = time.monotonic() + 60
                    while not started():
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{what} job {job} did not start")
                        time.sleep(0.01)
                    t0 = time.perf_counter()
                    engine.cancel(job)
                    if not engine.wait([job], timeout=30):
                        raise RuntimeError(f"cancelled {what} job {job} did not stop")
                    stops[what].append(time.perf_counter() - t0)
            for what, label in (("render", "blender.render (Cycles, mid-frame)"),
                                ("process", "process.run (child + grandchild)")):
                report.add(Figure(
                    f"cancel_stop_{what}_ms", f"cancel to stopped: {label}, worst of {rounds}", "ms",
                    max(stops[what]) * 1000, target="cancel_stop_ms",
                ))
        finally:
            engine.shutdown(wait=True, timeout=10.0)

    # ----------------------------------------------------------------------- comfyui.prompt

    def comfyui(self, report: Report) -> None:
        """``comfyui.prompt`` against a plain client making the same calls (websocket,
        POST /prompt, messages until execution_success, /history, /view) on the fake
        ComfyUI server of scripts/comfyui_fake.py, and cancel-to-stopped of a running
        generation (the server's prompt interrupted, the job cancelled)."""
        import urllib.parse
        import urllib.request
        import uuid

        import websocket

        sys.path.insert(0, str(REPO_ROOT / "scripts"))
        import comfyui_fake

        from blender_taskqueue.kinds import comfyui as comfy_kind

        if comfy_kind.KIND not in self.registry:
            comfy_kind.register(self.registry)
        workflow = json.loads(comfy_kind.DEFAULT_WORKFLOW.read_text())
        out = self.log_dir / "comfyui-raw"
        out.mkdir(parents=True, exist_ok=True)
        fake = comfyui_fake.FakeComfyUI(root=self.log_dir / "comfyui-server", step_s=0.02, steps=10).start()
        config = EngineConfig(max_workers=2, log_dir=self.log_dir, console_log=False,
                              work_dir=self.log_dir / "comfyui-work")
        engine = Engine(config, registry=self.registry)
        engine.start()
        try:
            rounds = self.sizes.comfyui_rounds
            _log(self.quiet, f"comfyui.prompt vs a plain client ({rounds} rounds)")

            def engine_side(r: int) -> float:
                return _timed_job(engine, comfy_kind.KIND, {
                    "server": fake.url, "workflow": workflow, "overrides": {"3.inputs.seed": 2 * r + 10}})

            def raw_side(r: int) -> float:
                t0 = time.perf_counter()
                client_id = uuid.uuid4().hex
                ws = websocket.create_connection(
                    fake.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}", timeout=30)
                try:
                    graph = json.loads(json.dumps(workflow))
                    graph["3"]["inputs"]["seed"] = 2 * r + 11  # never the engine's: no cache hits
                    body = json.dumps({"prompt": graph, "client_id": client_id}).encode()
                    req = urllib.request.Request(fake.url + "/prompt", data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        prompt_id = json.loads(resp.read())["prompt_id"]
                    while True:
                        msg = ws.recv()
                        if isinstance(msg, str):
                            data = json.loads(msg)
                            if data.get("type") == "execution_success" and \
                                    data["data"].get("prompt_id") == prompt_id:
                                break
                finally:
                    ws.close()
                with urllib.request.urlopen(f"{fake.url}/history/{prompt_id}", timeout=30) as resp:
                    entry = json.loads(resp.read())[prompt_id]
                for node_out in entry["outputs"].values():
                    for image in node_out.get("images", []):
                        query = urllib.parse.urlencode(image)
                        with urllib.request.urlopen(f"{fake.url}/view?{query}", timeout=30) as resp:
                            (out / image["filename"]).write_bytes(resp.read())
                return time.perf_counter() - t0

            raw_side(-1)
            engine_side(-1)  # warm both: the websocket module import, the first connection
            _paired(report, "comfyui_generation", "comfyui.prompt, one generation (10 steps)", rounds,
                    engine_side, raw_side, "comfyui_overhead_ratio",
                    "baseline: websocket-client + urllib doing the same calls")
            stops = []
            fake.step_s, fake.steps = 0.05, 400
            for _ in range(max(2, rounds // 2)):
                job = engine.submit(comfy_kind.KIND, {"server": fake.url, "workflow": workflow})
                deadline = time.monotonic() + 60
                while not (engine.get(job).message or "").startswith("step"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"comfyui job {job} did not start sampling")
                    time.sleep(0.005)
                t0 = time.perf_counter()
                engine.cancel(job)
                if not engine.wait([job], timeout=30):
                    raise RuntimeError(f"cancelled comfyui job {job} did not stop")
                fake.wait_until(lambda: fake.running() is None, timeout=30)
                stops.append(time.perf_counter() - t0)
            report.add(Figure(
                "cancel_stop_comfyui_ms",
                f"cancel to stopped: comfyui.prompt (server interrupted), worst of {len(stops)}", "ms",
                max(stops) * 1000, target="cancel_stop_ms",
            ))
        finally:
            engine.shutdown(wait=True, timeout=10.0)
            fake.stop()

    # ----------------------------------------------------------------------- dask cluster

    def cluster(self, report: Report) -> None:
        """A remote_ok job (demo.render, 5 frames of 20 ms) on a loopback dask
        LocalCluster against the same job on the local engine, and how long a
        worker's progress report takes to reach the engine (p99)."""
        try:
            import dask
            import distributed
        except ImportError:
            report.details["cluster"] = "skipped: dask[distributed] is not installed"
            return
        from blender_taskqueue.engine import registry as shared_registry
        from blender_taskqueue.kinds import demo  # noqa: F401  (registers demo.render)

        if "demo.render" not in self.registry:
            self.registry.register(shared_registry.get("demo.render"))
        params = {"frames": 5, "seconds_per_frame": 0.02}
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                          host="127.0.0.1", dashboard_address=None)
        remote = Engine(EngineConfig(max_workers=2, log_dir=self.log_dir, console_log=False,
                                     cluster=lc.scheduler_address), registry=self.registry)
        local = Engine(EngineConfig(max_workers=2, log_dir=self.log_dir, console_log=False),
                       registry=self.registry)
        remote.start()
        local.start()
        try:
            rounds = max(3, self.sizes.comfyui_rounds)
            _log(self.quiet, f"demo.render on a dask LocalCluster vs the local engine ({rounds} rounds)")
            _timed_job(remote, "demo.render", params)  # warm: connect, import on the workers
            _paired(report, "cluster_job", "demo.render (5 x 20 ms) on a loopback dask cluster", rounds,
                    lambda _r: _timed_job(remote, "demo.render", params),
                    lambda _r: _timed_job(local, "demo.render", params),
                    None, "baseline: the same job on the local engine")  # type: ignore[arg-type]
            executor = remote._cluster
            samples = [s * 1000 for s in (executor.latencies if executor is not None else [])]
            if samples:
                report.add(Figure("cluster_progress_p99_ms",
                                  f"cluster progress report to engine, p99 of {len(samples)}", "ms",
                                  percentile(samples, 99)))
        finally:
            remote.shutdown(wait=True, timeout=10.0)
            local.shutdown(wait=True, timeout=10.0)
            lc.close()

    # ----------------------------------------------------------------------- timer

    @staticmethod
    def timer_overhead_ns() -> float:
        """Median cost of one timed empty call, included in every latency sample."""
        ns = time.perf_counter_ns
        samples = [0] * 20_000
        for i in range(len(samples)):
            t0 = ns()
            _noop_raw()
            samples[i] = ns() - t0
        return percentile(samples, 50)


# --------------------------------------------------------------------------- output


def render_table(report: Report) -> str:
    header = ("figure", "engine", "raw executor", "engine/raw", "target", "verdict")
    rows: list[tuple[str, ...]] = []
    for f in report.figures:
        verdict = {True: "meets target", False: "MISSES target", None: "-"}[f.meets_target]
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
        rows.append(
            (
                f.label + (f" [{f.note}]" if f.note else ""),
                _fmt(f.value, f.unit),
                _fmt(f.baseline, f.unit) if f.baseline is not None else "-",
                ratio,
                f.target_text or "-",
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    aligns = ["<", ">", ">", ">", "<", "<"]
    lines = [
        "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(header, aligns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, aligns, widths, strict=True))
        for row in rows
    ]
    lines += [f"{key}: ERROR, not measured (see below)" for key in report.errors]
    return "\n".join(lines)


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}" if unit != "ms" else f"{value:.3f}"
    return f"{text} {unit}"


def report_json(report: Report, elapsed_s: float) -> str:
    met = [f.meets_target for f in report.figures if f.meets_target is not None]
    payload = {
        "bench": "blender_taskqueue",
        "schema": 1,
        "mode": report.mode,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "package": str(Path(_package_file).parent),
        "sizes": asdict(report.sizes),
        "elapsed_s": _round(elapsed_s),
        "all_targets_met": all(met) and not report.errors,
        "figures": {f.key: f.as_json() for f in report.figures},
        "errors": report.errors,
        "details": report.details,
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- main


SECTIONS = ("throughput", "latency", "pipelines", "memory", "drain", "sidecar", "process_run", "blender_render", "comfyui", "cluster")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the blender_taskqueue engine against a raw ThreadPoolExecutor."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts for CI smoke runs (finishes in well under 20 s)",
    )
    parser.add_argument(
        "--json-only",
        action="store_true",
        help="print only the JSON line (no table, no progress on stderr)",
    )
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable); default: all of them",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Report:
    """Run every section. A section that breaks is recorded and the others still run."""
    sizes = QUICK if args.quick else FULL
    report = Report("quick" if args.quick else "full", sizes)
    bench = Bench(sizes, quiet=args.json_only)
    sections: list[tuple[str, Callable[[Report], None]]] = [
        ("throughput", bench.throughput),
        ("latency", bench.latencies),
        ("pipelines", bench.pipelines),
        ("memory", bench.memory),
        ("drain", bench.drain),
        ("sidecar", bench.sidecar),
        ("process_run", bench.process_run),
        ("blender_render", bench.blender_render),
        ("comfyui", bench.comfyui),
        ("cluster", bench.cluster),
    ]
    if args.section:
        sections = [(name, fn) for name, fn in sections if name in args.section]
    try:
        report.details["timer_overhead_ns"] = bench.timer_overhead_ns()
        for name, section in sections:
            try:
                section(report)
            except Exception as exc:  # the code under test broke: report it, go on
                traceback.print_exc()
                report.fail(name, _describe_error(exc, f"the {name} section"))
    finally:
        bench.close()
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    if not args.json_only:
        print(
            f"blender_taskqueue bench ({report.mode}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, {elapsed:.1f} s; timer overhead "
            f"{report.details['timer_overhead_ns']:.0f} ns per sample, included)"
        )
        print(render_table(report))
        missed = [f.key for f in report.figures if f.meets_target is False]
        print(f"targets missed: {', '.join(missed)}" if missed else "all measured targets met")
        for key, message in report.errors.items():
            print(f"ERROR {key}: {message}")
    print(report_json(report, elapsed))
    # A missed target is a result; only a benchmark that could not measure is an error.
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
