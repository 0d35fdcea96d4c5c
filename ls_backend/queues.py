"""Where training jobs wait: RQ over Redis when REDIS_URL is set, a thread in the server otherwise.

Both keep at most one job running and one waiting per project; a request while one waits is folded into it,
because a job reads the annotations when it starts, not when it is queued.
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

WAITING = "lsyolo:waiting:{project}"
LOCK = "lsyolo:train-lock:{project}"
LOCK_TTL = 90  # seconds; a killed worker's lock expires, a live one refreshes it


class TrainQueue(Protocol):
    kind: str

    def schedule(self, project: str) -> str: ...

    def status(self, project: str) -> dict: ...


class LocalQueue:
    """One background thread in the server runs the jobs, for a user with nothing but the server."""

    kind = "in-process"

    def __init__(self, model_dir, run: Callable[[str], object]):
        self.model_dir = model_dir
        self.run = run
        self._waiting: deque[str] = deque()
        self._running: str | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="train-worker", daemon=True)
        self._thread.start()

    def schedule(self, project: str) -> str:
        with self._cond:
            if project in self._waiting:
                return "folded"
            self._waiting.append(project)
            write_status(self.model_dir, project, state="queued", queued=time.time(), queue=self.kind)
            self._cond.notify()
            return "queued"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                project = self._running = self._waiting.popleft()
            try:
                self.run(project)
            except Exception:
                log.exception("project %s: training job failed", project)
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

    def status(self, project: str) -> dict:
        return read_status(self.model_dir, project)


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

    def _waiting_job(self, project: str):
        from rq.job import Job, JobStatus
        from rq.exceptions import NoSuchJobError

        job_id = self.redis.get(WAITING.format(project=project))
        if not job_id:
            return None
        try:
            job = Job.fetch(job_id.decode(), connection=self.redis)
        except NoSuchJobError:
            return None
        return job if job.get_status() in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED) else None

    def schedule(self, project: str) -> str:
        """Enqueue a job unless one is already waiting for the project (raises if Redis is down)."""
        with self.redis.lock(f"lsyolo:schedule:{project}", timeout=10, blocking_timeout=2):
            if self._waiting_job(project) is not None:
                return "folded"
            job = self.queue.enqueue("ls_backend.jobs.run_queued", project, job_timeout=self.job_timeout,
                                     job_id=f"train-{project}-{uuid.uuid4().hex[:8]}", result_ttl=86400,
                                     failure_ttl=7 * 86400)
            self.redis.set(WAITING.format(project=project), job.id, ex=self.job_timeout * 4)
        write_status(self.model_dir, project, state="queued", queued=time.time(), queue=self.kind, job_id=job.id)
        return "queued"

    def status(self, project: str) -> dict:
        """The job state in MODEL_DIR, corrected by RQ when a worker died without writing it."""
        status = read_status(self.model_dir, project)
        if status.get("state") == "running" and status.get("job_id"):
            from rq.job import Job, JobStatus
            from rq.exceptions import NoSuchJobError

            try:
                rq_state = Job.fetch(status["job_id"], connection=self.redis).get_status()
            except NoSuchJobError:
                rq_state = None
            except Exception:  # Redis down: report what the file says
                return status
            if rq_state in (None, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                status = {**status, "state": "failed", "error": status.get("error") or f"worker lost the job (RQ: {rq_state})"}
        return status


def hold_training_lock(redis, project: str, job_id: str) -> Callable[[], None]:
    """Block until no other job trains this project, then keep the lock alive until released."""
    lock = redis.lock(LOCK.format(project=project), timeout=LOCK_TTL, blocking=True, thread_local=False)
    lock.acquire()
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LOCK_TTL / 3):
            try:
                lock.reacquire()
            except Exception as exc:
                log.warning("project %s: could not refresh the training lock: %s", project, exc)

    threading.Thread(target=refresh, name="train-lock", daemon=True).start()

    def release() -> None:
        stop.set()
        try:
            lock.release()
        except Exception:
            pass

    return release
