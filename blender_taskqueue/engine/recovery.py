"""Recovery: bringing back the queues of engines that died, and of .blend files.

Owns: finding and claiming the sidecars of dead or cleanly closed owners in the
state folder (``claim_orphans``: damaged ones are moved aside, never deleted),
choosing the most advanced copy of a job that stands in several documents
(``best_copies``), deciding what each adopted job becomes (``revive``: queued,
resumed from its checkpoint, held, interrupted or kept finished), and the
export document (``export_document``) that a .blend stores.

Must not touch: the engine's structures. These are functions over documents and
records; the engine calls them under its lock and puts the revived records into
its queue and history itself (``Engine._merge_documents_locked``).
"""

from __future__ import annotations

import collections
import socket
import time
from typing import Any, Callable, NamedTuple, Optional

from .cluster import REMOTE_KEY
from .kinds import KindSpec
from .models import JobState
from .record import JobRecord
from .store import (
    APP,
    CLAIM_MARK,
    SCHEMA_VERSION,
    Owner,
    SidecarError,
    SnapshotStore,
    claim_name,
    job_from_dict,
    job_to_dict,
    lock_is_held,
    lock_path_for,
    move_aside,
    read_sidecar,
    sidecar_candidates,
)
from .submission import PYTHON_CALL

_S = JobState
# How far a job got: a copy further along wins, so a job that finished anywhere
# is never queued again.
RANK = {_S.SUBMITTED: 0, _S.QUEUED: 0, _S.DISPATCHED: 1, _S.RUNNING: 2,
        _S.COMPLETED: 3, _S.FAILED: 3, _S.CANCELLED: 3, _S.INTERRUPTED: 3}


class Claimed(NamedTuple):
    documents: list[tuple[str, dict]]  # (source name, checked document)
    problems: list[str]
    moved: list[str]  # names of damaged files moved aside
    skipped: list[str]  # queue files left alone, and why


def claim_orphans(store: SnapshotStore, logger: Any) -> Claimed:
    """Claim the sidecars in the store's folder whose owners are dead or closed.

    Each is claimed by an atomic rename first, so of two engines adopting at once
    only one gets it; the claimed file is deleted once our own sidecar holds its
    jobs (``store.after_next_write``).
    """
    problems: list[str] = []
    moved: list[str] = []
    skipped: list[str] = []
    documents: list[tuple[str, dict]] = []
    for path in sidecar_candidates(store.dir, store.path):
        try:
            data = read_sidecar(path)
        except (OSError, SidecarError) as exc:
            reason = "unreadable" if isinstance(exc, OSError) else "corrupt"
            problems.append(f"{path.name}: {exc}")
            try:
                moved.append(move_aside(path, reason).name)
            except OSError as move_exc:
                problems.append(f"{path.name}: could not move it aside: {move_exc}")
            logger.error("damaged queue file moved aside", path=str(path), error=str(exc))
            continue
        owner = data["_owner"]
        if CLAIM_MARK not in path.name and not data.get("closed"):
            why, tell = _why_alive(path, owner)
            if why:
                if tell:  # a live engine's queue is normal (two Blenders); an unknown one is not
                    skipped.append(f"{path.name}: {why}")
                logger.info("queue file left alone", path=str(path), reason=why)
                continue  # a live engine's queue (or one we cannot tell): never touch it
        claimed = claim_name(path, store.owner)
        try:
            path.rename(claimed)  # atomic: of two engines adopting at once, one wins
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{path.name}: cannot claim it: {exc}")
            continue
        source = path.name.split(CLAIM_MARK, 1)[0]
        stale_tmp = path.with_name(f".{source}.tmp")  # a write its owner never finished
        try:
            stale_tmp.unlink()
        except OSError:
            pass
        try:  # its owner is gone (we took its lock to see that)
            lock_path_for(path.with_name(source)).unlink()
        except OSError:
            pass
        data["_claimed"] = claimed
        documents.append((source, data))
        store.after_next_write(claimed)
    return Claimed(documents, problems, moved, skipped)


def _why_alive(path: Any, owner: Owner) -> tuple[Optional[str], bool]:
    """Why the unclosed queue file ``path`` must be left alone (None if its owner is
    gone), and whether a person should be told (not for a plainly live engine).

    The owner's lock is the truth where there is one (the OS drops it at death);
    older files without a lock fall back to the pid and its start time, which can
    only be checked on this host."""
    held = lock_is_held(path)
    if held is True:
        return f"in use by a running engine (pid {owner.pid} on {owner.host})", False
    if held is False:
        return None, False
    if owner.host != socket.gethostname():
        return (
            f"written on host {owner.host!r} without a lock file, so whether its engine "
            "still runs cannot be told; open it on that host, or move it away", True
        )
    if owner.is_alive():
        return f"in use by a running engine (pid {owner.pid})", False
    return None, False


def best_copies(
    documents: list[tuple[str, dict]], problems: list[str], counts: collections.Counter
) -> list[tuple[str, JobRecord]]:
    """One record per job across ``documents``: its most advanced copy.

    The same job may stand in several documents (an adopter that died before
    deleting the file it claimed). Entries that do not parse are reported in
    ``problems`` and skipped; copies beyond the first count as ``duplicates``.
    """
    best: dict[tuple, tuple[str, JobRecord]] = {}
    for source, data in documents:
        for entry in data["jobs"]:
            try:
                job = job_from_dict(entry)
            except SidecarError as exc:
                problems.append(f"{source}: {exc}")
                counts["quarantined"] += 1
                data["_refused"] = True  # its file is kept (moved aside), not deleted
                continue
            ident = (job.id, job.kind, job.created_at)
            kept = best.get(ident)
            if kept is not None:
                counts["duplicates"] += 1
            if kept is None or RANK[job.state] > RANK[kept[1].state]:
                best[ident] = (source, job)
    return list(best.values())


def revive(
    job: JobRecord, spec: Optional[KindSpec], *, hold: bool, auto_resume: bool, now_wall: float
) -> str:
    """Turn an adopted record into what it is in this session; returns which count
    it adds to: "finished", "requeued", "resumed" or "interrupted". A queued result
    may be ``held`` (``hold``, auto-resume off, or a kind that is not registered).

    Unfinished jobs go back to the queue, resumable running ones from their
    checkpoint; other running jobs become interrupted (their partial result kept),
    since running them again could run their work twice.
    """
    state = job.state
    if state.is_terminal:
        return "finished"
    # A job that was running on a dask cluster is re-attached there (the cluster
    # keeps its future), never run again: it resumes like a resumable one.
    remote = isinstance(job.checkpoint, dict) and REMOTE_KEY in job.checkpoint
    resumable = spec is not None and (spec.resumable or remote)
    if job.kind != PYTHON_CALL and (state is not _S.RUNNING or resumable):
        counted = "requeued"
        if state is _S.DISPATCHED:
            job.attempt = max(0, job.attempt - 1)  # claimed, never started
        if state is _S.RUNNING:
            counted = "resumed"
            job.attempt = max(0, job.attempt - 1)  # the resume continues that attempt
            job.message = (
                "re-attaches to its run on the cluster after a crash" if remote
                else "resumes from its checkpoint after a crash"
                if job.checkpoint is not None
                else "starts again after a crash (it had no checkpoint)"
            )
        job.state = _S.QUEUED
        if spec is None:
            job.held = True
            job.message = (
                f"held: kind {job.kind!r} is not registered; enable the add-on that "
                "provides it, then release the job"
            )
        elif hold or not auto_resume:
            job.held = True
        job.ready = not job.held
        return counted
    job.state = _S.INTERRUPTED
    job.finished_at = now_wall
    if job.kind == PYTHON_CALL:
        job.message = "ad-hoc python.call jobs cannot be recovered after a crash; run it again"
    elif spec is None:
        job.message = (
            f"was running when its process ended; kind {job.kind!r} is not registered, "
            "so it cannot resume (retry it once the add-on is enabled)"
        )
    else:
        job.message = "was running when its process ended; its partial result is kept"
    return "interrupted"


def export_document(
    captured: list[tuple], owner: Owner, workdir_for: Callable[[str], Any], logger: Any = None
) -> dict:
    """The queue as a JSON-ready document of the sidecar's schema (for a .blend).
    A job that cannot be turned into JSON is left out (and logged), never raised:
    a save must not fail because of one job."""
    jobs = []
    for values in captured:
        try:
            jobs.append(job_to_dict(values, workdir_for))
        except Exception as exc:
            if logger is not None:
                logger.error("job left out of the export", job_id=repr(values[0]), error=str(exc)[:300])
    return {
        "app": APP,
        "schema_version": SCHEMA_VERSION,
        "owner": owner.as_dict(),
        "closed": True,
        "written_at": time.time(),
        "jobs": jobs,
    }
