"""Result files: reading back results too big to keep inline in the sidecar.

Owns: loading a finished job's ``result.json`` from its own work folder after
adoption or a .blend import, on a thread of its own (never the main thread,
never under the engine lock), only regular files, at most ``RESULT_READ_MAX``
bytes; and the same for the results a dependent job gets in ``ctx.inputs``
(``resolve_inputs``, on the worker thread that is about to run it).

Must not touch: any path a document names. A sidecar or a .blend is hostile
input: its ``{"$file": ...}`` marker only says that a result file exists; the
file read is always ``workdir_for(job id) / "result.json"``, and job ids are
validated (``models.job_id_error``) before a record exists. So a FIFO, a device
or somebody's token named in a file is never opened.

The engine hands the loader the jobs whose result is a marker; the loader
reads outside the lock, then, under it, swaps the marker for the result (if the
job still holds that same marker) and reports progress so the panel redraws.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .record import JobRecord
from .store import RESULT_FILE, is_result_file

if TYPE_CHECKING:
    from .engine import Engine

RESULT_READ_MAX = 64 * 1024 * 1024
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_result_file(path: Path, limit: int = RESULT_READ_MAX) -> Any:
    """The JSON in ``path``, a regular file of at most ``limit`` bytes.

    Raises:
        OSError: missing, unreadable, a symlink, not a regular file, too big.
        ValueError: not JSON.
    """
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | _NOFOLLOW)  # a FIFO must not block the open
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise OSError(f"{path.name} holds {info.st_size} bytes, over the {limit}-byte limit")
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise OSError(f"{path.name} grew over the {limit}-byte limit while read")
    finally:
        os.close(fd)
    return json.loads(b"".join(chunks).decode("utf-8"))


def resolve_inputs(job: JobRecord, workdir_for: Callable[[str], Path]) -> dict:
    """``ctx.inputs`` of a job about to run: its prerequisites' results by id, in
    ``depends_on`` order. A result kept in a file (after a restart) is read from
    that prerequisite's own folder, never from the path the marker names; call it
    with the lock released, off the main thread.

    Raises:
        OSError, ValueError: such a file is missing, too big or not JSON.
    """
    inputs = job.inputs
    if not inputs:
        return {}
    out = {}
    for pid in job.depends_on:
        if pid not in inputs:
            continue
        value = inputs[pid]
        if type(value) is dict and "$file" in value and is_result_file(value):
            try:
                value = read_result_file(workdir_for(pid) / RESULT_FILE)
            except (OSError, ValueError, RecursionError) as exc:
                raise OSError(f"the result of prerequisite job {pid!r} cannot be read back: {exc}") from None
        out[pid] = value
    return out


class ResultLoader:
    """Loads result files of adopted jobs on a short-lived daemon thread."""

    def __init__(self, engine: "Engine", workdir_for: Callable[[str], Path]) -> None:
        self._engine = engine
        self._workdir_for = workdir_for
        self._pending: list[tuple[JobRecord, Any]] = []
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._idle = threading.Event()
        self._idle.set()

    def add_locked(self, jobs: list[JobRecord]) -> None:
        """Queue jobs whose ``result`` is a result-file marker (under the engine lock)."""
        self._pending.extend((job, job.result) for job in jobs)
        if self._thread is None and self._pending and not self._stop:
            self._idle.clear()
            self._thread = threading.Thread(target=self._main, name="taskqueue-results", daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued result file is read (or the loader stopped)."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float) -> None:
        """Stop (the jobs not loaded keep their marker) and join the thread."""
        with self._engine._lock:
            self._stop = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _main(self) -> None:
        engine = self._engine
        while True:
            with engine._lock:
                if self._stop or not self._pending:
                    self._thread = None
                    self._idle.set()
                    return
                job, marker = self._pending.pop(0)
            try:
                value = read_result_file(self._workdir_for(job.id) / RESULT_FILE)
            except (OSError, ValueError, RecursionError) as exc:
                value = {"$missing": RESULT_FILE, "error": str(exc)[:500]}
            with engine._lock:
                if job.result is marker:
                    job.result = value
                    engine._events.progress(job)
