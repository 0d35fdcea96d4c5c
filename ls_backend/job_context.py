"""What a job needs, handed to it rather than found in module globals: the in-process queue passes the server's
own objects; an RQ job rebuilds them from settings in the worker, so the two run the same code."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from model.workspace import Workspace

from .backend import Backend
from .queues import JobQueue, RQQueue
from .scheduler import Scheduler
from .settings import Settings, get_settings

_backend: Backend | None = None
_backend_lock = threading.Lock()


@dataclass
class JobContext:
    """The backend (settings, models, clients, sync state) and the scheduler that queues follow-up jobs.

    Follow-ups go through the scheduler, not straight to the queue: when Redis is briefly down they wait and are
    retried exactly like the webhook's own request."""

    backend: Backend
    scheduler: Scheduler | None  # None: a job run by hand without Redis queues no follow-up

    @property
    def settings(self) -> Settings:
        return self.backend.settings

    @property
    def queue(self) -> JobQueue | None:
        return self.scheduler.queue if self.scheduler else None

    def workspace(self, project: str) -> Workspace:
        return self.backend.workspace(project)


def get_backend() -> Backend:
    """One Backend per process, so a worker loads each model once (its forked work-horses inherit it)."""
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = Backend(get_settings())
        return _backend


def set_backend(backend: Backend | None) -> None:
    """Let the server share its Backend with jobs run by hand (and tests reset it)."""
    global _backend
    with _backend_lock:
        _backend = backend


def rq_queue(settings: Settings) -> RQQueue:
    return RQQueue(settings.model_dir, settings.redis_url, settings.queue_name, settings.job_timeout)


def context_from_settings() -> JobContext:
    """The context of an RQ job (or a job run by hand): this process's Backend and a scheduler on the RQ queue."""
    backend = get_backend()
    s = backend.settings
    return JobContext(backend, Scheduler(backend, rq_queue(s)) if s.redis_url else None)
