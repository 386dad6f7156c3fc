"""The cluster executor: jobs of ``remote_ok`` kinds run on a dask.distributed cluster.

Owns: sending one claimed job to the cluster as the kind's name and JSON params
(never a pickled closure: the workers install the same package), relaying its
progress and checkpoints back, stopping it on cancel, re-attaching to it after
this process died, and turning how it ended into an ``Outcome``.

Must not touch: job states, the engine's lock or its structures. Like
``LocalExecutor`` it runs on the job's engine worker thread with the lock
released, and it applies progress and checkpoints on that thread (the engine's
rule: only a job's own thread reports its progress), so states, priorities,
per-kind limits, history, persistence and the panel stay exactly as for local
jobs.

How each promise is kept:

* Key and priority: the dask key is ``taskqueue-<job id>-<attempt>`` with
  ``pure=False``; the job's priority (0 urgent .. 9) maps to dask's (higher runs
  first); ``retries=0``.
* Progress and checkpoints: the remote context publishes them on the key's
  topic (``Worker.log_event``); the client's topic handler queues them and this
  thread applies them. ``scripts/bench.py`` measures report-to-engine latency.
* Cancel: ``Future.cancel()`` does not stop a running task, so the remote
  context watches a ``distributed.Event`` named after the key; the engine's
  cancel sets it, and the kind stops cooperatively (``ctx.cancelled``,
  ``ctx.sleep``, ``process.run``'s tree kill all see it). After a grace period
  the future is cancelled too.
* No silent retries: a dask scheduler re-runs a task whose worker died. The
  remote side marks a ``Variable`` when it starts; a second start of the same key
  refuses to run and reports the lost worker, and the job ends ``interrupted``
  (a ``KilledWorker`` does the same). Set the scheduler's
  ``distributed.scheduler.allowed-failures`` to 0 as well to fail fast.
* Blender crash: the future is published on the scheduler as a dataset named by
  the key, which keeps it (and its result) alive without this client. The key is
  stored in the job's checkpoint under ``"$remote"``, so recovery re-queues the
  job and this executor re-attaches to the published future instead of
  submitting again. A future the cluster no longer has ends the job
  ``interrupted`` with the reason.
* Security: ``distributed.security.Security`` with TLS when certificates are
  configured; the address names the scheduler (loopback by default).

Importing this module imports nothing from dask; the engine builds a
``ClusterExecutor`` only when a cluster address is configured.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import JobCancelled, TaskQueueError
from .executor import Outcome
from .kinds import KindSpec
from .record import JobRecord
from .results import resolve_inputs

if TYPE_CHECKING:
    from .engine import Engine

REMOTE_KEY = "$remote"
CANCEL_GRACE_S = 10.0
PROGRESS_INTERVAL_S = 0.05  # at most 20 progress events a second per job over the wire


class ClusterUnreachable(TaskQueueError, ConnectionError):
    """The configured dask scheduler cannot be reached."""


class WorkerLost(TaskQueueError, RuntimeError):
    """The cluster worker running the job died; the job is not run again silently."""


def dask_key(job_id: str, attempt: int) -> str:
    return f"taskqueue-{job_id}-{attempt}"


def dask_priority(priority: int) -> int:
    """Ours: 0 is urgent, 9 is low. Dask's: higher runs first."""
    return 10 - int(priority)


# --- the worker side -----------------------------------------------------------


class RemoteContext:
    """What a handler gets on a cluster worker: the JobContext surface, with
    progress and checkpoints sent to the engine and cancel read from the key's
    ``distributed.Event``."""

    def __init__(self, key: str, job_id: str, kind: str, attempt: int, params: Any,
                 resume_from: Optional[dict], inputs: Optional[dict] = None) -> None:
        from distributed import Event, get_worker

        self.inputs: dict = inputs if inputs is not None else {}
        self.job_id = job_id
        self.kind = kind
        self.attempt = attempt
        self.params = params
        self.resume_from = resume_from
        self.slot: Optional[str] = None
        self._key = key
        self._worker = get_worker()
        self._event = Event(f"{key}-cancel")
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._pending: Optional[dict] = None
        self._workdir: Any = None
        self._watcher = threading.Thread(target=self._watch, name=f"taskqueue-remote-{job_id}", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                if self._event.wait(timeout=0.2):
                    self._stop.set()
                    return
            except Exception:  # the scheduler went away: the task is moot
                time.sleep(0.2)

    def _send(self, message: dict) -> None:
        self._worker.log_event(self._key, {**message, "sent": time.time()})

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_reason(self) -> Optional[str]:
        return "user" if self._stop.is_set() else None

    def raise_if_cancelled(self) -> None:
        if self._stop.is_set():
            raise JobCancelled(f"job {self.job_id} was asked to stop")

    def sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)
        self.raise_if_cancelled()

    def progress(self, fraction: Optional[float], stage: Optional[str] = None,
                 message: Optional[str] = None) -> None:
        if fraction is not None:
            fraction = 0.0 if fraction < 0 else 1.0 if fraction > 1 else float(fraction)
        update = {"type": "progress", "fraction": fraction, "stage": stage, "message": message}
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S or fraction in (0.0, 1.0):
            self._last_progress = now
            self._pending = None
            self._send(update)
        else:
            self._pending = update  # the newest one is sent before the task returns

    def checkpoint(self, data: dict) -> None:
        import json

        if not isinstance(data, dict):
            raise TypeError(f"checkpoint data must be a dict, got {type(data).__name__}")
        self._send({"type": "checkpoint", "data": json.loads(json.dumps(data))})

    def call_on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise TaskQueueError("call_on_main: a cluster worker has no Blender main thread; "
                             "mark the kind remote_ok=False")

    @property
    def workdir(self) -> Any:
        if self._workdir is None:
            import tempfile
            from pathlib import Path

            self._workdir = Path(tempfile.gettempdir()) / "blender_taskqueue_remote" / self.job_id
            self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    @property
    def log(self) -> Any:
        import structlog

        return structlog.get_logger("blender_taskqueue.remote").bind(
            job_id=self.job_id, kind=self.kind, attempt=self.attempt)

    def close(self) -> None:
        if self._pending is not None:
            self._send(self._pending)
        self._stop.set()


def run_remote(kind: str, params: dict, job_id: str, attempt: int, resume_from: Optional[dict],
               key: str, modules: tuple = (), inputs: Optional[dict] = None) -> Any:
    """The task a cluster worker runs: look the kind up by name (importing the
    built-in kinds and ``modules``), validate the JSON params, run the handler."""
    import importlib

    from distributed import Variable

    started = Variable(f"{key}-started")
    try:
        where = started.get(timeout=0.001)
    except TimeoutError:
        where = None
    if where is not None:
        raise WorkerLost(f"the worker running this job ({where}) died; it is not run again "
                         "(no silent retries): retry the job to run it again")
    from distributed import get_worker

    started.set(str(get_worker().address))
    for name in ("blender_taskqueue.kinds.demo", "blender_taskqueue.kinds.process",
                 "blender_taskqueue.kinds.render", *modules):
        importlib.import_module(name)
    from .kinds import registry

    spec = registry.get(kind)
    ctx = RemoteContext(key, job_id, kind, attempt, None, resume_from, inputs)
    try:
        handler_params = spec.handler_params(spec.validate_params(params))
        ctx.params = handler_params
        return spec.handler(ctx, handler_params)
    finally:
        ctx.close()


# --- the engine side -------------------------------------------------------------


def security_for(config: Any) -> Any:
    """``distributed.security.Security`` with TLS when the config names certificates."""
    if not (config.cluster_tls_ca_file or config.cluster_tls_cert):
        return None
    from distributed.security import Security

    return Security(tls_ca_file=config.cluster_tls_ca_file, tls_client_cert=config.cluster_tls_cert,
                    tls_client_key=config.cluster_tls_key, require_encryption=True)


class Refuse:
    """An executor that ends the job ``interrupted`` with a reason, running nothing."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def execute(self, job: JobRecord, spec: Optional[KindSpec]) -> Outcome:
        return Outcome("interrupted", WorkerLost(self.reason))


class ClusterExecutor:
    """Runs jobs of ``remote_ok`` kinds on the dask cluster at ``address``."""

    def __init__(self, engine: "Engine", address: str, *, security: Any = None,
                 connect_timeout: float = 5.0, modules: tuple = ()) -> None:
        self._engine = engine
        self.address = address
        self._security = security
        self._connect_timeout = connect_timeout
        self._modules = tuple(modules)
        self._client: Any = None
        self._lock = threading.Lock()
        self.last_error: Optional[str] = None
        self.latencies: list[float] = []  # seconds from a worker's report to its application here

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from distributed import Client

                try:
                    self._client = Client(self.address, security=self._security,
                                          timeout=self._connect_timeout, set_as_default=False)
                except Exception as exc:
                    self.last_error = f"cluster {self.address} unreachable: {exc}"
                    raise ClusterUnreachable(self.last_error) from None
                self.last_error = None
            return self._client

    def reachable(self) -> bool:
        try:
            self.client()
            return True
        except ClusterUnreachable:
            return False

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close(timeout=2)
            except Exception:
                pass

    def execute(self, job: JobRecord, spec: Optional[KindSpec]) -> Outcome:
        try:
            return self._execute(job, spec)
        except JobCancelled as exc:
            return Outcome("cancelled", exc)
        except WorkerLost as exc:
            return Outcome("interrupted", exc, traceback.format_exc())
        except BaseException as exc:
            return Outcome("error", exc, traceback.format_exc(), "cluster")

    def _execute(self, job: JobRecord, spec: Optional[KindSpec]) -> Outcome:
        from distributed import Event, Future

        if spec is None:
            raise TaskQueueError(f"job kind {job.kind!r} is not registered")
        client = self.client()
        checkpoint = dict(job.checkpoint or {})
        key = checkpoint.pop(REMOTE_KEY, None)
        if key != dask_key(job.id, job.attempt):
            key = None  # an earlier attempt's run (a retry starts a new one)
        resume_from = checkpoint or None
        future: Any = None
        if key is not None:  # re-attach after a crash of the process that submitted it
            try:
                future = client.get_dataset(key, default=None)
            except Exception:
                future = None
            if future is None:
                raise WorkerLost(f"the cluster no longer has job {job.id} (key {key}): it was "
                                 "lost while Blender was away; retry the job to run it again")
        else:
            key = dask_key(job.id, job.attempt)
            self._engine._record_checkpoint(job, {**checkpoint, REMOTE_KEY: key})
        inbox: "queue.SimpleQueue[dict]" = queue.SimpleQueue()
        wake = threading.Event()  # a report arrived or the future finished

        def on_event(event: Any) -> None:
            _at, message = event
            inbox.put(message)
            wake.set()
        client.subscribe_topic(key, on_event)
        try:
            if future is None:
                future = client.submit(
                    run_remote, job.kind, dict(job.params), job.id, job.attempt,
                    resume_from if spec.resumable else None, key, self._modules,
                    resolve_inputs(job, self._engine.workdir_for) if job.inputs else None,
                    key=key, pure=False, priority=dask_priority(job.priority), retries=0,
                )
                client.publish_dataset(future, name=key, override=True)
            assert isinstance(future, Future)
            future.add_done_callback(lambda _f: wake.set())
            cancel_at: Optional[float] = None
            user_checkpoint = checkpoint
            while True:
                self._drain(job, inbox, key, user_checkpoint)
                if job.cancel_requested and cancel_at is None:
                    if job.cancel_reason == "shutdown":  # Blender closes: the cluster keeps it
                        raise JobCancelled(f"left {key} running on the cluster")
                    Event(f"{key}-cancel", client=client).set()
                    cancel_at = time.monotonic()
                if cancel_at is not None and time.monotonic() - cancel_at > CANCEL_GRACE_S:
                    future.cancel()
                    raise JobCancelled(f"{key} did not stop within {CANCEL_GRACE_S:g} s; cancelled")
                if future.done():
                    break
                wake.wait(0.05)  # cancel is seen within 50 ms
                wake.clear()
            self._drain(job, inbox, key, user_checkpoint)
            if future.status == "error":
                exc = future.exception()
                if type(exc).__name__ == "KilledWorker":
                    raise WorkerLost(f"the cluster's workers died running job {job.id}: {exc}")
                raise exc
            if future.status == "cancelled":
                raise JobCancelled(f"{key} was cancelled on the cluster")
            return Outcome("ok", future.result())
        finally:
            try:
                client.unsubscribe_topic(key)
            except Exception:
                pass
            if future is not None and future.done():
                self._forget(client, key)

    def _drain(self, job: JobRecord, inbox: "queue.SimpleQueue[dict]", key: str, user: dict) -> None:
        while True:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                return
            sent = message.get("sent")
            if isinstance(sent, (int, float)):
                self.latencies.append(max(0.0, time.time() - sent))
                del self.latencies[:-10_000]
            if message.get("type") == "progress":
                self._engine._report_progress(job, message.get("fraction"), message.get("stage"),
                                              message.get("message"))
            elif message.get("type") == "checkpoint" and isinstance(message.get("data"), dict):
                user.clear()
                user.update(message["data"])
                self._engine._record_checkpoint(job, {**message["data"], REMOTE_KEY: key})

    @staticmethod
    def _forget(client: Any, key: str) -> None:
        for call in (lambda: client.unpublish_dataset(key),
                     lambda: __import__("distributed").Variable(f"{key}-started", client=client).delete()):
            try:
                call()
            except Exception:
                pass
