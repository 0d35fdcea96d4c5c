"""Decide when a project trains, and keep asking when Redis is down so no request is lost."""
from __future__ import annotations

import logging
import threading

from .backend import Backend
from .controls import any_trained, project_trained_upto
from .job_status import pending_requests, write_status
from .queues import JobQueue

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0


class Scheduler:
    """Training policy (MIN_ANNOTATIONS, RETRAIN_EVERY) in front of whichever queue is in use."""

    def __init__(self, backend: Backend, queue: JobQueue):
        self.backend = backend
        self.queue = queue
        self.pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._retry_loop, name="schedule-retry", daemon=True).start()

    def request(self, project: str, kind: str = "train") -> str:
        """Queue a job; if the queue is unreachable, remember it and retry until Redis is back."""
        try:
            outcome = self.queue.schedule(project, kind)
        except Exception as exc:  # Redis down or refusing: the annotation is already on disk
            with self._lock:
                self.pending.add((kind, project))
            log.error("project %s: cannot queue %s (%s: %s); annotations are kept and it will be retried",
                      project, kind, type(exc).__name__, exc)
            write_status(self.backend.settings.model_dir, project, kind, state="pending",
                         error=f"queue unreachable: {exc}")
            return "pending"
        with self._lock:
            self.pending.discard((kind, project))
        return outcome

    def autolabel(self, project: str) -> str | None:
        return self.request(project, "autolabel") if self.backend.settings.autolabel_after_train else None

    def due(self, project: str) -> bool:
        """First training at MIN_ANNOTATIONS labeled tasks, then after every RETRAIN_EVERY changed ones."""
        s = self.backend.settings
        total, changed = self.backend.store(project).counts(since=project_trained_upto(self.backend, project))
        if not any_trained(self.backend, project):  # no control of the project has a version yet
            return total >= s.min_annotations
        return changed >= max(1, s.retrain_every)

    def after_annotation(self, project: str) -> str | None:
        return self.request(project) if self.due(project) else None

    def _retry_loop(self) -> None:
        while not self._stop.wait(RETRY_SECONDS):
            try:  # requests another process could not queue (a job's follow-up in an RQ work-horse that ended)
                adopted = set(pending_requests(self.backend.settings.model_dir))
            except OSError as exc:
                log.warning("cannot list waiting requests in MODEL_DIR: %s", exc)
                adopted = set()
            with self._lock:
                self.pending |= adopted
                projects = list(self.pending)
            for kind, project in projects:
                if self.request(project, kind) != "pending":
                    log.info("project %s: queue reachable again, %s queued", project, kind)

    def close(self) -> None:
        self._stop.set()
        self.queue.close()
