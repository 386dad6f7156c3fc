"""Value types of the public contract: states, priorities, snapshots, configuration.

Snapshots (``JobInfo``, ``JobError``, ``EngineStats``, ``Event``) are named tuples:
immutable, cheap to create on the hot path, and easy to compare in tests.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class JobState(str, enum.Enum):
    """Lifecycle of a job. Values are the plain strings scripts may compare against."""

    SUBMITTED = "submitted"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def is_active(self) -> bool:
        return self in (JobState.DISPATCHED, JobState.RUNNING)


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
)

PRIORITY_NAMES: Mapping[str, int] = {"urgent": 0, "high": 3, "normal": 5, "low": 8}
MOVE_WHERE = ("top", "up", "down", "bottom")


# A job id names a folder (``workdir_for``) and appears in file names, so it is
# held to letters, digits, "_", "-" and "~" (``id~2`` for a renamed duplicate):
# no path separators, no "..", no NUL, never empty, at most 64 characters.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_~-]{0,63}")
MAX_TIMEOUT_S = 30 * 24 * 3600.0  # a timeout longer than 30 days is a mistake, not a plan
MAX_NOT_BEFORE_S = 366 * 24 * 3600.0  # a start more than a year ahead is a mistake, not a plan
MAX_DEPENDENCIES = 1000  # prerequisites of one job
DEPENDENCY_FAILED = "DependencyFailed"  # the error type of a job whose prerequisite did not complete


def job_id_error(value: object) -> Optional[str]:
    """Why ``value`` is not a valid job id, or None if it is."""
    if not isinstance(value, str):
        return f"job id must be a str, got {type(value).__name__}"
    if JOB_ID.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        return (
            f"job id {shown!r} is not valid: 1 to 64 letters, digits, '_', '-' or '~', "
            "starting with a letter or digit"
        )
    return None


def timeout_error(value: object) -> Optional[str]:
    """Why ``value`` is not a valid timeout in seconds (None allowed), or None if it is."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"timeout must be a positive number of seconds or None, got {value!r}"
    if not 0 < value <= MAX_TIMEOUT_S:  # also refuses nan and inf
        return f"timeout must be more than 0 and at most {MAX_TIMEOUT_S:g} s (30 days), got {value!r}"
    return None


def delay_error(value: object) -> Optional[str]:
    """Why ``value`` is not a valid ``not_before`` in seconds from now, or None if it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not_before must be a datetime or a number of seconds from now, got {value!r}"
    if not 0 <= value <= MAX_NOT_BEFORE_S:  # also refuses nan and inf
        return (f"not_before in seconds must be 0 to {MAX_NOT_BEFORE_S:g} (a year) from now, "
                f"got {value!r}")
    return None


def not_before_error(value: object, now: float) -> Optional[str]:
    """Why ``value`` is not a valid ``not_before`` wall-clock timestamp (seconds since
    the epoch; None allowed) when the time is ``now``, or None if it is. A time in
    the past is valid (the job is ready at once); one more than a year ahead is not."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not_before must be a timestamp (seconds since the epoch), got {value!r}"
    if not 0 <= value <= now + MAX_NOT_BEFORE_S:  # also refuses nan and inf
        return (f"not_before must be a time from 1970 to a year from now, got {value!r} "
                f"(now is {now:.0f})")
    return None


def priority_value_or_error(priority: object) -> tuple[int, Optional[str]]:
    """Return ``(value, None)`` for a valid priority or ``(-1, message)`` naming the problem."""
    if isinstance(priority, str):
        value = PRIORITY_NAMES.get(priority.strip().lower())
        if value is not None:
            return value, None
    elif isinstance(priority, int) and not isinstance(priority, bool):
        if 0 <= priority <= 9:
            return priority, None
    return -1, (
        f"priority must be one of {', '.join(map(repr, PRIORITY_NAMES))} "
        f"or an int 0..9 (0 runs first), got {priority!r}"
    )


def parse_priority(priority: object) -> int:
    """Return the int priority for a name or int, or raise ``ValueError``."""
    value, error = priority_value_or_error(priority)
    if error:
        raise ValueError(error)
    return value


def parse_states(states: object) -> Optional[frozenset[JobState]]:
    """Normalise a ``states=`` filter: None, one state, or an iterable of states/strings."""
    if states is None:
        return None
    if isinstance(states, (str, JobState)):
        states = [states]
    try:
        return frozenset(JobState(s) for s in states)  # type: ignore[attr-defined]
    except (ValueError, TypeError):
        valid = ", ".join(s.value for s in JobState)
        raise ValueError(f"states must be job states ({valid}), got {states!r}") from None


class JobError(NamedTuple):
    """Why one attempt of a job failed."""

    type: str
    message: str
    traceback: str
    stage: Optional[str]
    attempt: int = 1


class JobInfo(NamedTuple):
    """An immutable snapshot of one job, as ``Engine.get`` returns it."""

    id: str
    kind: str
    label: str
    params: Mapping[str, Any]
    priority: int
    state: JobState
    progress: float
    stage: Optional[str]
    message: Optional[str]
    eta_seconds: Optional[float]
    attempt: int
    max_retries: int
    error: Optional[JobError]
    result: Any
    partial_result: Optional[dict]
    held: bool
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    # Beyond the contract's minimum: every attempt's error, the run limits, and
    # whether a stop was asked of a running job that has not stopped yet.
    errors: tuple = ()
    timeout: Optional[float] = None
    memory_mb: Optional[int] = None
    cancel_pending: bool = False
    # Pipelines: the jobs this one runs after (all must complete first), those of
    # them it still waits for, and the wall-clock time (seconds since the epoch)
    # before which it does not start.
    depends_on: tuple = ()
    waiting_for: tuple = ()
    not_before: Optional[float] = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class EngineStats(NamedTuple):
    """Counts and resource use at one moment."""

    queued: int
    held: int
    running: int
    max_workers: int
    busy_workers: int
    completed: int
    failed: int
    cancelled: int
    interrupted: int
    finished_kept: int
    throughput_per_min: float
    waiting_for_memory: int
    paused: bool
    process_memory_mb: float
    available_memory_mb: float
    write_error: Optional[str] = None
    thread_error: Optional[str] = None  # an engine thread hit an error (a bug): what and where
    cluster_error: Optional[str] = None  # the configured dask cluster cannot be reached: why


class Event(NamedTuple):
    """One thing the pump should know about: a state change, progress, or a notice."""

    type: str  # "state" | "progress" | "notice"
    job_id: Optional[str]
    info: Optional[JobInfo]
    message: Optional[str] = None
    level: str = "info"  # for notices: "info" | "warning" | "error"


class EngineConfig(BaseModel):
    """Limits and folders of one engine. Validated; change live with ``Engine.configure``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    max_workers: int = Field(4, ge=1, le=8, strict=True, description="worker threads running jobs")
    max_queued: int = Field(10_000, ge=1, strict=True, description="queued jobs before submit raises QueueFull")
    history_limit: int = Field(500, ge=0, strict=True, description="finished jobs kept for get()/jobs()")
    state_dir: Optional[Path] = Field(None, description="folder of the sidecar; None = no persistence")
    work_dir: Optional[Path] = Field(
        None, description="root of per-job work folders; default state_dir/jobs or a temp folder"
    )
    min_free_memory_mb: Optional[int] = Field(
        None, ge=0, description="dispatch waits while the machine has less free memory"
    )
    max_memory_mb: Optional[int] = Field(
        None, ge=1, description="dispatch waits while this process uses more memory"
    )
    auto_resume: bool = Field(True, description="adopted queued jobs run without a go-ahead")
    log_dir: Optional[Path] = Field(None, description="folder of the JSON log; default platformdirs")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    console_log: bool = Field(True, description="also log readable text to stderr")
    # Scale-out (the optional dask extra): jobs of remote_ok kinds run on this cluster.
    cluster: Optional[str] = Field(
        None, pattern=r"^(tcp|tls|ws|wss|inproc)://\S+$",
        description="dask scheduler address, e.g. tcp://127.0.0.1:8786; None = local only",
    )
    cluster_fallback_local: bool = Field(
        False, description="run remote_ok jobs locally while the cluster is unreachable"
    )
    cluster_tls_ca_file: Optional[str] = Field(None, description="TLS: the CA certificate")
    cluster_tls_cert: Optional[str] = Field(None, description="TLS: this client's certificate")
    cluster_tls_key: Optional[str] = Field(None, description="TLS: this client's private key")
    cluster_modules: tuple[str, ...] = Field(
        (), description="modules a cluster worker imports to find the kinds (beyond the built-in ones)"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class Recovery(NamedTuple):
    """What ``Engine.start`` adopted from sidecars of dead (or shut-down) engines."""

    sources: tuple = ()  # sidecar file names adopted
    requeued: int = 0  # queued (or dispatched) jobs queued again
    resumed: int = 0  # resumable running jobs re-queued from their checkpoint
    interrupted: int = 0  # running jobs that could not resume
    held: int = 0  # adopted unfinished jobs that wait for release()
    finished: int = 0  # finished jobs kept as history
    duplicates: int = 0  # jobs already known here (same id), not adopted twice
    moved_aside: tuple = ()  # damaged sidecars renamed (never deleted)
    problems: tuple = ()  # human-readable reasons, one per damaged file or entry
    skipped: tuple = ()  # queue files not adopted (a live owner, or one that cannot be told), and why

    @property
    def adopted(self) -> int:
        return self.requeued + self.resumed + self.interrupted + self.finished

    @property
    def summary(self) -> str:
        parts = []
        if self.adopted:
            sessions = [x for x in self.sources if x.startswith("queue-")]
            files = [x for x in self.sources if not x.startswith("queue-")]
            origin = ", ".join(files + ([f"{len(sessions)} earlier session(s)"] if sessions else []))
            parts.append(
                f"recovered {self.adopted} jobs from {origin}: "
                f"{self.requeued} queued again, {self.resumed} resumed from checkpoints, "
                f"{self.interrupted} interrupted, {self.finished} finished kept"
                + (f", {self.held} held for your go-ahead" if self.held else "")
            )
        if self.moved_aside:
            parts.append(f"{len(self.moved_aside)} damaged queue file(s) moved aside: "
                         + ", ".join(self.moved_aside))
        if self.skipped:
            parts.append(f"{len(self.skipped)} queue file(s) left alone: " + "; ".join(self.skipped))
        return "; ".join(parts) or "nothing to recover"
