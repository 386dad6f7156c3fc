"""Dependencies: which queued jobs wait on which, and whether a new edge may exist.

Owns: the reverse index of unmet edges (a prerequisite's id -> the queued jobs
that wait on it), so that a job that ends wakes or fails only its own
dependents, never a scan of the queue; the rules of a submission's edges
(``plan_links``: batch-local ``@name`` references, unknown ids, prerequisites
that can never complete, cycles), and finding the adopted jobs that could never
run (``stuck``: a cycle in a hostile file).

An edge is met when its prerequisite completed: its result is then in the
dependent's ``inputs``. A job with unmet edges (``JobRecord.waiting``) keeps
its place in the queue's order but is not in a ready heap. Index entries are
not removed early: an entry whose job left the queue (cancelled, failed) is
stale, recognised by the job no longer waiting on that id, and dropped when
its prerequisite ends.

Must not touch: job states, the scheduler, events or the lock. The engine,
under its lock, asks who waited on a job that ended and applies the answer
(ready, or failed with ``DependencyFailed``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

from .errors import InvalidParams
from .models import JobState
from .record import JobRecord
from .submission import BATCH_REF

_COMPLETED = JobState.COMPLETED


class Link(NamedTuple):
    """The edges of one job about to be queued."""

    depends_on: tuple[str, ...]  # prerequisite ids, in the order given
    waiting: dict[str, None]  # those not completed yet
    inputs: dict[str, Any]  # results of those completed, by id


class Dependencies:
    """The reverse index of unmet edges. All methods run under the engine's lock."""

    __slots__ = ("_waiting_on",)

    def __init__(self) -> None:
        self._waiting_on: dict[str, list[JobRecord]] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._waiting_on

    def __len__(self) -> int:
        return len(self._waiting_on)

    def add(self, job: JobRecord) -> None:
        """Index ``job`` under every prerequisite in its ``waiting``."""
        index = self._waiting_on
        for pid in job.waiting or ():
            waiters = index.get(pid)
            if waiters is None:
                index[pid] = [job]
            else:
                waiters.append(job)

    def take(self, job_id: str) -> list[JobRecord]:
        """The queued jobs that still wait on ``job_id`` (which just ended), removed."""
        waiters = self._waiting_on.pop(job_id, None)
        if not waiters:
            return []
        return [j for j in waiters if j.in_queue and (w := j.waiting) is not None and job_id in w]

    def take_closure(self, job_id: str) -> list[tuple[JobRecord, str]]:
        """Every queued job that waits on ``job_id``, directly or through others, each
        with the prerequisite it was reached through, in breadth-first order; their
        index entries are removed (so that ending them cascades no further)."""
        out: list[tuple[JobRecord, str]] = []
        seen: set[int] = set()
        frontier = [job_id]
        while frontier:
            nxt: list[str] = []
            for pid in frontier:
                for job in self._waiting_on.pop(pid, ()):
                    if id(job) not in seen and _waits_on(job, pid):
                        seen.add(id(job))
                        out.append((job, pid))
                        nxt.append(job.id)
            frontier = nxt
        return out

    def closure(self, job_id: str) -> set[str]:
        """The ids ``take_closure`` would return, leaving the index as it is."""
        found: set[str] = set()
        stack = [job_id]
        while stack:
            pid = stack.pop()
            for job in self._waiting_on.get(pid, ()):
                if job.id not in found and _waits_on(job, pid):
                    found.add(job.id)
                    stack.append(job.id)
        return found


def _waits_on(job: JobRecord, pid: str) -> bool:
    waiting = job.waiting
    return job.in_queue and waiting is not None and pid in waiting


def plan_links(
    jobs: Sequence[JobRecord],
    refs: Sequence[tuple[str, ...]],
    names: Mapping[str, int],
    lookup: Callable[[str], Optional[JobRecord]],
    was_evicted: Callable[[str], bool],
    *,
    prior: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
    where: Callable[[int], str] = lambda i: "",
) -> list[Link]:
    """The edges of a batch of jobs about to be queued together, or an error.

    ``refs[i]`` holds job ids and ``"@name"`` references to ``jobs[names[name]]``.
    An edge to a completed job is met at once (its result passed along); one to a
    queued or running job waits; ``prior[i]`` holds results already passed to the
    job's earlier copy (a retry), which meet their edges whatever became of the
    prerequisite since. ``where(i)`` names job ``i`` in a message.

    Raises:
        InvalidParams: naming the ids: unknown or evicted prerequisites, ones that
        ended without completing (so the job could never run), a job that depends
        on itself, a cycle within the batch.
    """
    links: list[Link] = []
    internal: list[list[int]] = []
    none = Link((), {}, {})  # shared by the jobs without edges: plan_links' callers only read it
    for i, job in enumerate(jobs):
        if not refs[i]:
            links.append(none)
            internal.append([])
            continue
        ids: dict[str, None] = {}
        waiting: dict[str, None] = {}
        inputs: dict[str, Any] = {}
        edges: list[int] = []
        unknown: list[str] = []
        earlier = prior[i] if prior is not None else None
        for ref in refs[i]:
            if ref.startswith(BATCH_REF):
                k = names.get(ref[1:])
                if k is None:
                    known = ", ".join(BATCH_REF + n for n in names) or "none"
                    raise InvalidParams(
                        f"{where(i)}depends_on: {ref!r} names no job of this batch (names: {known})"[:400]
                    )
                pid = jobs[k].id
                if pid in ids:
                    continue
                ids[pid] = None
                if k == i:
                    raise InvalidParams(f"{where(i)}depends_on: {ref!r} is this job itself (a cycle)")
                waiting[pid] = None
                edges.append(k)
                continue
            pid = ref
            if pid in ids:
                continue
            ids[pid] = None
            if pid == job.id:
                raise InvalidParams(f"{where(i)}depends_on: job {pid!r} is this job itself (a cycle)")
            if earlier is not None and pid in earlier:
                inputs[pid] = earlier[pid]
                continue
            pre = lookup(pid)
            if pre is None:
                unknown.append(pid)
            elif pre.state is _COMPLETED:
                inputs[pid] = pre.result
            elif pre.state.is_terminal:
                raise InvalidParams(
                    f"{where(i)}depends_on: job {pid!r} ended {pre.state.value}, so this job "
                    f"could never run; retry {pid!r} first (retry(..., with_dependents=True) "
                    "re-queues the jobs that failed with it)"
                )
            else:
                waiting[pid] = None
        if unknown:
            gone = [p for p in unknown if was_evicted(p)]
            never = [p for p in unknown if p not in gone]
            parts = []
            if never:
                parts.append("unknown job id(s) " + ", ".join(map(repr, never[:20])))
            if gone:
                parts.append("job(s) " + ", ".join(map(repr, gone[:20]))
                             + " finished and were evicted from history (their results are gone)")
            raise InvalidParams(f"{where(i)}depends_on: " + "; ".join(parts))
        links.append(Link(tuple(ids), waiting, inputs))
        internal.append(edges)
    cycle = find_cycle(internal)
    if cycle is not None:
        raise InvalidParams("depends_on: a dependency cycle: "
                            + " -> ".join(where(k).rstrip(": ") or str(k) for k in cycle))
    return links


def find_cycle(edges: Sequence[Sequence[int]]) -> Optional[list[int]]:
    """A cycle in the graph ``i -> edges[i]`` as ``[a, b, ..., a]``, or None.
    Iterative (a chain of thousands of jobs must not hit the recursion limit)."""
    white, grey, black = 0, 1, 2
    colour = [white] * len(edges)
    for start in range(len(edges)):
        if colour[start] != white:
            continue
        path = [start]
        its = [iter(edges[start])]
        colour[start] = grey
        while its:
            nxt = next(its[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                its.pop()
            elif colour[nxt] == grey:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                its.append(iter(edges[nxt]))
    return None


def stuck(jobs: Iterable[JobRecord]) -> list[JobRecord]:
    """Of queued jobs with unmet edges, those that could never run: in a cycle, or
    waiting on one (only a hand-made or hostile file holds such a graph)."""
    waiting = {job.id: job for job in jobs if job.waiting}
    pending = {jid: sum(1 for p in (job.waiting or ()) if p in waiting) for jid, job in waiting.items()}
    dependents: dict[str, list[str]] = {}
    for jid, job in waiting.items():
        for pid in job.waiting or ():
            if pid in waiting:
                dependents.setdefault(pid, []).append(jid)
    free = [jid for jid, n in pending.items() if n == 0]
    while free:
        jid = free.pop()
        for dep in dependents.get(jid, ()):
            pending[dep] -= 1
            if pending[dep] == 0:
                free.append(dep)
    return [waiting[jid] for jid, n in pending.items() if n > 0]
