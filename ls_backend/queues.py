"""Where jobs wait: RQ over Redis when REDIS_URL is set, a thread in the server otherwise.

Both keep at most one job of a kind running and one waiting per project; a request while one waits is folded
into it, because a job reads the project's state when it starts, not when it is queued.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from typing import Callable, Protocol

from .job_status import read_status, write_status

log = logging.getLogger(__name__)

JOB_FUNCTIONS = {"train": "ls_backend.jobs.run_queued", "autolabel": "ls_backend.jobs.run_queued_autolabel"}
WAITING = "lsyolo:waiting:{kind}:{project}"
LOCK = "lsyolo:lock:{kind}:{project}"
LOCK_TTL = 90  # seconds; a killed worker's lock expires, a live one refreshes it


class JobQueue(Protocol):
    kind: str

    def schedule(self, project: str, kind: str = "train") -> str: ...

    def status(self, project: str, kind: str = "train") -> dict: ...


class LocalQueue:
    """One background thread in the server runs the jobs, for a user with nothing but the server."""

    kind = "in-process"

    def __init__(self, model_dir, runners: dict[str, Callable[[str], object]]):
        self.model_dir = model_dir
        self.runners = runners
        self._waiting: deque[tuple[str, str]] = deque()
        self._running: tuple[str, str] | None = None
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, name="job-worker", daemon=True).start()

    def schedule(self, project: str, kind: str = "train") -> str:
        with self._cond:
            if (kind, project) in self._waiting:
                return "folded"
            self._waiting.append((kind, project))
            write_status(self.model_dir, project, kind, state="queued", queued=time.time(), queue=self.kind)
            self._cond.notify()
            return "queued"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                kind, project = self._running = self._waiting.popleft()
            try:
                self.runners[kind](project)
            except Exception:
                log.exception("project %s: %s job failed", project, kind)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits; used by the CLI and tests."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._running:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    return False
        return True

    def status(self, project: str, kind: str = "train") -> dict:
        return read_status(self.model_dir, project, kind)


class RQQueue:
    """Jobs on a named RQ queue, run by `python -m ls_backend.worker` anywhere that shares Redis and MODEL_DIR."""

    kind = "rq"

    def __init__(self, model_dir, redis_url: str, queue_name: str, job_timeout: int):
        from redis import Redis
        from rq import Queue

        self.model_dir = model_dir
        self.redis = Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.queue = Queue(queue_name, connection=self.redis)
        self.job_timeout = job_timeout

    def _job_status(self, job_id: str):
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return Job.fetch(job_id, connection=self.redis).get_status()
        except NoSuchJobError:
            return None

    def schedule(self, project: str, kind: str = "train") -> str:
        """Enqueue a job unless one is already waiting for the project (raises if Redis is down)."""
        from rq.job import JobStatus

        key = WAITING.format(kind=kind, project=project)
        with self.redis.lock(f"lsyolo:schedule:{project}", timeout=10, blocking_timeout=2):
            waiting = self.redis.get(key)
            if waiting and self._job_status(waiting.decode()) in (JobStatus.QUEUED, JobStatus.DEFERRED):
                return "folded"
            job = self.queue.enqueue(JOB_FUNCTIONS[kind], project, job_timeout=self.job_timeout,
                                     job_id=f"{kind}-{project}-{uuid.uuid4().hex[:8]}", result_ttl=86400,
                                     failure_ttl=7 * 86400)
            self.redis.set(key, job.id, ex=self.job_timeout * 4)
        write_status(self.model_dir, project, kind, state="queued", queued=time.time(), queue=self.kind, job_id=job.id)
        return "queued"

    def status(self, project: str, kind: str = "train") -> dict:
        """The job state in MODEL_DIR, corrected by RQ when a worker died without writing it."""
        from rq.job import JobStatus

        status = read_status(self.model_dir, project, kind)
        if status.get("state") == "running" and status.get("job_id"):
            try:
                rq_state = self._job_status(status["job_id"])
            except Exception:  # Redis down: report what the file says
                return status
            if rq_state in (None, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                status = {**status, "state": "failed", "error": status.get("error") or f"worker lost the job (RQ: {rq_state})"}
        return status


def hold_lock(redis, kind: str, project: str) -> Callable[[], None]:
    """Block until no other job of this kind works on the project, then keep the lock alive until released."""
    lock = redis.lock(LOCK.format(kind=kind, project=project), timeout=LOCK_TTL, blocking=True, thread_local=False)
    lock.acquire()
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LOCK_TTL / 3):
            try:
                lock.reacquire()
            except Exception as exc:
                log.warning("project %s: could not refresh the %s lock: %s", project, kind, exc)

    threading.Thread(target=refresh, name=f"{kind}-lock", daemon=True).start()

    def release() -> None:
        stop.set()
        try:
            lock.release()
        except Exception:
            pass

    return release
