"""Submission: checking what a caller asks for and building the job's record.

Owns: the rules for submit's arguments (priority, label, timeout, retries,
memory, held), the keys a ``submit_many`` spec may hold, id lists, and the
``JobRecord`` a valid submission becomes. Every check raises an error that
names the problem; nothing here is queued, so bad input enqueues nothing.

Must not touch: the engine's lock, the queue or any state. The engine looks the
kind up (and asks the host's ``submit_check``), then calls ``build_record``
outside its lock, and enqueues under it.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from .errors import InvalidParams
from .kinds import KindSpec
from .models import parse_priority, timeout_error
from .record import JobRecord

PYTHON_CALL = "python.call"
SPEC_KEYS = frozenset(
    {"kind", "params", "priority", "label", "timeout", "max_retries", "memory_mb", "held"}
)

IdList = Union[str, Iterable[str], None]


def build_record(
    spec: KindSpec,
    job_id: str,
    created_at: float,
    params: Any,
    priority: Any,
    label: Any,
    timeout: Any,
    max_retries: Any,
    memory_mb: Any,
    held: Any,
    *,
    max_memory_mb: Optional[int],
) -> JobRecord:
    """A queued-to-be job from checked arguments.

    Raises:
        InvalidParams, ValueError, TypeError: naming the bad argument.
    """
    json_params = spec.validate_params(params)
    prio = parse_priority(priority)
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a str or None, got {type(label).__name__}")
    problem = timeout_error(timeout)
    if problem:
        raise ValueError(problem)
    if timeout is not None:
        timeout = float(timeout)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if memory_mb is not None:
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
            raise ValueError(f"memory_mb must be a positive int or None, got {memory_mb!r}")
        if memory_mb > 2**40:
            raise ValueError(f"memory_mb must be at most {2**40}, got {memory_mb!r}")
        if max_memory_mb is not None and memory_mb > max_memory_mb and not spec.out_of_process:
            raise ValueError(
                f"memory_mb={memory_mb} exceeds max_memory_mb={max_memory_mb}: the job could never start"
            )
    if not isinstance(held, bool):
        raise TypeError(f"held must be a bool, got {held!r}")
    return JobRecord(
        job_id,
        spec.name,
        label if label else spec.name,
        json_params,
        prio,
        created_at,
        max_retries=max_retries,
        timeout=timeout,
        memory_mb=memory_mb,
        held=held,
    )


def spec_arguments(spec: Any) -> tuple:
    """The submit arguments of one ``submit_many`` spec, in ``Engine._build``'s order.

    Raises:
        TypeError: not a dict, unknown keys, no kind. InvalidParams: a python.call.
    """
    if not isinstance(spec, dict):
        raise TypeError(f"a job spec must be a dict, got {type(spec).__name__}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise TypeError(f"unknown job spec keys {sorted(unknown)} (allowed: {sorted(SPEC_KEYS)})")
    if "kind" not in spec:
        raise TypeError("a job spec needs a 'kind'")
    if spec["kind"] == PYTHON_CALL:
        raise InvalidParams("python.call jobs are made with run(fn), not submit_many()")
    return (
        spec["kind"],
        spec.get("params"),
        spec.get("priority", "normal"),
        spec.get("label"),
        spec.get("timeout"),
        spec.get("max_retries", 0),
        spec.get("memory_mb"),
        spec.get("held", False),
    )


def id_list(ids: IdList) -> list[str]:
    """A job id or an iterable of them, as a list.

    Raises:
        TypeError: something that is not an id.
    """
    if isinstance(ids, str):
        return [ids]
    if ids is None:
        return []
    try:
        out = list(ids)
    except TypeError:
        raise TypeError(f"ids must be a job id or an iterable of job ids, got {ids!r}") from None
    for i in out:
        if not isinstance(i, str):
            raise TypeError(f"job ids must be str, got {i!r}")
    return out


def first_line(text: str) -> str:
    """The first line of an error message, cut to 200 characters (for a job's message)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:199] + "…"
