"""The training job: the same function runs on an RQ worker or in the server's own background thread."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from model.label_config import ConfigError, parse_label_config
from model.pipeline import NotEnoughData, run_training
from model.project_store import annotation_record
from model.trainer import TrainParams

from .backend import Backend
from .job_status import write_status
from .ls_client import LabelStudioError
from .settings import get_settings

log = logging.getLogger(__name__)

_backend: Backend | None = None
_backend_lock = threading.Lock()
_synced: set[str] = set()  # projects this process has fully resynced from Label Studio


def get_backend() -> Backend:
    """One Backend per process, so a worker loads each model once."""
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = Backend(get_settings())
        return _backend


def set_backend(backend: Backend | None) -> None:
    """Let the server share its Backend with in-process jobs (and tests reset it)."""
    global _backend
    with _backend_lock:
        _backend = backend
        _synced.clear()


def resync_flag(backend: Backend, project: str) -> Path:
    return backend.store(project).root / "resync_requested"


def latest_annotation(task: dict) -> dict | None:
    """The task's newest annotation that is a real label (cancelled ones are not)."""
    usable = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(usable, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0)) if usable else None


def resync(backend: Backend, project: str) -> int:
    """Mirror every annotation of the project from Label Studio's export, so none made while we were down is lost."""
    client = backend.client(project)
    if client is None:
        raise LabelStudioError("no Label Studio URL known for a full resync: set LABEL_STUDIO_URL")
    store = backend.store(project)
    details = client.project(project)
    if details.get("label_config"):
        store.update_info(label_config=details["label_config"])
    records = []
    for task in client.export_tasks(project):
        annotation = latest_annotation(task)
        if annotation is not None:
            records.append(annotation_record(task, annotation))
    store.replace_all(records)
    log.info("project %s: resynced %d annotated tasks from Label Studio", project, len(records))
    return len(records)


def train_project(project: str) -> dict:
    """Resync when needed, train a version, and record the outcome in the project's job state."""
    backend = get_backend()
    s = backend.settings
    started = time.time()
    write_status(s.model_dir, project, state="running", started=started, progress=None, error=None, reason=None)
    try:
        flag = resync_flag(backend, project)
        if flag.exists() or project not in _synced:
            try:
                flag.unlink(missing_ok=True)
                resync(backend, project)
                _synced.add(project)
            except LabelStudioError as exc:
                log.warning("project %s: training on stored annotations only: %s", project, exc)
        store = backend.store(project)
        control = parse_label_config(store.info().get("label_config", ""))
        fetcher = backend.fetcher(project)
        params = TrainParams(s.train_epochs, s.train_imgsz, s.train_time_budget, s.train_freeze, s.train_batch, s.device)

        def progress(epoch: int, epochs: int) -> None:
            write_status(s.model_dir, project, progress={"epoch": epoch, "epochs": epochs})

        outcome = run_training(store, backend.registry(project), control,
                               lambda record: fetcher.fetch(record["data"].get(control.value_key)),
                               backend.train_base_weights(), params, s.min_annotations, s.accept_only_if_not_worse,
                               s.keep_versions, progress)
    except (NotEnoughData, ConfigError) as exc:
        write_status(s.model_dir, project, state="skipped", reason=str(exc), finished=time.time())
        return {"state": "skipped", "reason": str(exc)}
    except Exception as exc:
        write_status(s.model_dir, project, state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise
    result = {"state": "finished", "version": outcome.version.name, "accepted": outcome.accepted,
              "reason": outcome.reason, "metrics": outcome.metrics, "seconds": round(time.time() - started, 1)}
    write_status(s.model_dir, project, **result, finished=time.time())
    return result


def run_queued(project: str) -> dict:
    """The RQ entry point: leave the waiting slot, wait for the project's lock, then train."""
    from rq import get_current_job

    from .queues import WAITING, hold_training_lock

    job = get_current_job()
    redis = job.connection
    key = WAITING.format(project=project)
    if (redis.get(key) or b"").decode() == job.id:
        redis.delete(key)
    release = hold_training_lock(redis, project, job.id)
    try:
        write_status(get_settings().model_dir, project, job_id=job.id, queue="rq")
        return train_project(project)
    finally:
        release()
