"""JobContext: what a handler gets to report progress, stop, checkpoint and reach the main thread."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import JobCancelled

if TYPE_CHECKING:
    from .engine import Engine
    from .record import JobRecord

_local = threading.local()


def current_context() -> Optional["JobContext"]:
    """The JobContext of the job running on this thread, or None outside a job.

    Lets an ad-hoc callable run through ``tq.run`` report progress without
    taking a ``ctx`` argument.
    """
    return getattr(_local, "ctx", None)


class JobContext:
    """Handed to every handler as its first argument."""

    __slots__ = ("_engine", "_job", "job_id", "kind", "attempt", "params", "resume_from", "_log", "_workdir",
                 "slot", "inputs")

    def __init__(
        self,
        engine: "Engine",
        job: "JobRecord",
        params: Any,
        resume_from: Optional[dict],
        inputs: Optional[dict] = None,
    ) -> None:
        self._engine = engine
        self._job = job
        self.job_id: str = job.id
        self.kind: str = job.kind
        self.attempt: int = job.attempt
        self.params = params
        self.resume_from = resume_from
        # The resource the engine chose for this run (a server URL), for kinds that
        # declare ``KindSpec.slots``; None otherwise.
        self.slot: Optional[str] = job.slot
        # The results of the jobs this one depends on (``submit(depends_on=...)``),
        # keyed by their ids in the order given; {} for a job without prerequisites.
        self.inputs: dict[str, Any] = inputs if inputs is not None else {}
        self._log: Any = None
        self._workdir: Optional[Path] = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to this job's id, kind and attempt."""
        if self._log is None:
            self._log = self._engine.logger.bind(
                job_id=self.job_id, kind=self.kind, attempt=self.attempt
            )
        return self._log

    @property
    def workdir(self) -> Path:
        """This job's own folder for outputs; created on first use."""
        if self._workdir is None:
            self._workdir = self._engine.workdir_for(self.job_id)
            self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    def progress(
        self,
        fraction: Optional[float],
        stage: Optional[str] = None,
        message: Optional[str] = None,
    ) -> None:
        """Report progress. ``fraction`` is clamped to 0..1 (None keeps the last one);
        ``stage`` and ``message`` replace the shown ones when given."""
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
                raise TypeError(f"progress fraction must be a number, got {fraction!r}")
            if math.isnan(fraction):
                raise ValueError("progress fraction must be a number, got NaN")
            fraction = 0.0 if fraction < 0 else 1.0 if fraction > 1 else float(fraction)
        if stage is not None and not isinstance(stage, str):
            stage = str(stage)
        if message is not None and not isinstance(message, str):
            message = str(message)
        self._engine._report_progress(self._job, fraction, stage, message)

    @property
    def cancelled(self) -> bool:
        """True once the job was asked to stop (cancel, timeout or shutdown)."""
        return self._job.cancel_requested

    @property
    def stop_reason(self) -> Optional[str]:
        """Why the job was asked to stop: ``"user"`` (cancel), ``"timeout"``, or
        ``"shutdown"`` (Blender is closing: a resumable job should leave remote work
        running and resume from its checkpoint); None while it may go on."""
        return self._job.cancel_reason if self._job.cancel_requested else None

    def raise_if_cancelled(self) -> None:
        """Raise ``JobCancelled`` if the job was asked to stop."""
        if self._job.cancel_requested:
            raise JobCancelled(f"job {self.job_id} was asked to stop ({self._job.cancel_reason})")

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, waking at once (with ``JobCancelled``) if the job is asked to stop."""
        self._engine._cancel_event(self._job).wait(seconds)
        self.raise_if_cancelled()

    def checkpoint(self, data: dict) -> None:
        """Keep ``data`` (JSON) as the partial result and as ``resume_from`` after a crash."""
        if not isinstance(data, dict):
            raise TypeError(f"checkpoint data must be a dict, got {type(data).__name__}")
        try:
            data = json.loads(json.dumps(data))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint data must be JSON data: {exc}") from None
        self._engine._record_checkpoint(self._job, data)

    def call_on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the main thread and return its result.

        Blocks this worker until the pump (or ``wait`` on the main thread) runs it;
        re-raises fn's exception here. Raises ``JobCancelled`` if the job is asked
        to stop before the call started. The only sanctioned way to touch ``bpy``.
        Avoid running operators inside ``context.temp_override()`` in ``fn``:
        Blender then calls into Python without the GIL while worker threads run,
        which corrupts memory (a Blender bug, reproduced in 3.4 and 5.0).
        """
        return self._engine._call_on_main(self._job, fn, args, kwargs)
