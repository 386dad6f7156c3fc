"""The built-in ``process.run`` kind: run an external program as a job.

The program is an argv list (never a shell string). Both output streams go to
``output.log`` in the job's workdir, as they come; the job's message shows the
latest line and an optional regex turns the output into progress. Cancel, the
engine's per-job ``timeout`` and the kind's own ``timeout_s`` stop the whole
process tree: terminate, ``grace_s`` seconds, then kill. The child runs in its
own session (POSIX), so grandchildren that outlive it are found through its
process group and are stopped as well: a job never leaves an orphan behind.

Progress regex (``progress_regex``), searched in every output line (stdout and
stderr; ``\\r`` ends a line too, for progress bars). It must have one of:

* a group named ``fraction``: a number from 0 to 1 (``"(?P<fraction>[0-9.]+) done"``);
* a group named ``percent``: a number from 0 to 100 (``"(?P<percent>\\d+)%"``);
* groups named ``current`` and ``total`` (``"frame (?P<current>\\d+)/(?P<total>\\d+)"``).

Importing this module registers the kind in the shared registry; ``register``
adds it to another one (a test's, a bench's). Never imports ``bpy``.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

import psutil
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..engine import JobCancelled, JobContext, KindRegistry, KindSpec
from ..engine import registry as shared_registry

KIND = "process.run"
LOG_NAME = "output.log"
STDERR_TAIL_LINES = 20  # kept in memory for the error of a failed run
ERROR_TAIL_LINES = 10  # shown in that error
POLL_S = 0.05  # how often the handler checks cancel, timeout and new output
MESSAGE_MAX_CHARS = 300
_CHUNK = 65536
_MAX_PARTIAL = 65536  # a line longer than this goes to the log in pieces
_LINE_END = re.compile(rb"[\r\n]")
_POSIX = os.name == "posix"


class ProcessFailed(RuntimeError):
    """The program exited with a non-zero code (or was killed by a signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ProcessTimeout(TimeoutError):
    """The program outlived the kind's own ``timeout_s``; its process tree was stopped."""


class ProcessRun(BaseModel):
    """Params of ``process.run``. Validated at submit: the executable must resolve, the
    cwd must exist and the progress regex must compile with the groups it needs."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(..., min_length=1, description="program and its arguments")
    cwd: Optional[str] = Field(None, description="working folder (must exist)")
    env: dict[str, str] = Field(default_factory=dict, description="added to the environment")
    timeout_s: Optional[float] = Field(None, gt=0, description="stop the tree after this long")
    progress_regex: Optional[str] = Field(
        None, description="named groups: fraction (0..1), percent (0..100), or current and total"
    )
    grace_s: float = Field(3.0, ge=0, le=60, description="between terminate and kill")

    @field_validator("argv", mode="before")
    @classmethod
    def _argv_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "argv must be a list of arguments, not a shell string "
                "(e.g. ['ffmpeg', '-i', 'in.mp4', 'out.webm'])"
            )
        return value

    @field_validator("argv")
    @classmethod
    def _argv_is_clean(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("argv[0] (the program) must not be empty")
        for i, arg in enumerate(value):
            if "\0" in arg:
                raise ValueError(f"argv[{i}] contains a NUL character")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not name or "=" in name or "\0" in name or "\0" in val:
                raise ValueError(f"invalid environment variable {name!r}")
        return value

    @field_validator("progress_regex")
    @classmethod
    def _regex_has_groups(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            progress_pattern(value)
        return value

    @model_validator(mode="after")
    def _paths_exist(self) -> "ProcessRun":
        if self.cwd is not None and not Path(self.cwd).is_dir():
            raise ValueError(f"cwd {self.cwd!r} does not exist or is not a folder")
        resolve_executable(self.argv[0], self.cwd, self.env)
        return self


def progress_pattern(text: str) -> re.Pattern[str]:
    """Compile a progress regex, or raise ``ValueError`` saying what is wrong with it."""
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ValueError(f"progress_regex {text!r} does not compile: {exc}") from None
    groups = set(pattern.groupindex)
    if "fraction" in groups or "percent" in groups:
        return pattern
    if "current" in groups and "total" in groups:
        return pattern
    missing = "total" if "current" in groups else "current" if "total" in groups else None
    if missing:
        raise ValueError(f"progress_regex {text!r} has no group named {missing!r}")
    raise ValueError(
        f"progress_regex {text!r} needs a named group: (?P<fraction>...) for 0..1, "
        "(?P<percent>...) for 0..100, or (?P<current>...) and (?P<total>...)"
    )


def resolve_executable(program: str, cwd: Optional[str], env: dict[str, str]) -> str:
    """The absolute path of the program, or raise ``ValueError``.

    A bare name is looked up on PATH (the PATH in ``env`` when it sets one); a path
    is taken relative to ``cwd``, as POSIX does, on every platform.
    """
    if os.sep in program or (os.altsep and os.altsep in program):
        path = Path(program)
        if not path.is_absolute() and cwd is not None:
            path = Path(cwd) / path
        path = path.absolute()
        if not path.exists():
            raise ValueError(f"executable {program!r} does not exist ({path})")
        if path.is_dir():
            raise ValueError(f"executable {program!r} is a folder ({path})")
        if not os.access(path, os.X_OK):
            raise ValueError(f"executable {program!r} is not executable ({path})")
        return str(path)
    found = shutil.which(program, path=env.get("PATH", os.environ.get("PATH")))
    if found is None:
        raise ValueError(f"executable {program!r} not found on PATH")
    return os.path.abspath(found)


class _Output:
    """Where both reader threads put what they read: the log file, the last line,
    the last progress match and the tail of stderr. Memory stays bounded whatever
    the program prints."""

    def __init__(
        self,
        log: IO[bytes],
        pattern: Optional[re.Pattern[str]],
        on_line: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        self._log = log
        self._pattern = pattern
        self._on_line = on_line
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self._seen: dict[str, int] = {"stdout": 0, "stderr": 0}
        self._on_line_errors = 0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)  # both streams
        self.last_line: Optional[str] = None
        self.fraction: Optional[float] = None
        self.version = 0  # bumped on every change the handler should publish
        self.bytes = 0

    def feed(self, stream: str, chunk: bytes) -> None:
        with self._lock:
            data = self._partial[stream] + chunk
            seen = self._seen[stream]  # bytes at the start of data already passed on as lines
            cut = data.rfind(b"\n") + 1
            if len(data) - cut > _MAX_PARTIAL:
                cut = len(data)
            if cut:
                # Whole lines only, so the two streams interleave line by line.
                self._log.write(data[:cut])
                self.bytes += cut
            self._partial[stream] = data[cut:]
            # For everything but the log, \r ends a line too, and each line is passed
            # on once, however the reads split it (a "\r\n" across two reads included).
            fresh = data[seen:]
            end = max(fresh.rfind(b"\n"), fresh.rfind(b"\r")) + 1
            complete = _LINE_END.split(fresh[:end])[:-1] if end else []
            self._seen[stream] = max(0, seen + end - cut)
            # The piece after the last line end waits for more, unless a \r came
            # before it: a progress bar redraws its line as "\r 40%|####" and waits.
            rest = fresh[end:]
            pending = rest if rest and data.rfind(b"\r") > data.rfind(b"\n") else b""
            self._note(stream, complete, pending)

    def close(self, stream: str) -> None:
        with self._lock:
            rest = self._partial[stream]
            seen = self._seen[stream]
            self._partial[stream] = b""
            self._seen[stream] = 0
            if rest:
                self._log.write(rest + b"\n")
                self.bytes += len(rest)
                self._note(stream, [rest[seen:]], b"")

    def _note(self, stream: str, complete: list[bytes], pending: bytes) -> None:
        """Take in the lines that just ended (``complete``) and, for the message and
        the progress only, the progress-bar piece still being redrawn (``pending``)."""
        for raw in complete[-STDERR_TAIL_LINES:] if self._on_line is None else complete:
            text = raw.decode("utf-8", "replace").rstrip()
            if not text.strip():
                continue
            self.tail.append(text)
            if stream == "stderr":
                self.stderr_tail.append(text)  # for the failure message
            if self._on_line is not None:
                try:
                    self._on_line(stream, text.strip())
                except Exception:  # a parser's bug must not stop the reading: the child would block
                    self._on_line_errors += 1
        lines = complete + [pending] if pending else complete
        newest: Optional[str] = None
        for raw in reversed(lines):  # newest first; usually one or two are enough
            text = raw.decode("utf-8", "replace").strip()
            if not text:
                continue
            if newest is None:
                newest = text
                self.last_line = text[:MESSAGE_MAX_CHARS]
                self.version += 1
                if self._pattern is None:
                    break
            fraction = self._match(text)
            if fraction is not None:
                self.fraction = fraction
                self.version += 1
                break

    def _match(self, text: str) -> Optional[float]:
        if self._pattern is None:
            return None
        m = self._pattern.search(text)
        if m is None:
            return None
        groups = m.groupdict()
        try:
            if groups.get("fraction") is not None:
                return float(groups["fraction"])
            if groups.get("percent") is not None:
                return float(groups["percent"]) / 100.0
            if groups.get("current") is not None and groups.get("total") is not None:
                total = float(groups["total"])
                return float(groups["current"]) / total if total > 0 else None
        except ValueError:
            return None
        return None

    def snapshot(self) -> tuple[int, Optional[float], Optional[str]]:
        with self._lock:
            return self.version, self.fraction, self.last_line


def _read(pipe: IO[bytes], stream: str, output: _Output) -> None:
    try:
        read = getattr(pipe, "read1", pipe.read)
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                break
            output.feed(stream, chunk)
    except (OSError, ValueError):  # the pipe was closed under us: stop reading
        pass
    finally:
        output.close(stream)


def group_members(pgid: int) -> list[psutil.Process]:
    """The processes of group ``pgid`` (POSIX; empty elsewhere). Cheap: one getpgid
    per process on the machine, a psutil object only for the members."""
    if not _POSIX:
        return []
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return found


def _living(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running. A zombie counts as gone: it runs nothing,
    and one re-parented to a PID 1 that never reaps would otherwise wait forever."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
        except psutil.Error:  # AccessDenied: assume it still runs
            alive.append(p)
    return alive


def _tree(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """``proc``, its descendants (even those that left its process group) and the
    members of its process group (even those whose parent died and that were
    re-parented). ``start_new_session`` made the child the leader of that group."""
    procs: dict[int, psutil.Process] = {}
    if proc.returncode is None:
        try:
            root = psutil.Process(proc.pid)
            procs[root.pid] = root
            for p in root.children(recursive=True):
                procs[p.pid] = p
        except psutil.Error:
            pass
    for p in group_members(proc.pid):
        procs.setdefault(p.pid, p)
    return list(procs.values())


def _signal(procs: list[psutil.Process], kill: bool) -> None:
    for p in procs:
        try:
            p.kill() if kill else p.terminate()  # psutil checks for pid reuse first
        except psutil.Error:
            pass


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    alive = _living(procs)
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = _living(alive)
    return alive


def stop_processes(procs: list[psutil.Process], grace_s: float) -> None:
    """Terminate ``procs``, wait up to ``grace_s``, then kill what is left (for
    processes that are not our children, such as one left by a crashed session)."""
    _signal(procs, kill=False)
    alive = _wait_gone(procs, grace_s)
    if alive:
        _signal(alive, kill=True)
        _wait_gone(alive, 2.0)


def stop_tree(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """Terminate ``proc`` and every process it started, wait up to ``grace_s``, then
    kill what is left. Reaps ``proc``, so no zombie of ours remains. Returns how
    many processes were asked to stop."""
    procs = _tree(proc)
    _signal(procs, kill=False)
    alive = _wait_gone(procs, grace_s)
    # A process forked during the grace period is caught here too.
    late = [p for p in _tree(proc) if p.pid not in {q.pid for q in procs}]
    alive += _living(late)
    if alive:
        _signal(alive, kill=True)
        _wait_gone(alive, 2.0)
    if proc.returncode is None:
        try:
            proc.kill()
        except OSError:
            pass
    proc.wait()
    return len(procs) + len(late)


@dataclass
class Watched:
    """How a watched process ended. ``stop`` is ``"cancel"``, ``"timeout"`` or None."""

    code: int
    stop: Optional[str]
    pid: int
    output: _Output
    log_path: Path
    duration_s: float


def watch(
    ctx: JobContext,
    argv: list[str],
    *,
    executable: str,
    cwd: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    timeout_s: Optional[float] = None,
    grace_s: float = 3.0,
    pattern: Optional[re.Pattern[str]] = None,
    on_line: Optional[Callable[[str, str], None]] = None,
    publish: Optional[Callable[[_Output], None]] = None,
    on_start: Optional[Callable[[int], None]] = None,
) -> Watched:
    """Run ``argv`` in its own session and watch it until it exits, the job is
    cancelled or ``timeout_s`` passes; then stop what is left of its tree.

    Output goes to ``output.log`` in the job's workdir (appended to on later
    attempts). ``on_line(stream, line)`` sees every non-empty line, in order, on a
    reader thread: keep it cheap. ``publish(output)`` runs on the job's thread every
    ``POLL_S`` while the output changes; by default the latest line and the
    ``pattern``'s fraction become the job's progress. ``on_start(pid)`` runs once the
    process exists (to record it, say, in a checkpoint). Never raises for the
    program's own failure: the caller decides what an exit code means.
    """
    log_path = ctx.workdir / LOG_NAME
    extra: dict[str, Any] = {}
    if _POSIX:
        extra["start_new_session"] = True
    else:  # pragma: no cover - Windows
        extra["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    ctx.raise_if_cancelled()
    again = ctx.attempt > 1 or ctx.resume_from is not None  # keep the earlier output
    with open(log_path, "ab" if again else "wb", buffering=0) as log:
        if again:
            how = "resumed" if ctx.resume_from is not None else "started"
            log.write(f"--- attempt {ctx.attempt} {how} ---\n".encode())
        output = _Output(log, pattern, on_line)
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            executable=executable,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **extra,
        )
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            threading.Thread(
                target=_read, args=(pipe, name, output),
                name=f"{ctx.kind}-{ctx.job_id}-{name}", daemon=True,
            )
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
        ]
        for t in readers:
            t.start()
        ctx.log.info("process started", pid=proc.pid, argv=argv, log=str(log_path))
        if on_start is not None:
            on_start(proc.pid)
        deadline = None if timeout_s is None else started + timeout_s
        published = 0
        stop: Optional[str] = None

        def _pass_on() -> None:
            nonlocal published
            version = output.version
            if version != published:
                published = version
                if publish is not None:
                    publish(output)
                else:
                    _, fraction, line = output.snapshot()
                    ctx.progress(fraction, message=line)

        try:
            while True:
                try:
                    proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    pass
                _pass_on()
                if proc.returncode is not None:
                    break
                if ctx.cancelled:
                    stop = "cancel"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stop = "timeout"
                    break
        finally:
            if proc.returncode is None:  # cancel, timeout, or an error in this loop
                ctx.progress(None, stage="stopping", message="stopping the process tree")
                stop_tree(proc, grace_s)
            elif _living(group_members(proc.pid)):
                # The program exited but left processes behind in its group (they may
                # hold our pipes open): they belong to this job, stop them too.
                ctx.log.warning("process left processes behind; stopping them", pid=proc.pid)
                stop_tree(proc, grace_s)
            for t, pipe in zip(readers, (proc.stdout, proc.stderr), strict=True):
                t.join(timeout=2.0)
                if t.is_alive():
                    # Only a process that escaped into its own session can still hold
                    # the pipe. Closing it now would block on the reader's lock: leave
                    # the (daemon) reader to end when that process does.
                    ctx.log.warning("output pipe still open after the process tree ended",
                                    reader=t.name)
                    continue
                try:
                    pipe.close()
                except OSError:
                    pass
        duration = time.monotonic() - started
        _pass_on()
    code = proc.wait()  # reaped already: returns the exit code at once
    return Watched(code, stop, proc.pid, output, log_path, duration)


def run_process(ctx: JobContext, params: ProcessRun) -> dict:
    """Run a program (argv list) with a cwd, env additions and a timeout; log its output."""
    ctx.progress(0.0, stage="starting", message=" ".join(params.argv)[:MESSAGE_MAX_CHARS])
    executable = resolve_executable(params.argv[0], params.cwd, params.env)
    pattern = progress_pattern(params.progress_regex) if params.progress_regex else None
    ctx.progress(None, stage="running")
    done = watch(
        ctx, params.argv, executable=executable, cwd=params.cwd, env=params.env,
        timeout_s=params.timeout_s, grace_s=params.grace_s, pattern=pattern,
    )
    if done.stop == "cancel":
        raise JobCancelled(
            f"process {params.argv[0]!r} (pid {done.pid}) was stopped: job cancelled"
        )
    if done.stop == "timeout":
        raise ProcessTimeout(
            f"process {params.argv[0]!r} timed out after {params.timeout_s:g} s (timeout_s); "
            f"its process tree was stopped. Log: {done.log_path}"
        )
    if done.code != 0:
        raise ProcessFailed(
            failure_message(params.argv[0], done.code, done.output, done.log_path), done.code
        )
    ctx.log.info("process finished", pid=done.pid, duration_s=round(done.duration_s, 3))
    return {"exit_code": done.code, "log": str(done.log_path), "duration_s": round(done.duration_s, 3)}


def failure_message(program: str, code: int, output: _Output, log_path: Path) -> str:
    """The error of a failed run: how it ended, the last lines of stderr, the log."""
    if code < 0 and _POSIX:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    tail = list(output.stderr_tail)[-ERROR_TAIL_LINES:]
    text = f"process {program!r} {how}"
    if tail:
        text += "; last lines of stderr:\n" + "\n".join(tail)
    else:
        text += " (no stderr output)"
    return f"{text}\nLog: {log_path}"


# One spec for the shared registry (importing this module registers the kind there)
# and for any other registry a test or a bench passes to register().
SPEC = KindSpec(
    name=KIND,
    handler=run_process,
    params=ProcessRun,
    out_of_process=True,
    description=(run_process.__doc__ or "").strip().splitlines()[0],
)
shared_registry.register(SPEC)


def register(registry: KindRegistry) -> KindSpec:
    """Add the kind to ``registry`` (importing this module already added it to the
    shared one)."""
    return registry.register(SPEC)
