"""The sidecar: the whole queue as versioned JSON in ``state_dir``, written off-thread.

One writer thread per engine. The engine marks jobs dirty under its lock (a set
add, nothing more); the writer wakes, copies the dirty records' fields under the
lock (a C-level attrgetter per record), encodes them outside it, and replaces the
file atomically: temp file in the same folder, flush, fsync, rename, fsync of
the folder. State transitions wake the writer at once; changes that arrive while
it writes are grouped into the next write (group commit). Progress and
checkpoints only set a deadline 0.5 s ahead. No write ever happens on the
submitting thread or the main thread.

Each job's JSON is cached between writes, so a write re-encodes only what
changed; the file is the live queue plus finished history (``history_limit``),
and results over ``INLINE_RESULT_MAX`` bytes go to a file in the job's workdir.
"""

from __future__ import annotations

import json
import math
import operator
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import psutil

from .kinds import KIND_NAME
from .models import MAX_DEPENDENCIES, JobError, JobState, job_id_error, not_before_error, timeout_error
from .record import JobRecord

if TYPE_CHECKING:
    from .engine import Engine

SCHEMA_VERSION = 1
APP = "blender_taskqueue"
SIDECAR_GLOB = "queue-*.json"
CLAIM_MARK = ".adopting-"
LAZY_DELAY_S = 0.5
INLINE_RESULT_MAX = 64 * 1024
MAX_STORED_INT = 2**53  # ints beyond what any float (or the JSON of another tool) holds exactly
RESULT_FILE = "result.json"  # a result over INLINE_RESULT_MAX, in the job's own folder
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# The persisted fields of a JobRecord, copied in one C call under the engine lock.
FIELDS = (
    "id", "kind", "label", "params", "priority", "state", "progress", "stage", "message",
    "attempt", "max_retries", "errors", "result", "partial_result", "checkpoint", "held",
    "created_at", "started_at", "finished_at", "timeout", "memory_mb", "key", "recovered_from",
    "depends_on", "waiting", "inputs", "not_before", "root_cause",
)
_PIPELINE_FIELDS = ("depends_on", "waiting", "inputs", "not_before", "root_cause")
_capture = operator.attrgetter(*FIELDS)


def _make_encoder() -> Callable[[Any], str]:
    """A compact JSON encoder built once. ``json.dumps`` builds a new encoder (and
    its C scanner) on every call, which costs more than encoding a small job."""
    try:
        from json.encoder import (  # type: ignore[attr-defined]  # undocumented C encoder
            c_make_encoder,
            encode_basestring_ascii,
        )
    except ImportError:  # pragma: no cover - pure-Python json
        c_make_encoder = None
    if c_make_encoder is None:  # pragma: no cover
        return json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

    def default(obj: Any) -> Any:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    chunks = c_make_encoder(None, default, encode_basestring_ascii, None, ":", ",", False, False, True)
    return lambda obj: "".join(chunks(obj, 0))


_encode = _make_encoder()


class Owner(NamedTuple):
    """Who writes a sidecar: a process (pid plus start time, so a reused pid is not
    mistaken for it) on a host, and a token naming one engine in that process."""

    pid: int
    started: float
    host: str
    token: str

    @classmethod
    def current(cls, token: str) -> "Owner":
        return cls(os.getpid(), psutil.Process().create_time(), socket.gethostname(), token)

    def as_dict(self) -> dict:
        return self._asdict()

    def is_alive(self) -> bool:
        """True if this owner's process still runs (or lives on another host, which we
        cannot check and so never adopt from)."""
        if self.host != socket.gethostname():
            return True
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError, OverflowError):
            return False
        except psutil.AccessDenied:
            return True


LOCK_SUFFIX = ".lock"

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]
try:  # Windows
    import msvcrt as _msvcrt  # type: ignore[import-not-found]
except ImportError:
    _msvcrt = None  # type: ignore[assignment]


def lock_path_for(sidecar: Path) -> Path:
    return sidecar.with_name(sidecar.name + LOCK_SUFFIX)


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False if another holds it."""
    try:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        elif _msvcrt is not None:  # pragma: no cover - Windows
            _msvcrt.locking(fd, _msvcrt.LK_NBLCK, 1)
        else:  # pragma: no cover
            return True
    except OSError:
        return False
    return True


class OwnerLock:
    """An exclusive OS lock on ``<sidecar>.lock``, held while the engine lives.

    The OS drops it when the process dies, however it dies, in whatever PID
    namespace and under whatever host name: so "the lock is free" is the truth of
    "the owner is gone", where a pid check can be fooled (another PID namespace
    sharing the folder sees no such pid; a changed host name looks like another
    machine). ``flock`` locks belong to the open file, so two engines in one
    process exclude each other too.
    """

    def __init__(self, sidecar: Path) -> None:
        self.path = lock_path_for(sidecar)
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        if not _try_lock(fd):
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self, *, remove: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:  # before closing: nobody can take a lock we still hold on a file we unlink
            try:
                self.path.unlink()
            except OSError:
                pass
        os.close(fd)


def lock_is_held(sidecar: Path) -> Optional[bool]:
    """Whether the owner of ``sidecar`` holds its lock (is alive): True or False, or
    None when there is no lock file (a file from before locks, or a foreign tool)."""
    path = lock_path_for(sidecar)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # cannot tell: never adopt what might be alive
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)  # closing drops a lock the probe took


class SidecarError(ValueError):
    """A sidecar that cannot be read as this schema (corrupt, truncated, wrong version)."""


def job_to_dict(values: tuple, workdir: Callable[[str], Path]) -> dict:
    """JSON-ready dict of one job from the fields captured with ``_capture``."""
    d = dict(zip(FIELDS, values, strict=True))
    d["state"] = d["state"].value
    key = d.pop("key")
    d["seq"] = key[1] if key else None
    d["errors"] = [e._asdict() for e in d["errors"]]
    if d["partial_result"] is d["checkpoint"]:
        d["partial_result"] = None
        d["partial_is_checkpoint"] = True
    d["result"] = _result_for_disk(d["id"], d["result"], workdir)
    for name in _PIPELINE_FIELDS:  # most jobs have none: their entries stay as they were
        if not d[name]:
            del d[name]
    for name in ("depends_on", "waiting", "root_cause"):
        if name in d:
            d[name] = list(d[name])
    if "inputs" in d:  # a big one is kept in its prerequisite's own folder, like its result
        d["inputs"] = {pid: _result_for_disk(pid, value, workdir, reuse=True)
                       for pid, value in d["inputs"].items()}
    return d


def _result_for_disk(job_id: str, result: Any, workdir: Callable[[str], Path], *,
                     reuse: bool = False) -> Any:
    """``result`` as stored: inline, or over INLINE_RESULT_MAX in the job's folder
    (``reuse``: a file of the same size there already holds it, as for a result
    passed along to a dependent, which is written again on every save)."""
    if result is None or is_result_file(result):
        return result  # a result file not loaded (yet) keeps its marker
    try:
        text = json.dumps(result)
    except (TypeError, ValueError, RecursionError):
        return {"$repr": repr(result)[:2000]}
    if len(text) <= INLINE_RESULT_MAX:
        return result
    try:
        path = workdir(job_id) / RESULT_FILE
        data = text.encode("utf-8")
        if reuse and path.is_file() and path.stat().st_size == len(data):
            return {"$file": str(path), "bytes": len(text)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)  # a re-run's result replaces the old one
    except (OSError, ValueError) as exc:
        return {"$repr": f"(result of {len(text)} bytes could not be saved: {exc})"}
    return {"$file": str(path), "bytes": len(text)}


def is_result_file(result: Any) -> bool:
    """Whether a stored result is the marker of a result kept in the job's folder.

    The marker's path is never followed: a result is only ever read back from
    this engine's own folder for that job id (``results.ResultLoader``)."""
    return isinstance(result, dict) and "$file" in result and set(result) <= {"$file", "bytes"}


def _opt(d: dict, key: str, kind: Any, *, positive: bool = False) -> Any:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SidecarError(f"malformed job entry: {key}={value!r}"[:300])
    if isinstance(value, float) and not math.isfinite(value):
        raise SidecarError(f"malformed job entry: {key}={value!r}")
    if isinstance(value, int) and not -MAX_STORED_INT <= value <= MAX_STORED_INT:
        raise SidecarError(f"malformed job entry: {key} is out of range"[:300])
    if positive and not value > 0:
        raise SidecarError(f"malformed job entry: {key}={value!r}"[:300])
    return value


def _str(d: dict, key: str, default: Optional[str] = None) -> Optional[str]:
    value = d.get(key, default)
    if value is not None and not isinstance(value, str):
        raise SidecarError(f"malformed job entry: {key}={value!r}")
    return value


def job_from_dict(d: dict) -> JobRecord:
    """Rebuild a JobRecord from its sidecar dict. Raises SidecarError naming a bad field;
    every field is type-checked, since a hostile file must never reach a worker."""
    try:
        job_id, kind = d["id"], d["kind"]
        problem = job_id_error(job_id)
        if problem:
            raise SidecarError(f"malformed job entry: {problem}")
        if not isinstance(kind, str) or KIND_NAME.fullmatch(kind) is None or len(kind) > 200:
            raise SidecarError(f"malformed job entry: kind={kind!r}"[:300])
        params = d.get("params") or {}
        priority = d.get("priority", 5)
        if not isinstance(params, dict):
            raise SidecarError(f"malformed job entry: params={params!r}")
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
            raise SidecarError(f"malformed job entry: priority={priority!r}")
        created = _opt(d, "created_at", (int, float)) or 0.0
        max_retries = _opt(d, "max_retries", int) or 0
        attempt = _opt(d, "attempt", int) or 0
        if max_retries < 0 or attempt < 0:
            raise SidecarError("malformed job entry: negative attempt or max_retries")
        progress = _opt(d, "progress", (int, float)) or 0.0
        if not 0.0 <= progress <= 1.0:
            raise SidecarError(f"malformed job entry: progress={progress!r}")
        held = d.get("held", False)
        if not isinstance(held, bool):
            raise SidecarError(f"malformed job entry: held={held!r}")
        timeout = d.get("timeout")
        problem = timeout_error(timeout)
        if problem:
            raise SidecarError(f"malformed job entry: {problem}")
        job = JobRecord(
            job_id,
            kind,
            _str(d, "label") or kind,
            params,
            priority,
            float(created),
            max_retries=max_retries,
            timeout=float(timeout) if timeout is not None else None,
            memory_mb=_opt(d, "memory_mb", int, positive=True),
            held=held,
        )
        job.state = JobState(d["state"])
        job.progress = float(progress)
        job.stage = _str(d, "stage")
        job.message = _str(d, "message")
        job.attempt = attempt
        errors = d.get("errors") or []
        if not isinstance(errors, list) or not all(isinstance(e, dict) for e in errors):
            raise SidecarError(f"malformed job entry: errors={errors!r}")
        job.errors = tuple(
            JobError(
                str(e.get("type", "Error")),
                str(e.get("message", "")),
                str(e.get("traceback", "")),
                e.get("stage") if isinstance(e.get("stage"), str) else None,
                e["attempt"] if isinstance(e.get("attempt"), int) else 1,
            )
            for e in errors
        )
        job.result = d.get("result")  # a result-file marker is loaded later, off this thread
        job.checkpoint = _opt(d, "checkpoint", dict)
        job.partial_result = (
            job.checkpoint if d.get("partial_is_checkpoint") else _opt(d, "partial_result", dict)
        )
        job.started_at = _opt(d, "started_at", (int, float))
        job.finished_at = _opt(d, "finished_at", (int, float))
        job.recovered_from = _str(d, "recovered_from")
        seq = _opt(d, "seq", int)
        job.key = (priority, seq) if seq is not None else None
        _pipeline_from_dict(job, d)
    except SidecarError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise SidecarError(f"malformed job entry: {exc!r}") from None
    return job


def _pipeline_from_dict(job: JobRecord, d: dict) -> None:
    """The edges, passed-along results and start time of an entry, each checked."""
    deps = d.get("depends_on") or []
    if not isinstance(deps, list) or len(deps) > MAX_DEPENDENCIES:
        raise SidecarError(f"malformed job entry: depends_on={deps!r}"[:300])
    for pid in deps:
        problem = job_id_error(pid)
        if problem or pid == job.id:
            raise SidecarError(f"malformed job entry: depends_on: {problem or 'the job itself'}"[:300])
    job.depends_on = tuple(dict.fromkeys(deps))
    waiting = d.get("waiting")
    if waiting is not None:
        if not isinstance(waiting, list) or not set(waiting) <= set(job.depends_on):
            raise SidecarError(f"malformed job entry: waiting={waiting!r} is not among depends_on"[:300])
        job.waiting = dict.fromkeys(waiting) or None
    inputs = d.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, dict) or not set(inputs) <= set(job.depends_on):
            raise SidecarError("malformed job entry: inputs are not results of its depends_on")
        if job.waiting and set(inputs) & set(job.waiting):
            raise SidecarError("malformed job entry: inputs of prerequisites it still waits for")
        job.inputs = dict(inputs) or None
    at = d.get("not_before")
    problem = not_before_error(at, time.time())
    if problem:
        raise SidecarError(f"malformed job entry: {problem}"[:300])
    job.not_before = float(at) if at is not None else None
    root = d.get("root_cause")
    if root is not None:
        if (not isinstance(root, list) or len(root) != 2 or job_id_error(root[0])
                or not isinstance(root[1], str) or len(root[1]) > 40):
            raise SidecarError(f"malformed job entry: root_cause={root!r}"[:300])
        job.root_cause = (root[0], root[1])


def read_sidecar(path: Path) -> dict:
    """Parse and check one sidecar. Raises OSError (unreadable) or SidecarError."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SidecarError(f"not valid JSON ({exc})") from None
    return check_document(data)


def check_document(data: Any) -> dict:
    """Validate (and migrate) a queue document; returns it at the current schema."""
    if not isinstance(data, dict) or data.get("app") != APP:
        raise SidecarError("not a blender_taskqueue queue file")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SidecarError(f"schema_version missing or not an int: {version!r}")
    while version < SCHEMA_VERSION:  # migrations go here, one step per version
        raise SidecarError(f"schema_version {version} has no migration")  # pragma: no cover
    if version > SCHEMA_VERSION:
        raise SidecarError(
            f"schema_version {version} is newer than this add-on understands ({SCHEMA_VERSION}); "
            "update the add-on"
        )
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise SidecarError("'jobs' is not a list of job objects")
    owner = data.get("owner")
    if not isinstance(owner, dict):
        raise SidecarError("'owner' missing")
    pid, started = owner.get("pid"), owner.get("started")
    if (
        isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0
        or isinstance(started, bool) or not isinstance(started, (int, float))
        or not isinstance(owner.get("host"), str) or not isinstance(owner.get("token"), str)
    ):
        raise SidecarError(f"'owner' malformed: {owner!r}"[:300])
    data["_owner"] = Owner(pid, float(started), owner["host"], owner["token"])
    return data


def write_atomic(path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload``: temp file, flush, fsync, rename, fsync folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; rename is durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def move_aside(path: Path, reason: str) -> Path:
    """Rename a damaged sidecar so it is kept (never deleted) and never read again."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
    os.replace(path, target)
    return target


def claim_name(path: Path, owner: Owner) -> Path:
    base = path.name.split(CLAIM_MARK, 1)[0]
    return path.with_name(f"{base}{CLAIM_MARK}{owner.pid}-{int(owner.started)}-{owner.token}")


def claim_is_stale(path: Path) -> bool:
    """A claimed sidecar (``...json.adopting-<pid>-<start>-<token>``) whose claimer died."""
    try:
        pid, started, _token = path.name.split(CLAIM_MARK, 1)[1].split("-", 2)
        proc = psutil.Process(int(pid))
        return int(proc.create_time()) != int(started)
    except (ValueError, IndexError, OverflowError):
        return True
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.AccessDenied:
        return False


def sidecar_candidates(state_dir: Path, own: Path) -> list[Path]:
    """Sidecars in ``state_dir`` other than ``own``: plain ones, and claims whose claimer died."""
    out: list[Path] = []
    try:
        entries = sorted(state_dir.iterdir())
    except OSError:
        return out
    for path in entries:
        name = path.name
        if not name.startswith("queue-") or path == own or not path.is_file():
            continue
        if CLAIM_MARK in name:
            if name.split(CLAIM_MARK, 1)[0].endswith(".json") and claim_is_stale(path):
                out.append(path)
        elif name.endswith(".json"):
            out.append(path)
    return out


class SnapshotStore:
    """Owns one engine's sidecar file and the thread that writes it."""

    def __init__(self, engine: "Engine", state_dir: Path, token: str,
                 writer: Optional[Callable[[Path, bytes], None]] = None) -> None:
        self._engine = engine
        self.dir = Path(state_dir)
        self.owner = Owner.current(token)
        self.path = self.dir / f"queue-{self.owner.pid}-{token}.json"
        self.lock = OwnerLock(self.path)
        self._write = writer or write_atomic
        self._cv = threading.Condition(threading.Lock())
        self._urgent = False
        self._lazy_due: Optional[float] = None
        self._closing = False
        self._closed_clean = False
        self._thread: Optional[threading.Thread] = None
        self._cache: dict[str, str] = {}
        self._order: dict[str, None] = {}
        self._written_version = -1
        self.writes = 0
        self.error: Optional[str] = None
        self._failures = 0
        self._retry_at = 0.0
        self._after_write: list[Path] = []  # claimed sidecars to delete once ours holds their jobs
        self._quarantine: set[Path] = set()  # those of them to keep, moved aside
        self.last_write_s = 0.0
        self.last_size = 0
        self.record_errors: dict[str, str] = {}  # job id -> why it could not be saved

    # ---- called by the engine under its lock: must stay cheap

    def mark(self, urgent: bool) -> None:
        if urgent:
            if not self._urgent:
                with self._cv:
                    self._urgent = True
                    self._cv.notify()
        elif self._lazy_due is None:
            with self._cv:
                if self._lazy_due is None:
                    self._lazy_due = time.monotonic() + LAZY_DELAY_S
                    self._cv.notify()

    def mark_lazy(self) -> None:
        """Progress changed: write within LAZY_DELAY_S. Lock-free when a write is due anyway."""
        if self._lazy_due is None and not self._urgent:
            with self._cv:
                if self._lazy_due is None:
                    self._lazy_due = time.monotonic() + LAZY_DELAY_S
                    self._cv.notify()

    # ---- lifecycle

    def start(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # reported; the writer keeps retrying
            self.error = f"cannot create {self.dir}: {exc}"
        if not self.lock.acquire():
            self._engine.logger.warning("cannot lock the queue file's lock; liveness falls back to the pid",
                                        path=str(self.lock.path))
        self._thread = threading.Thread(target=self._main, name="taskqueue-writer", daemon=True)
        self._thread.start()

    def after_next_write(self, path: Path) -> None:
        """Delete the claimed sidecar ``path`` once our file holds its jobs."""
        self._after_write.append(path)

    def quarantine(self, path: Path) -> None:
        """Keep the claimed sidecar ``path`` (some entries were refused) instead of
        deleting it: it is moved aside as ``...quarantined-<time>``, for a person to read."""
        self._quarantine.add(path)

    def flush(self, timeout: float = 10.0) -> bool:
        """Write now (on the writer thread) and wait until the file holds every change
        made before this call. Returns False on timeout or write error."""
        target = self._engine.state_version
        with self._cv:
            if self._written_version < target:
                self._urgent = True
                self._cv.notify()
            deadline = time.monotonic() + timeout
            while self._written_version < target:
                if self._thread is None or not self._thread.is_alive():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(min(remaining, 0.1))
        if self._thread is None or not self._thread.is_alive():
            self._write_once(closed=self._closed_clean)
        return self._written_version >= target and self.error is None

    def close(self, clean: bool = True, empty: bool = False) -> None:
        """Stop the thread, then write once more, marked closed so that the next start
        adopts the file. An engine with no jobs at all leaves no file behind."""
        self._closed_clean = clean
        with self._cv:
            self._closing = True
            self._cv.notify()
        hung = False
        if self._thread is not None:
            self._thread.join(15.0)
            hung = self._thread.is_alive()  # a hanging disk must not hang Blender's quit
        self._thread = None
        if hung:
            self._engine.logger.error("sidecar writer hangs; skipping the final write")
            self.lock.release(remove=False)
            return
        if empty:
            for path in [self.path, *self._after_write]:
                try:
                    path.unlink()
                except OSError:
                    pass
            self._after_write.clear()
            self.lock.release(remove=True)
            return
        self._write_once(closed=clean)
        self.lock.release(remove=True)  # the file says closed: whoever starts next adopts it

    def rewrite_all(self) -> float:
        """Re-encode and write every job now, on the calling thread; returns the seconds
        the encode and write took. For tools and the benchmark (a full write from
        scratch), never for the engine's own paths."""
        eng = self._engine
        with eng._lock:
            self._cache.clear()
            eng._dirty.update(eng._jobs.values())
        started = time.perf_counter()
        self._write_once(closed=False)
        return time.perf_counter() - started

    @property
    def problem(self) -> Optional[str]:
        """The write error, or what keeps some jobs out of the file, or None."""
        if self.error is not None:
            return self.error
        if self.record_errors:
            job_id, why = next(iter(self.record_errors.items()))
            n = len(self.record_errors)
            return f"{n} job(s) not saved in the queue file, e.g. {job_id!r}: {why}"
        return None

    def _record_failed(self, job_id: str, exc: Exception) -> None:
        self._cache.pop(job_id, None)
        first = job_id not in self.record_errors
        self.record_errors[job_id] = f"{type(exc).__name__}: {exc}"[:300]
        if first:
            self._engine.logger.error("job cannot be saved in the sidecar; skipped", job_id=repr(job_id),
                                      error=self.record_errors[job_id])

    # ---- the writer thread

    def _main(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closing:
                        return
                    now = time.monotonic()
                    if self.error is not None and now < self._retry_at:
                        self._cv.wait(self._retry_at - now)  # back off after a failed write
                        continue
                    if self._urgent or (self._lazy_due is not None and now >= self._lazy_due):
                        break
                    if self.error is not None:
                        break  # retry the failed write
                    self._cv.wait(None if self._lazy_due is None else self._lazy_due - now)
                self._urgent = False
                self._lazy_due = None
            self._write_once(closed=False)

    def _write_once(self, *, closed: bool) -> None:
        eng = self._engine
        with eng._lock:
            version = eng.state_version
            dirty, eng._dirty = eng._dirty, set()
            progress = eng._progress_dirty
            while progress:  # popitem is safe against lock-free stores from workers
                try:
                    dirty.add(progress.popitem()[1])
                except KeyError:
                    break
            removed, eng._removed = eng._removed, set()
            captured = [_capture(job) for job in dirty if job.id in eng._jobs]
            order_changed = bool(dirty or removed)
            if order_changed:
                ids = list(eng._jobs)  # insertion order: a stable, cheap order for the file
        if not order_changed and version == self._written_version and not closed:
            return  # nothing new: rewriting would only churn the disk
        try:
            cache = self._cache
            for job_id in removed:
                cache.pop(job_id, None)
            for values in captured:
                try:
                    cache[values[0]] = _encode(job_to_dict(values, eng.workdir_for))
                    self.record_errors.pop(values[0], None)
                except Exception as exc:  # one bad record must never stop the writer
                    self._record_failed(values[0], exc)
            if order_changed:
                self._order = dict.fromkeys(i for i in ids if i in cache)
            header = json.dumps(
                {
                    "app": APP,
                    "schema_version": SCHEMA_VERSION,
                    "owner": self.owner.as_dict(),
                    "closed": closed,
                    "written_at": time.time(),
                },
                separators=(",", ":"),
            )
            body = ",\n".join(cache[i] for i in self._order)
            payload = f'{header[:-1]},"jobs":[\n{body}\n]}}\n'.encode("utf-8")
            started = time.perf_counter()
            try:
                self._write(self.path, payload)
            except FileNotFoundError:  # the folder was deleted or not yet mounted
                self.dir.mkdir(parents=True, exist_ok=True)
                self._write(self.path, payload)
            self.last_write_s = time.perf_counter() - started
            self.last_size = len(payload)
        except Exception as exc:  # disk full, read-only, permission: report and retry later
            with eng._lock:  # put the changes back so the retry writes them
                eng._dirty.update(dirty)
                eng._removed.update(removed)
            self._failures += 1
            self._retry_at = time.monotonic() + RETRY_DELAYS_S[min(self._failures, len(RETRY_DELAYS_S)) - 1]
            first = self.error is None
            self.error = f"cannot write {self.path}: {exc}"
            if first or self._failures % 10 == 0:
                eng.logger.error("sidecar write failed; will retry", error=str(exc), failures=self._failures)
            with self._cv:
                self._cv.notify_all()
            return
        self.writes += 1
        if self.error is not None:
            eng.logger.info("sidecar write recovered", path=str(self.path))
        self.error = None
        self._failures = 0
        for claimed in self._after_write:
            try:
                if claimed in self._quarantine:  # a name adoption never looks at again
                    source = claimed.name.split(CLAIM_MARK, 1)[0]
                    os.replace(claimed, claimed.with_name(
                        f"quarantined-{time.strftime('%Y%m%d-%H%M%S')}-{source}"))
                else:
                    claimed.unlink()
            except OSError:
                pass
        self._after_write.clear()
        with self._cv:
            self._written_version = max(self._written_version, version)
            self._cv.notify_all()
