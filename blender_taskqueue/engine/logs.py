"""A private structlog logger: JSON lines to a rotating file, readable text on stderr.

All extensions share one site-packages, so this never calls
``structlog.configure()`` nor touches the root ``logging`` logger: the stdlib
logger here is a free-standing ``logging.Logger`` that no other code can reach.

The caller only runs structlog's cheap processors and puts the record on a
queue; a listener thread per engine renders and writes it. So a log line never
costs file I/O on Blender's main thread or under the engine lock.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import structlog

LOG_FILE = "blender_taskqueue.log"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}

# One file handler per path, shared by the engines of this process (rotation must
# not race between two handlers of one file).
_file_handlers: dict[Path, list[Any]] = {}
_file_lock = threading.Lock()


def default_log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir("blender_taskqueue", appauthor=False))


def _acquire_file_handler(path: Path) -> logging.Handler:
    with _file_lock:
        entry = _file_handlers.get(path)
        if entry is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=5 * 1024 * 1024, backupCount=3, encoding="utf-8", delay=True
            )
            handler.setFormatter(
                structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer())
            )
            entry = _file_handlers[path] = [handler, 0]
        entry[1] += 1
        return entry[0]


def _release_file_handler(path: Path) -> None:
    with _file_lock:
        entry = _file_handlers.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _file_handlers[path]


class _PassThroughQueueHandler(logging.handlers.QueueHandler):
    """Enqueue the record untouched: structlog's ProcessorFormatter on the far side
    needs the event dict that QueueHandler.prepare() would flatten into a string."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class EngineLog:
    """Owns the handlers of one engine's logger; ``close()`` releases them."""

    def __init__(self, log_dir: Optional[Path], level: str, console: bool) -> None:
        self._std = logging.Logger("blender_taskqueue")  # deliberately not getLogger()
        self._std.propagate = False
        self._std.setLevel(logging.DEBUG)
        self._path: Optional[Path] = None
        handlers: list[logging.Handler] = []
        try:
            self._path = (log_dir or default_log_dir()) / LOG_FILE
            handlers.append(_acquire_file_handler(self._path))
        except OSError as exc:  # an unwritable log folder must not stop the engine
            self._path = None
            print(f"blender_taskqueue: cannot write the log file: {exc}", file=sys.stderr)
        if console:
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(
                structlog.stdlib.ProcessorFormatter(
                    processor=structlog.dev.ConsoleRenderer(colors=False)
                )
            )
            handlers.append(stream)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._std.addHandler(_PassThroughQueueHandler(self._queue))
        self._listener = logging.handlers.QueueListener(self._queue, *handlers)
        self._listening = False
        self.logger: Any = None
        self.set_level(level)

    @property
    def path(self) -> Optional[Path]:
        return self._path

    def set_level(self, level: str) -> None:
        self.logger = structlog.wrap_logger(
            self._std,
            processors=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.upper()]),
            logger_name="blender_taskqueue",
        ).bind()  # bind once: the lazy proxy would re-bind on every call

    def start(self) -> None:
        """Start writing (the listener thread); lines logged before wait in the queue."""
        if self._listener is not None and not self._listening:
            self._listener.start()
            self._listening = True
            thread = getattr(self._listener, "_thread", None)
            if thread is not None:
                thread.name = "taskqueue-log"

    def flush(self) -> None:
        """Block until every queued line is written (restarts the listener thread)."""
        if self._listener is not None and self._listening:
            self._listener.stop()
            self._listening = False
            self.start()

    def close(self) -> None:
        """Write out what is queued, stop the listener thread, release the file."""
        if self._listener is not None:
            if not self._listening:  # never started: write what was logged, then stop
                self.start()
            self._listener.stop()
            self._listening = False
            self._listener = None  # type: ignore[assignment]
        for handler in list(self._std.handlers):
            self._std.removeHandler(handler)
        if self._path is not None:
            _release_file_handler(self._path)
            self._path = None
