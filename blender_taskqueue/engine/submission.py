"""Submission: checking what a caller asks for and building the job's record.

Owns: the rules for submit's arguments (priority, label, timeout, retries,
memory, held, the form of ``depends_on`` and ``not_before``), the keys a
``submit_many`` spec may hold (with its batch-local ``name``), the specs of a
pipeline, id lists, and the ``JobRecord`` a valid submission becomes. Every
check raises an error that names the problem; nothing here is queued, so bad
input enqueues nothing. (Whether the jobs ``depends_on`` names exist and can
still complete is a question of the queue: ``dependencies.plan_links``.)

Must not touch: the engine's lock, the queue or any state. The engine looks the
kind up (and asks the host's ``submit_check``), then calls ``build_record``
outside its lock, and enqueues under it.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any, Iterable, Optional, Union

from .errors import InvalidParams
from .kinds import KindSpec
from .models import (
    JOB_ID,
    MAX_DEPENDENCIES,
    delay_error,
    job_id_error,
    not_before_error,
    parse_priority,
    timeout_error,
)
from .record import JobRecord

PYTHON_CALL = "python.call"
SPEC_KEYS = frozenset(
    {"kind", "params", "priority", "label", "timeout", "max_retries", "memory_mb", "held",
     "depends_on", "not_before", "name"}
)
BATCH_REF = "@"  # depends_on=["@render"]: the job of this submit_many batch named "render"

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
    not_before: Any = None,
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
    at = not_before_at(not_before, created_at)
    job = JobRecord(
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
    job.not_before = at
    return job


def not_before_at(value: Any, now_wall: float) -> Optional[float]:
    """The wall-clock timestamp of a ``not_before``: a ``datetime`` (a naive one is
    local time, as ``datetime.timestamp`` takes it; one in the past means at once)
    or a number of seconds from ``now_wall``, up to a year ahead. None stays None.

    Raises:
        TypeError: neither a datetime nor a number. ValueError: out of range.
    """
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        try:
            at = value.timestamp()
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"not_before {value!r} is not a time this machine can represent: {exc}") from None
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"not_before must be a datetime or a number of seconds from now, got {value!r}")
        problem = delay_error(value)
        if problem:
            raise ValueError(problem)
        at = now_wall + float(value)
    problem = not_before_error(at, now_wall)
    if problem:
        raise ValueError(problem)
    return at


def name_error(value: object) -> Optional[str]:
    """Why ``value`` is not a valid batch-local name (a ``submit_many`` spec's ``name``)."""
    if not isinstance(value, str) or JOB_ID.fullmatch(value) is None:
        return (f"name must be 1 to 64 letters, digits, '_', '-' or '~', starting with a letter "
                f"or digit, got {value!r}"[:300])
    return None


def dependency_refs(value: Any, *, batch: bool) -> tuple[str, ...]:
    """``depends_on`` as a tuple of job ids and (in a batch) ``"@name"`` references,
    duplicates dropped, in the order given. None means none.

    Raises:
        InvalidParams: not ids, a malformed id or name, more than MAX_DEPENDENCIES,
        or an ``@name`` outside ``submit_many``.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items: list = [value]
    elif type(value) is list or type(value) is tuple:  # the usual case: no copy via islice
        items = value  # type: ignore[assignment]
        if len(items) > MAX_DEPENDENCIES:
            raise InvalidParams(f"depends_on may name at most {MAX_DEPENDENCIES} jobs")
    else:
        if isinstance(value, (dict, bytes, bytearray)):
            raise InvalidParams(f"depends_on must be a job id or a list of job ids, got {type(value).__name__}")
        try:
            items = list(itertools.islice(iter(value), MAX_DEPENDENCIES + 1))
        except TypeError:
            raise InvalidParams(f"depends_on must be a job id or a list of job ids, got {value!r}"[:300]) from None
        if len(items) > MAX_DEPENDENCIES:
            raise InvalidParams(f"depends_on may name at most {MAX_DEPENDENCIES} jobs")
    match = JOB_ID.fullmatch
    for item in items:
        if type(item) is not str:
            if not isinstance(item, str):
                raise InvalidParams(f"depends_on entries must be job ids (str), got {item!r}"[:300])
        if item[:1] == BATCH_REF:
            if not batch:
                raise InvalidParams(
                    f"depends_on: {item!r} is a reference to a job of a submit_many batch "
                    "('@name'); submit() takes job ids"[:300]
                )
            if match(item, 1) is None:
                raise InvalidParams(f"depends_on: {item!r}: {name_error(item[1:])}"[:300])
        elif match(item) is None:
            raise InvalidParams(f"depends_on: {job_id_error(item)}")
    if len(items) == 1:
        return (items[0],)
    return tuple(dict.fromkeys(items))


def spec_arguments(spec: Any) -> tuple[tuple, Optional[str], tuple[str, ...]]:
    """The submit arguments of one ``submit_many`` spec, in ``Engine._build``'s order,
    its batch-local name (or None) and its ``depends_on`` references.

    Raises:
        TypeError: not a dict, unknown keys, no kind. InvalidParams: a python.call,
        a bad name or depends_on.
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
    name = spec.get("name")
    if name is not None:
        problem = name_error(name)
        if problem:
            raise InvalidParams(problem)
    args = (
        spec["kind"],
        spec.get("params"),
        spec.get("priority", "normal"),
        spec.get("label"),
        spec.get("timeout"),
        spec.get("max_retries", 0),
        spec.get("memory_mb"),
        spec.get("held", False),
        spec.get("not_before"),
    )
    return args, name, dependency_refs(spec.get("depends_on"), batch=True)


def pipeline_specs(steps: Any, options: dict) -> list[dict]:
    """``submit_many`` specs that chain ``steps``: each runs after the previous one
    completed (and gets its result in ``ctx.inputs``). A step is a kind name,
    ``(kind, params)``, ``(kind, params, {options})`` or a spec dict; ``options``
    apply to every step, except ``depends_on``, which is the first step's.

    Raises:
        TypeError, InvalidParams: a step of another shape; no steps.
    """
    if isinstance(steps, (str, dict)) or not isinstance(steps, (list, tuple)):
        raise TypeError(f"pipeline takes a list of steps, got {type(steps).__name__}")
    if not steps:
        raise InvalidParams("a pipeline needs at least one step")
    first_deps = options.pop("depends_on", None)
    specs: list[dict] = []
    for i, step in enumerate(steps):
        if isinstance(step, str):
            spec: dict = {"kind": step}
        elif isinstance(step, dict):
            spec = dict(step)
        elif isinstance(step, tuple) and 1 <= len(step) <= 3:
            spec = {"kind": step[0]}
            if len(step) > 1:
                spec["params"] = step[1]
            if len(step) > 2:
                if not isinstance(step[2], dict):
                    raise TypeError(f"steps[{i}]: the third item must be a dict of options")
                spec.update(step[2])
        else:
            raise TypeError(f"steps[{i}]: a step is a kind, (kind, params), (kind, params, options) "
                            f"or a spec dict, got {step!r}"[:300])
        spec = {**options, **spec}
        spec.setdefault("name", f"step-{i}")
        deps = list(dependency_refs(spec.get("depends_on"), batch=True))
        if i == 0:
            deps = list(dependency_refs(first_deps, batch=False)) + deps
        else:
            deps.insert(0, BATCH_REF + specs[-1]["name"])
        spec["depends_on"] = deps
        specs.append(spec)
    return specs


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
