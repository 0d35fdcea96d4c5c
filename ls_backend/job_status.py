"""Each job's state in MODEL_DIR, one file per job, readable by every server whichever worker ran it.

One file per job, not per kind of job: queuing a job never overwrites the state of the one running, and each file
has one writer at a time (the queue that creates it, then the process that runs it).
"""
from __future__ import annotations

import functools
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

from model.registry import read_json, write_json
from model.workspace import Workspace

log = logging.getLogger(__name__)

KEEP = 20  # ended jobs of a kind kept per project
ACTIVE = ("pending", "queued", "running")


def jobs_dir(model_dir: Path, project: str) -> Path:
    return Workspace(model_dir, project).jobs


def new_job_id(kind: str, project: str) -> str:
    return f"{kind}-{project}-{uuid.uuid4().hex[:8]}"


def _pending_id(kind: str, project: str) -> str:
    return f"{kind}-{project}-pending"


def read_job(model_dir: Path, project: str, job_id: str) -> dict:
    return read_json(jobs_dir(model_dir, project) / f"{job_id}.json", {}) or {}


def update_job(model_dir: Path, project: str, job_id: str, /, **fields) -> dict:
    """Merge fields into one job's state and log a change of state."""
    job = {**read_job(model_dir, project, job_id), **fields, "job_id": job_id, "updated": time.time()}
    write_json(jobs_dir(model_dir, project) / f"{job_id}.json", job)
    if "state" in fields:
        why = fields.get("error") or fields.get("reason")
        log.info("project %s %s job %s %s%s", project, job.get("kind"), job_id, fields["state"], f": {why}" if why else "")
    return job


def create_job(model_dir: Path, project: str, kind: str, job_id: str, queue: str, **fields) -> dict:
    """A queued job; it replaces the request that waited for the queue to be reachable, if there was one."""
    folder = jobs_dir(model_dir, project)
    (folder / f"{_pending_id(kind, project)}.json").unlink(missing_ok=True)
    ended = [j for j in list_jobs(model_dir, project, kind) if j.get("state") not in ACTIVE]
    for old in ended[:-KEEP]:
        (folder / f"{old['job_id']}.json").unlink(missing_ok=True)
    return update_job(model_dir, project, job_id, kind=kind, project=str(project), queue=queue, state="queued",
                      queued=time.time(), **fields)


def job_updater(model_dir: Path, project: str, kind: str, job_id: str | None) -> Callable[..., dict]:
    """How a running job records its state; a job run outside any queue (the CLI, a test) gets a state of its own."""
    if job_id is None:
        job_id = new_job_id(kind, project)
        create_job(model_dir, project, kind, job_id, queue="direct")
    return functools.partial(update_job, model_dir, project, job_id)


def remove_job(model_dir: Path, project: str, job_id: str) -> None:
    (jobs_dir(model_dir, project) / f"{job_id}.json").unlink(missing_ok=True)


def list_jobs(model_dir: Path, project: str, kind: str | None = None) -> list[dict]:
    """The project's jobs (of one kind), oldest first."""
    folder = jobs_dir(model_dir, project)
    found = [read_json(path, {}) for path in folder.glob("*.json")] if folder.is_dir() else []
    return sorted((j for j in found if j and (kind is None or j.get("kind") == kind)),
                  key=lambda j: (j.get("queued") or j.get("updated") or 0))


def job_view(model_dir: Path, project: str, kind: str = "train") -> dict:
    """What /status shows for a kind of job: the one running (else the one waiting, else the last one) at the top
    level, the one waiting besides a running one under 'waiting', and the job before the shown one under 'previous'."""
    jobs = list_jobs(model_dir, project, kind)
    running = next((j for j in reversed(jobs) if j.get("state") == "running"), None)
    waiting = next((j for j in reversed(jobs) if j.get("state") in ("queued", "pending")), None)
    current = running or waiting or (jobs[-1] if jobs else None)
    if current is None:
        return {}
    earlier = [j for j in jobs if j is not current and j is not waiting]
    return {**current, "waiting": waiting if waiting is not current else None,
            "previous": earlier[-1] if earlier else None}


def pending_requests(model_dir: Path) -> list[tuple[str, str]]:
    """(kind, project) of every request left waiting for the queue, whichever process failed to queue it."""
    from model.workspace import projects

    found = []
    for project in projects(model_dir):
        for path in jobs_dir(model_dir, project).glob("*-pending.json"):
            job = read_json(path, {}) or {}
            if job.get("state") == "pending" and job.get("kind"):
                found.append((job["kind"], project))
    return found


def write_status(model_dir: Path, project: str, kind: str = "train", **fields) -> dict:
    """Note a request that has no job yet because the queue was unreachable; the job created later replaces it."""
    job_id = _pending_id(kind, project)
    start = {} if read_job(model_dir, project, job_id) else {"queued": time.time()}
    return update_job(model_dir, project, job_id, kind=kind, project=str(project), **start, **fields)
