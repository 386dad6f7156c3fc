"""The built-in ``process.run`` kind: run an external program as a job.

The program is an argv list (never a shell string). Both output streams go to
``output.log`` in the job's workdir, as they come; the job's message shows the
latest line and an optional regex turns the output into progress.

Stopping the whole tree. Cancel, the engine's per-job ``timeout`` and the kind's
own ``timeout_s`` stop the process and everything it started: terminate,
``grace_s`` seconds, then kill; when the program exits by itself, whatever it
left running is stopped the same way. What belongs to the job is found three
ways: the program's descendants (psutil), the members of its process group (it
runs in its own session on POSIX) and, for those that escaped both, a marker in
the environment: every child gets ``BLENDER_TASKQUEUE_JOB=<job id>:<random>``
(``MARKER_ENV``), which is inherited across fork, ``setsid`` and exec, and the
processes whose environment carries it are stopped too (``marked_processes``).
Only processes started after the job's program and whose environment the user may
read are looked at, so a process of another user is never touched. The limits,
honestly: a process that execs with a clean environment (``env -i``, a daemon
manager such as ``systemd-run`` or ``launchctl`` that starts it on its behalf) is
not found; on Windows and macOS there are no process groups, so only the
descendants and the marker apply. Why not the alternatives: making Blender a
child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``) would change Blender itself,
which would then inherit and have to reap every orphan of every add-on; a cgroup
is Linux-only and writable for an ordinary user only where systemd delegates one.

The log. ``output.log`` holds at most ``log_max_bytes`` (32 MB by default); past
that it is renamed ``output.log.1`` (replacing the older one) and a new one
begins, so the logs take at most twice the cap. The output is always read, so the
program never blocks on a full pipe, whatever happens to the log file. A write
to the log that fails (a full disk, a quota, a removed drive) is not retried:
the job goes on without a log, with a visible warning (its stage and message
say so, the engine log has it, and the result's ``warnings`` and ``log_error``
name the problem). Policy: the log is a diagnostic, not the job's product, so
losing it does not fail a job whose program succeeded; a failed job's error
says that its log is incomplete.

Progress regex (``progress_regex``), searched in every output line (stdout and
stderr; ``\\r`` ends a line too, for progress bars). It must have one of:

* a group named ``fraction``: a number from 0 to 1 (``"(?P<fraction>[0-9.]+) done"``);
* a group named ``percent``: a number from 0 to 100 (``"(?P<percent>\\d+)%"``);
* groups named ``current`` and ``total`` (``"frame (?P<current>\\d+)/(?P<total>\\d+)"``).

Python's regex engine holds the interpreter lock while it matches, so a regex that
backtracks catastrophically would freeze every thread, Blender's included. So:
patterns with the shapes that do (a repeated part inside a repeated part, such as
``(a+)+``; two repeats in a row that can match the same text, such as ``.*\\d+``)
are refused at submit; the regex only sees the last ``REGEX_WINDOW`` (1024)
characters of a line; and a match that still takes over ``REGEX_SLOW_S`` turns
progress parsing off for the rest of the run, with a warning. What is left: one
such slow match per run, bounded by the window (a shape the check does not know,
such as a back-reference, can still take seconds once).

``describe(params)`` says exactly what a job will run (the resolved program, every
argument, the folder, the environment changes), for a person to read before
releasing a job from another file.

Importing this module registers the kind in the shared registry; ``register``
adds it to another one (a test's, a bench's). Never imports ``bpy``.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Optional, Protocol

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..engine import JobCancelled, JobContext, KindRegistry, KindSpec
from ..engine import registry as shared_registry

KIND = "process.run"
LOG_NAME = "output.log"
LOG_MAX_BYTES = 32 * 1024 * 1024  # output.log is rotated past this; one older file is kept
LOG_MIN_BYTES = 64 * 1024
MARKER_ENV = "BLENDER_TASKQUEUE_JOB"  # in every child's environment: "<job id>:<random>"
STDERR_TAIL_LINES = 20  # kept in memory for the error of a failed run
ERROR_TAIL_LINES = 10  # shown in that error
POLL_S = 0.05  # how often the handler checks cancel, timeout and new output
MESSAGE_MAX_CHARS = 300
REGEX_WINDOW = 1024  # the progress regex sees only the last this many characters of a line
REGEX_SLOW_S = 0.25  # one match slower than this turns the progress regex off for the run
_CHUNK = 65536
_MAX_PARTIAL = 65536  # a line longer than this goes to the log in pieces
_LINE_END = re.compile(rb"[\r\n]")
_POSIX = os.name == "posix"
_STRAY_ROUNDS = 3  # rounds of "find what is left, stop it" after the program ended
# Variables that change which code a program loads: the release dialog says so.
_CODE_VARS = frozenset({
    "PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "DYLD_INSERT_LIBRARIES",
    "DYLD_LIBRARY_PATH", "DYLD_FRAMEWORK_PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME",
    "PYTHONUSERBASE", "PERL5LIB", "PERL5OPT", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH",
    "BASH_ENV", "ENV", "JAVA_TOOL_OPTIONS", "BLENDER_USER_SCRIPTS", "BLENDER_SYSTEM_SCRIPTS",
    "BLENDER_USER_CONFIG", "PATHEXT", "COMSPEC",
})


class ProcessFailed(RuntimeError):
    """The program exited with a non-zero code (or was killed by a signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ProcessTimeout(TimeoutError):
    """The program outlived the kind's own ``timeout_s``; its process tree was stopped."""


class ProcessRun(BaseModel):
    """Params of ``process.run``. Validated at submit: the executable must resolve, the
    cwd must exist and the progress regex must compile with the groups it needs (and
    without the shapes that backtrack catastrophically)."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(..., min_length=1, description="program and its arguments")
    cwd: Optional[str] = Field(None, description="working folder (must exist)")
    env: dict[str, str] = Field(default_factory=dict, description="added to the environment")
    timeout_s: Optional[float] = Field(None, gt=0, description="stop the tree after this long")
    progress_regex: Optional[str] = Field(
        None, max_length=2000,
        description="named groups: fraction (0..1), percent (0..100), or current and total",
    )
    grace_s: float = Field(3.0, ge=0, le=60, description="between terminate and kill")
    log_max_bytes: int = Field(
        LOG_MAX_BYTES, ge=LOG_MIN_BYTES, le=1 << 40,
        description="output.log is rotated to output.log.1 past this size",
    )

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
    """Compile a progress regex, or raise ``ValueError`` saying what is wrong with it
    (it does not compile, lacks the named groups, or may backtrack catastrophically)."""
    try:
        pattern = re.compile(text)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"progress_regex {text!r} does not compile: {exc}") from None
    groups = set(pattern.groupindex)
    if not ("fraction" in groups or "percent" in groups or {"current", "total"} <= groups):
        missing = "total" if "current" in groups else "current" if "total" in groups else None
        if missing:
            raise ValueError(f"progress_regex {text!r} has no group named {missing!r}")
        raise ValueError(
            f"progress_regex {text!r} needs a named group: (?P<fraction>...) for 0..1, "
            "(?P<percent>...) for 0..100, or (?P<current>...) and (?P<total>...)"
        )
    risk = regex_risk(text)
    if risk is not None:
        raise ValueError(
            f"progress_regex {text!r} could take very long on some lines and freeze Blender: "
            f"{risk}"
        )
    return pattern


# --- the catastrophic-backtracking check --------------------------------------------
#
# Works on the parse tree of Python's own regex parser (re._parser; sre_parse before
# 3.11), which is internal: if it ever changes shape, the check lets the pattern
# through, and the window and the time guard still apply.

def _sre(new: str, old: str) -> Any:
    try:
        return importlib.import_module(new)
    except ImportError:  # pragma: no cover - Python 3.10 (Blender 3.4 to 4.0)
        return importlib.import_module(old)


_sre_parse = _sre("re._parser", "sre_parse")
_sre_consts = _sre("re._constants", "sre_constants")
_NONE = object()


def _op(name: str) -> Any:
    return getattr(_sre_consts, name, _NONE)


_LITERAL, _NOT_LITERAL, _ANY, _IN = _op("LITERAL"), _op("NOT_LITERAL"), _op("ANY"), _op("IN")
_RANGE, _NEGATE, _CATEGORY = _op("RANGE"), _op("NEGATE"), _op("CATEGORY")
_MAX_REPEAT, _MIN_REPEAT, _POSSESSIVE = _op("MAX_REPEAT"), _op("MIN_REPEAT"), _op("POSSESSIVE_REPEAT")
_SUBPATTERN, _BRANCH, _ATOMIC = _op("SUBPATTERN"), _op("BRANCH"), _op("ATOMIC_GROUP")
_ASSERT, _ASSERT_NOT, _GROUPREF_EXISTS = _op("ASSERT"), _op("ASSERT_NOT"), _op("GROUPREF_EXISTS")
_AT = _op("AT")
_AT_START = (_op("AT_BEGINNING"), _op("AT_BEGINNING_STRING"))
_REPEATS = (_MAX_REPEAT, _MIN_REPEAT, _POSSESSIVE)
_MANY = 64  # a repeat with more than this many tries counts as unbounded
_SAMPLES = "\u00a0\u00e9\u00df\u03a9\u0663\u4e2d\u2588"  # a few non-ASCII kinds of character


class _Risky(Exception):
    """Why a pattern may backtrack catastrophically."""


class _RiskCheck:
    """The two shapes that make a backtracking matcher exponential or polynomial in
    the line's length: a repeat of something that itself repeats (or alternates),
    and two unbounded repeats in a row that can match the same character (with only
    characters they can both match in between)."""

    def __init__(self, parsed: Any) -> None:
        flags = getattr(getattr(parsed, "state", None), "flags", 0) or 0
        self.icase = bool(flags & re.IGNORECASE)
        named: set[str] = set()
        self._collect(list(parsed), named)
        # Enough kinds of character to tell sets apart, bounded for a hostile pattern.
        chars = {chr(i) for i in range(128)} | set(_SAMPLES) | set(sorted(named)[:512])
        self.alphabet = frozenset(chars)

    def _collect(self, items: Any, into: set[str]) -> None:
        """Every character the pattern names, so a set made of them is not empty."""
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int):
                if item[0] is _LITERAL or item[0] is _NOT_LITERAL:
                    into.update(self._case(chr(item[1])))
            elif isinstance(item, tuple) and len(item) == 2 and item[0] is _RANGE:
                into.update(self._case(chr(item[1][0])) | self._case(chr(item[1][1])))
            if isinstance(item, (tuple, list)) or hasattr(item, "data"):
                self._collect(list(getattr(item, "data", item)), into)

    def _case(self, ch: str) -> set[str]:
        return {ch, ch.lower(), ch.upper(), ch.swapcase()} if self.icase else {ch}

    def chars(self, op: Any, av: Any) -> Optional[frozenset[str]]:
        """The characters one single-character item matches; None for anything else."""
        if op is _LITERAL:
            return frozenset(self._case(chr(av)))
        if op is _NOT_LITERAL:
            return self.alphabet - self._case(chr(av))
        if op is _ANY:
            return self.alphabet
        if op is _IN:
            negate, found = False, set()
            for kind, value in av:
                if kind is _NEGATE:
                    negate = True
                elif kind is _LITERAL:
                    found |= self._case(chr(value))
                elif kind is _RANGE:
                    lo, hi = value
                    found |= {c for c in self.alphabet
                              if any(lo <= ord(x) <= hi for x in self._case(c))}
                elif kind is _CATEGORY:
                    found |= {c for c in self.alphabet if _in_category(str(value), c)}
                else:
                    found |= self.alphabet
            return self.alphabet - found if negate else frozenset(found)
        return None

    def union(self, items: Any) -> frozenset[str]:
        """Every character a sub-pattern may match (a generous guess)."""
        found: set[str] = set()
        for op, av in items:
            single = self.chars(op, av)
            if single is not None:
                found |= single
            elif op in _REPEATS:
                found |= self.union(av[2])
            elif op is _SUBPATTERN:
                found |= self.union(av[-1])
            elif op is _ATOMIC:
                found |= self.union(av)
            elif op is _BRANCH:
                for alt in av[1]:
                    found |= self.union(alt)
            elif op is _GROUPREF_EXISTS:
                for alt in av[1:]:
                    if alt is not None:
                        found |= self.union(alt)
        return frozenset(found)

    def nested(self, items: Any, outer: bool) -> None:
        for op, av in items:
            if op in _REPEATS:
                lo, hi, body = av
                if outer and hi > 1:
                    raise _Risky(
                        "a repeated part inside another repeated part (like '(a+)+') can be "
                        "split in exponentially many ways; repeat a plain character set instead, "
                        "or make the inner part atomic ('(?>...)') or possessive ('a++')"
                    )
                self.nested(body, outer or (hi > 1 and op is not _POSSESSIVE))
            elif op is _BRANCH:
                if outer and len(av[1]) > 1:
                    raise _Risky(
                        "an alternation inside a repeated part (like '(a|ab)+') can be tried "
                        "in exponentially many ways; use a character set ('[ab]+') instead"
                    )
                for alt in av[1]:
                    self.nested(alt, outer)
            elif op is _SUBPATTERN:
                self.nested(av[-1], outer)
            elif op is _ATOMIC:
                self.nested(av, False)
            elif op is _ASSERT or op is _ASSERT_NOT:
                self.nested(av[1], outer)
            elif op is _GROUPREF_EXISTS:
                for alt in av[1:]:
                    if alt is not None:
                        self.nested(alt, outer)

    def sequence(self, items: Any, run: list[frozenset[str]]) -> list[frozenset[str]]:
        """Walk ``items`` in order. ``run``: for each unbounded repeat that can still
        reach the current position, the characters it could go on matching."""
        for op, av in items:
            run = self._step(op, av, run)
        return run

    def _step(self, op: Any, av: Any, run: list[frozenset[str]]) -> list[frozenset[str]]:
        single = self.chars(op, av)
        if single is not None:  # one character that must be there
            return _narrow(run, single)
        if op in _REPEATS:
            lo, hi, body = av
            if len(body) == 1 and self.chars(*body[0]) is not None:
                reach = self.chars(*body[0])
                assert reach is not None
            else:
                self.sequence(body, [])  # its own inside, once
                reach = self.union(body)
            if hi > _MANY:
                # A character that this repeat and two of the open ones can all match:
                # a line of it is split three ways, which is cubic in its length.
                if any(sum(1 for r in run if c in r) >= 2 for c in reach):
                    raise _Risky(
                        "repeated parts in a row can match the same text (like '.*\\d+' or "
                        "'.*.*'), so a long line is tried in polynomially many ways; the regex is "
                        "searched anywhere in a line, so a leading '.*' is not needed (or make a "
                        "part possessive, '.*+', or atomic, '(?>...)')"
                    )
                after = _narrow(run, reach) if lo >= 1 else list(run)
                return after if op is _POSSESSIVE else after + [reach]
            inner = self.sequence(body, list(run))
            return inner if lo >= 1 else _merge(run, inner)
        if op is _SUBPATTERN:
            return self.sequence(av[-1], run)
        if op is _ATOMIC:
            self.sequence(av, run)
            return run
        if op is _BRANCH:
            out: list[frozenset[str]] = []
            for alt in av[1]:
                out = _merge(out, self.sequence(alt, list(run)))
            return out
        if op is _GROUPREF_EXISTS:
            out = []
            for alt in av[1:]:
                out = _merge(out, self.sequence(alt, list(run)) if alt is not None else run)
            return out
        if op is _ASSERT or op is _ASSERT_NOT:
            self.sequence(av[1], [])
        return run  # anchors, lookarounds, back-references: no characters of their own


def _narrow(run: list[frozenset[str]], chars: frozenset[str]) -> list[frozenset[str]]:
    return [r & chars for r in run if r & chars]


def _merge(a: list[frozenset[str]], b: list[frozenset[str]]) -> list[frozenset[str]]:
    return a + [r for r in b if r not in a]


def _in_category(name: str, ch: str) -> bool:
    negate = "NOT_" in name
    if "DIGIT" in name:
        yes = ch.isdecimal()
    elif "SPACE" in name:
        yes = ch.isspace()
    elif "WORD" in name:
        yes = ch.isalnum() or ch == "_"
    elif "LINEBREAK" in name:
        yes = ch == "\n"
    else:
        return True
    return yes != negate


def regex_risk(text: str) -> Optional[str]:
    """Why the regex ``text`` may backtrack catastrophically on a long line, or None.

    Refuses the two known shapes (see ``_RiskCheck``); it errs on the safe side, so a
    few harmless patterns (``(\\d+,)+``) are refused too, with a way around it.
    """
    try:
        parsed = _sre_parse.parse(text)
        check = _RiskCheck(parsed)
        check.nested(list(parsed), False)
        items = list(parsed)
        # The search itself tries every start: it is one more open repeat, unless
        # the pattern is anchored at the start of the line.
        anchored = bool(items) and items[0][0] is _AT and items[0][1] in _AT_START
        check.sequence(items, [] if anchored else [check.alphabet])
    except _Risky as exc:
        return str(exc)
    except RecursionError:
        return "it is nested too deeply to check"
    except Exception:  # the parser's internals changed shape: the runtime guards remain
        return None
    return None


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


class _Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


class LogFile:
    """``output.log``, capped: past ``max_bytes`` it becomes ``output.log.1`` (the
    older one is replaced) and a new one begins. ``write`` raises ``OSError`` when
    the disk does; the caller decides what that means (``_Output`` stops writing)."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, *, append: bool = False) -> None:
        self.path = path
        self.max_bytes = max(1, int(max_bytes))
        self.rotations = 0
        self._file: Optional[IO[bytes]] = open(path, "ab" if append else "wb", buffering=0)
        try:
            self._size = os.fstat(self._file.fileno()).st_size if append else 0
        except (OSError, AttributeError, ValueError):
            self._size = 0

    @property
    def old_path(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._size and self._size + len(view) > self.max_bytes:
                self._rotate()
            piece = view[: max(1, self.max_bytes - self._size)]
            self._write_all(piece)
            view = view[len(piece):]

    def _write_all(self, piece: memoryview) -> None:
        if self._file is None:
            raise OSError(f"{self.path} is closed")
        while piece:
            n = self._file.write(piece)
            if not n:  # a raw write that wrote nothing and raised nothing
                raise OSError(f"could not write to {self.path}")
            self._size += n
            piece = piece[n:]

    def _rotate(self) -> None:
        old, self._file = self._file, None
        if old is not None:
            old.close()
        os.replace(self.path, self.old_path)
        self._file = open(self.path, "wb", buffering=0)
        self._size = 0
        self.rotations += 1

    def close(self) -> None:
        old, self._file = self._file, None
        if old is not None:
            old.close()


class _Output:
    """Where both reader threads put what they read: the log file, the last line,
    the last progress match and the tail of stderr. Memory stays bounded whatever
    the program prints, and nothing here raises for what happens to the log: a
    failed write is counted and the log is given up, the reading goes on."""

    def __init__(
        self,
        log: _Sink,
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
        self.log_error: Optional[str] = None  # why the log was given up, if it was
        self.log_failures = 0  # writes that failed (one: none is tried after it)
        self.log_dropped = 0  # bytes not written to the log
        self.warnings: list[str] = []  # for the person watching the job; each said once
        self.feed_errors = 0  # chunks a bug kept from being taken in (read all the same)

    def write_log(self, data: bytes) -> None:
        """Append to the log unless it was given up; never raises."""
        if self.log_error is not None:
            self.log_dropped += len(data)
            return
        try:
            self._log.write(data)
        except (OSError, ValueError) as exc:
            self.log_failures += 1
            self.log_dropped += len(data)
            self.log_error = _os_error_text(exc)
            self._warn(f"output.log could not be written ({self.log_error}): "
                       "the rest of the output is not logged")

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            self.version += 1

    def feed(self, stream: str, chunk: bytes) -> None:
        with self._lock:
            data = self._partial[stream] + chunk
            seen = self._seen[stream]  # bytes at the start of data already passed on as lines
            cut = data.rfind(b"\n") + 1
            if len(data) - cut > _MAX_PARTIAL:
                cut = len(data)
            if cut:
                # Whole lines only, so the two streams interleave line by line.
                self.write_log(data[:cut])
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
                self.write_log(rest + b"\n")
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
            if self._pattern is None:
                break

    def _match(self, text: str) -> Optional[float]:
        if self._pattern is None:
            return None
        # The regex holds the interpreter lock while it runs: it only ever sees the end
        # of a line, and one that is slow even so is not used again.
        started = time.perf_counter()
        m = self._pattern.search(text[-REGEX_WINDOW:])
        took = time.perf_counter() - started
        if took > REGEX_SLOW_S:
            self._pattern = None
            self._warn(f"progress_regex took {took:.2f} s on one line of output: "
                       "progress from the output is off for the rest of this run")
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
        except (ValueError, OverflowError):
            return None
        return None

    def snapshot(self) -> tuple[int, Optional[float], Optional[str]]:
        with self._lock:
            return self.version, self.fraction, self.last_line

    def log_note(self) -> str:
        """A few words on the log's state, for an error message ('' if it is whole)."""
        if self.log_error is None:
            return ""
        return f" (incomplete: {self.log_error}; {self.log_dropped} bytes not logged)"


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} [errno {exc.errno}]" if exc.errno else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _read(pipe: IO[bytes], stream: str, output: _Output) -> None:
    """Drain ``pipe`` into ``output`` until the other end closes. Whatever happens to
    the log or the parsing, the reading goes on: a reader that stopped would leave
    the program blocked on a full pipe for ever."""
    read = getattr(pipe, "read1", pipe.read)
    try:
        while True:
            try:
                chunk = read(_CHUNK)
            except (OSError, ValueError):  # the pipe was closed under us: stop reading
                break
            if not chunk:
                break
            try:
                output.feed(stream, chunk)
            except Exception:  # noqa: BLE001 - a bug here must not block the program
                output.feed_errors += 1
    finally:
        try:
            output.close(stream)
        except Exception:  # noqa: BLE001
            pass


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


def new_marker(job_id: str) -> str:
    """A value for ``MARKER_ENV`` that only this run of the job carries."""
    return f"{job_id}:{secrets.token_hex(8)}"


def marked_processes(marker: str, since: Optional[float] = None) -> list[psutil.Process]:
    """The processes whose environment carries ``MARKER_ENV=marker``: what a job's
    program started, even after it left the process tree and the process group
    (a daemon that double-forked into a new session).

    ``since`` (a ``time.time()``): skip the processes created before it, which
    cannot be the job's (and whose environment need not be read). Processes whose
    environment cannot be read (another user's) are skipped: they are never
    stopped. Never this process itself.
    """
    if not marker:
        return []
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if p.pid == me:
                continue
            created = p.info.get("create_time")
            if since is not None and isinstance(created, float) and created < since:
                continue
            if p.environ().get(MARKER_ENV) == marker:
                found.append(p)
        except (psutil.Error, OSError):
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


def stop_tree(
    proc: subprocess.Popen[bytes],
    grace_s: float,
    also: Optional[Callable[[], list[psutil.Process]]] = None,
) -> int:
    """Terminate ``proc`` and every process it started, wait up to ``grace_s``, then
    kill what is left. ``also()`` finds more processes that belong to it (those
    that carry its marker). Reaps ``proc``, so no zombie of ours remains. Returns
    how many processes were asked to stop."""

    def find() -> list[psutil.Process]:
        found = {p.pid: p for p in _tree(proc)}
        for p in also() if also is not None else ():
            found.setdefault(p.pid, p)
        return list(found.values())

    procs = find()
    _signal(procs, kill=False)
    alive = _wait_gone(procs, grace_s)
    # A process forked during the grace period is caught here too.
    late = [p for p in find() if p.pid not in {q.pid for q in procs}]
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
    strays: int = 0  # processes it left behind that were stopped after it exited
    warnings: list[str] = field(default_factory=list)


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
    log_max_bytes: int = LOG_MAX_BYTES,
    marker: Optional[str] = None,
) -> Watched:
    """Run ``argv`` in its own session and watch it until it exits, the job is
    cancelled or ``timeout_s`` passes; then stop what is left of its tree, and every
    process that carries its ``MARKER_ENV`` (``marker``, by default a new one).

    Output goes to ``output.log`` in the job's workdir (appended to on later
    attempts; rotated past ``log_max_bytes``). ``on_line(stream, line)`` sees every
    non-empty line, in order, on a reader thread: keep it cheap. ``publish(output)``
    runs on the job's thread every ``POLL_S`` while the output changes; by default
    the latest line and the ``pattern``'s fraction become the job's progress, with
    ``output.warnings`` (a log that could not be written, a regex turned off) in the
    stage and the message. ``on_start(pid)`` runs once the process exists (to record
    it, say, in a checkpoint). Never raises for the program's own failure (the caller
    decides what an exit code means), nor for a log that cannot be written.
    """
    log_path = ctx.workdir / LOG_NAME
    marker = marker or new_marker(ctx.job_id)
    extra: dict[str, Any] = {}
    if _POSIX:
        extra["start_new_session"] = True
    else:  # pragma: no cover - Windows
        extra["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    ctx.raise_if_cancelled()
    again = ctx.attempt > 1 or ctx.resume_from is not None  # keep the earlier output
    log = LogFile(log_path, log_max_bytes, append=again)
    output = _Output(log, pattern, on_line)
    if again:
        how = "resumed" if ctx.resume_from is not None else "started"
        output.write_log(f"--- attempt {ctx.attempt} {how} ---\n".encode())
    # Anything created from now on may be the job's (create times are coarse).
    since = time.time() - 1.0
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            executable=executable,
            cwd=cwd,
            env={**os.environ, **(env or {}), MARKER_ENV: marker},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **extra,
        )
    except BaseException:
        _close_log(log, output)
        raise
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
    deadline = None if timeout_s is None else started + timeout_s
    published = 0
    warned = 0
    stop: Optional[str] = None
    strays = 0

    def _pass_on() -> None:
        nonlocal published, warned
        version = output.version
        if version == published:
            return
        published = version
        fresh = output.warnings[warned:]
        warned += len(fresh)
        for text in fresh:
            ctx.log.warning("process output: " + text, pid=proc.pid)
        if publish is not None:
            publish(output)
            return
        _, fraction, line = output.snapshot()
        if output.warnings:
            line = f"{line or ''} (WARNING: {'; '.join(output.warnings)})".strip()
        ctx.progress(fraction, stage="running (with warnings)" if fresh else None, message=line)

    def _marked() -> list[psutil.Process]:
        return marked_processes(marker, since)

    try:
        if on_start is not None:
            on_start(proc.pid)
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
            stop_tree(proc, grace_s, also=_marked)
        # What the program left running (in its group, or escaped into a session of
        # its own but still carrying the marker) belongs to this job: stop it too.
        for _ in range(_STRAY_ROUNDS):
            left = _living([*group_members(proc.pid), *_marked()])
            if not left:
                break
            strays += len(left)
            ctx.log.warning("process left processes behind; stopping them", pid=proc.pid,
                            left=[p.pid for p in left])
            stop_processes(left, grace_s)
        for t, pipe in zip(readers, (proc.stdout, proc.stderr), strict=True):
            t.join(timeout=2.0)
            if t.is_alive():
                # Only a process that escaped both its group and the marker can still
                # hold the pipe. Closing it now would block on the reader's lock: leave
                # the (daemon) reader to end when that process does.
                ctx.log.warning("output pipe still open after the process tree ended",
                                reader=t.name)
                continue
            try:
                pipe.close()
            except OSError:
                pass
        _close_log(log, output)
    duration = time.monotonic() - started
    _pass_on()
    code = proc.wait()  # reaped already: returns the exit code at once
    return Watched(code, stop, proc.pid, output, log_path, duration, strays, list(output.warnings))


def _close_log(log: LogFile, output: _Output) -> None:
    try:
        log.close()
    except OSError as exc:  # a delayed write error (NFS, a full disk) shows here
        if output.log_error is None:
            output.log_failures += 1
            output.log_error = _os_error_text(exc)
            output.warnings.append(f"output.log could not be written ({output.log_error})")


def run_process(ctx: JobContext, params: ProcessRun) -> dict:
    """Run a program (argv list) with a cwd, env additions and a timeout; log its output."""
    ctx.progress(0.0, stage="starting", message=" ".join(params.argv)[:MESSAGE_MAX_CHARS])
    executable = resolve_executable(params.argv[0], params.cwd, params.env)
    pattern = progress_pattern(params.progress_regex) if params.progress_regex else None
    ctx.progress(None, stage="running")
    done = watch(
        ctx, params.argv, executable=executable, cwd=params.cwd, env=params.env,
        timeout_s=params.timeout_s, grace_s=params.grace_s, pattern=pattern,
        log_max_bytes=params.log_max_bytes,
    )
    log = f"{done.log_path}{done.output.log_note()}"
    if done.stop == "cancel":
        raise JobCancelled(
            f"process {params.argv[0]!r} (pid {done.pid}) was stopped: job cancelled"
        )
    if done.stop == "timeout":
        raise ProcessTimeout(
            f"process {params.argv[0]!r} timed out after {params.timeout_s:g} s (timeout_s); "
            f"its process tree was stopped. Log: {log}"
        )
    if done.code != 0:
        raise ProcessFailed(
            failure_message(params.argv[0], done.code, done.output, done.log_path), done.code
        )
    ctx.log.info("process finished", pid=done.pid, duration_s=round(done.duration_s, 3))
    result: dict[str, Any] = {
        "exit_code": done.code, "log": str(done.log_path), "duration_s": round(done.duration_s, 3),
    }
    if done.warnings:
        result["warnings"] = done.warnings
        ctx.progress(None, message="finished, WARNING: " + "; ".join(done.warnings))
    if done.output.log_error is not None:
        result["log_error"] = done.output.log_error
    return result


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
    return f"{text}\nLog: {log_path}{output.log_note()}"


# --- what a job will do, for the release dialog -------------------------------------


def validation_problem(model: type[BaseModel], params: Any) -> Optional[str]:
    """Why ``params`` do not validate against ``model`` (a few words), or None."""
    try:
        model.model_validate(params)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ())) or "params"
            parts.append(f"{where}: {str(err.get('msg'))[:300]}")
        return "; ".join(parts)
    except Exception as exc:  # noqa: BLE001 - an OSError from a path check, say
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def show(value: Any) -> str:
    """A param value as the dialog shows it: in full, with its escapes visible."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def seconds(value: Any) -> str:
    """A number of seconds as the dialog shows it (600, not 600.0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return show(value)


def describe_program(program: Any, cwd: Optional[str], env: dict[str, str]) -> list[str]:
    """How ``program`` (argv[0]) resolves, exactly as the job will resolve it."""
    lines = []
    if not isinstance(program, str) or not program:
        return [f"program: {show(program)} is not a program name (the job would be refused)"]
    is_path = os.sep in program or bool(os.altsep and os.altsep in program)
    if not is_path and "PATH" in env:
        search = env["PATH"]
        lines.append(
            "WARNING: env sets PATH: the program is looked up in "
            f"{show(search.split(os.pathsep))}, not in Blender's PATH"
        )
        relative = [d for d in search.split(os.pathsep) if d and not os.path.isabs(d)]
        if relative:
            lines.append(f"WARNING: that PATH has relative folders {show(relative)}: they are "
                         f"taken from Blender's current folder ({os.getcwd()})")
    try:
        resolved = resolve_executable(program, cwd, env)
    except (ValueError, OSError) as exc:
        lines.append(f"runs the program {show(program)}: cannot be found now ({exc})")
        return lines
    if is_path:
        how = "a path" + (f", relative to the cwd" if not os.path.isabs(program) else "")
    else:
        how = "looked up on " + ("the PATH that env sets" if "PATH" in env else "Blender's PATH")
    lines.append(f"runs the program {resolved} (argv[0] {show(program)}, {how})")
    return lines


def describe_env(env: Any, marker_note: bool = True) -> list[str]:
    """The environment changes, one a line, those that change what code runs flagged."""
    if not isinstance(env, dict):
        return [f"env: {show(env)} is not a mapping (the job would be refused)"]
    lines = ["environment: Blender's own" + (", plus:" if env else ", unchanged")]
    for name, value in sorted(env.items(), key=lambda kv: str(kv[0])):
        flag = ""
        if str(name).upper() in _CODE_VARS or str(name).upper().startswith(("LD_", "DYLD_")):
            flag = "  (WARNING: changes which code runs)"
        lines.append(f"  sets {name} = {show(value)}{flag}")
    if marker_note:
        lines.append(f"  sets {MARKER_ENV} = <job id>:<random> (marks the job's processes, "
                     "so that all of them are stopped)")
    return lines


def describe(params: dict) -> list[str]:
    """What a ``process.run`` job with these (JSON) params will do, in full: the
    program as it resolves now, every argument, the folder, every environment
    change, the files the job writes, the timeout. Never raises, whatever the params
    (a hostile file's may not even validate: that is said first)."""
    p = params if isinstance(params, dict) else {}
    lines: list[str] = []
    problem = validation_problem(ProcessRun, p)
    if problem is not None:
        lines.append(f"WARNING: these params do not validate, the job would fail: {problem}")
    argv = p.get("argv")
    cwd = p.get("cwd") if isinstance(p.get("cwd"), str) else None
    env = p.get("env", {})
    env_ok = {str(k): v for k, v in env.items() if isinstance(v, str)} if isinstance(env, dict) else {}
    if isinstance(argv, list) and argv:
        lines += describe_program(argv[0], cwd, env_ok)
        lines.append(f"with {len(argv)} argument{'s' if len(argv) != 1 else ''} (argv, in full):")
        lines += [f"  argv[{i}] = {show(arg)}" for i, arg in enumerate(argv)]
    elif isinstance(argv, str):
        lines.append(f"argv is one string, not a list (refused: never run through a shell): {show(argv)}")
    else:
        lines.append(f"argv: {show(argv)} (no program: the job would be refused)")
    if p.get("cwd") is None:
        lines.append(f"in Blender's current folder ({os.getcwd()}): cwd is not set")
    else:
        lines.append(f"in the folder {show(p.get('cwd'))}")
    lines += describe_env(env)
    cap = p.get("log_max_bytes", LOG_MAX_BYTES)
    cap_text = f"{cap / 2**20:g} MiB" if isinstance(cap, (int, float)) else show(cap)
    lines.append(f"writes its output to {LOG_NAME} in the job's own folder (at most {cap_text}, "
                 f"one older {LOG_NAME}.1 kept)")
    lines.append("the program itself can read and write any file you can")
    timeout = p.get("timeout_s")
    if timeout is None:
        lines.append("no timeout of its own: runs until it exits or is cancelled")
    else:
        lines.append(f"stopped after {seconds(timeout)} s (timeout_s), with its whole process tree")
    if p.get("progress_regex") is not None:
        lines.append(f"reads progress from its output with the regex {show(p.get('progress_regex'))}")
    known = set(ProcessRun.model_fields)
    for name in sorted(str(k) for k in p if k not in known):
        lines.append(f"unknown param {name} = {show(p.get(name))}")
    return lines


# One spec for the shared registry (importing this module registers the kind there)
# and for any other registry a test or a bench passes to register().
SPEC = KindSpec(
    name=KIND,
    handler=run_process,
    params=ProcessRun,
    out_of_process=True,
    description=(run_process.__doc__ or "").strip().splitlines()[0],
    describe=describe,
)
shared_registry.register(SPEC)


def register(registry: KindRegistry) -> KindSpec:
    """Add the kind to ``registry`` (importing this module already added it to the
    shared one)."""
    return registry.register(SPEC)
