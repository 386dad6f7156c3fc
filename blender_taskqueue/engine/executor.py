"""Executors: where a claimed job's work runs, and how it ended.

Owns: turning one claimed job into an ``Outcome`` (ok with a result, cancelled,
or an error with its traceback and the stage it happened in).

Must not touch: job states, the engine's lock or its structures. An executor
is called on a worker thread with the lock released, after the engine has
marked the job running, and the engine records the outcome. That split is the
seam a remote executor plugs into: ``LocalExecutor`` runs the handler on the
calling worker thread; an executor for a cluster would send the kind's name and
JSON params to a remote worker, relay its progress and checkpoints through the
same ``JobContext`` hooks, and return the same ``Outcome``, so states,
priorities, limits, cancel and persistence stay the engine's, unchanged.
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Protocol

from .context import JobContext, _local
from .errors import JobCancelled, UnknownKind
from .kinds import KindSpec
from .record import JobRecord
from .results import resolve_inputs

if TYPE_CHECKING:
    from .engine import Engine


class Outcome(NamedTuple):
    """How a job's run ended. ``kind`` is "ok" (``value`` is the result),
    "cancelled" (``value`` is the JobCancelled) or "error" (``value`` is the
    exception, ``traceback`` its text, ``stage`` set when it happened before the
    handler ran, e.g. "params")."""

    kind: str
    value: Any
    traceback: str = ""
    stage: Optional[str] = None


class Executor(Protocol):
    def execute(self, job: JobRecord, spec: Optional[KindSpec]) -> Outcome:
        """Run ``job`` (already marked running) to its end; never raise."""
        ...


class LocalExecutor:
    """Runs the handler on the calling worker thread, in this process."""

    __slots__ = ("_engine",)

    def __init__(self, engine: "Engine") -> None:
        self._engine = engine  # the JobContext's host: progress, checkpoints, main-thread calls

    def execute(self, job: JobRecord, spec: Optional[KindSpec]) -> Outcome:
        stage = "params"
        try:
            if spec is None:
                raise UnknownKind(
                    f"job kind {job.kind!r} is not registered (is the add-on that provides it enabled?)"
                )
            params = spec.handler_params(job.params)
            stage = "inputs"
            inputs = resolve_inputs(job, self._engine.workdir_for)
            if job.cancel_requested:
                raise JobCancelled("cancelled before it started")
            ctx = JobContext(self._engine, job, params, job.checkpoint if spec.resumable else None, inputs)
            stage = "run"
            _local.ctx = ctx
            return Outcome("ok", spec.handler(ctx, params))
        except JobCancelled as exc:
            return Outcome("cancelled", exc)
        except BaseException as exc:  # a handler's SystemExit must not kill the worker
            return Outcome("error", exc, traceback.format_exc(), None if stage == "run" else stage)
        finally:
            _local.ctx = None
