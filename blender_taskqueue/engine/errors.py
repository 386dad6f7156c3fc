"""The few error types of blender_taskqueue, each with one meaning."""

from __future__ import annotations


class TaskQueueError(Exception):
    """Base class of every error this package raises on purpose."""


class JobCancelled(TaskQueueError):
    """Raised inside a handler by ``ctx.raise_if_cancelled()`` when the job must stop."""


class QueueFull(TaskQueueError):
    """``submit`` would exceed ``EngineConfig.max_queued``; nothing was enqueued."""


class UnknownKind(TaskQueueError, LookupError):
    """No job kind is registered under that name."""


class InvalidParams(TaskQueueError, ValueError):
    """The params do not validate against the kind's params model."""


class InvalidStateError(TaskQueueError, RuntimeError):
    """The operation does not apply to the job in its current state."""


class EngineClosed(TaskQueueError, RuntimeError):
    """The engine was shut down and takes no new work (jobs submitted before ``start()`` wait for it)."""


class JobNotFound(TaskQueueError, KeyError):
    """No job with that id is known (never submitted here, or evicted from history)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "job not found"


class NotPermitted(TaskQueueError, PermissionError):
    """The host refuses the job, e.g. a kind that goes online while Blender's
    "Allow Online Access" is off."""
