"""Pure-Python job engine. Never imports bpy."""

from .context import JobContext, current_context
from .engine import PYTHON_CALL, Engine
from .errors import (
    EngineClosed,
    InvalidParams,
    InvalidStateError,
    JobCancelled,
    JobNotFound,
    NotPermitted,
    QueueFull,
    TaskQueueError,
    UnknownKind,
)
from .kinds import KindRegistry, KindSpec, job_kind, registry
from .models import (
    PRIORITY_NAMES,
    EngineConfig,
    EngineStats,
    Event,
    JobError,
    JobInfo,
    JobState,
    parse_priority,
)

__all__ = [
    "PRIORITY_NAMES",
    "PYTHON_CALL",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "Event",
    "InvalidParams",
    "InvalidStateError",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobInfo",
    "JobNotFound",
    "NotPermitted",
    "JobState",
    "KindRegistry",
    "KindSpec",
    "QueueFull",
    "TaskQueueError",
    "UnknownKind",
    "current_context",
    "job_kind",
    "parse_priority",
    "registry",
]
