"""Where jobs wait: RQ over Redis when REDIS_URL is set, a thread in the server otherwise.

Both keep at most one job of a kind running and one waiting per project; a request while one waits is folded
into it, because a job reads the project's state when it starts, not when it is queued. A job that died with its
process (a server restart, a killed worker) is marked interrupted and queued again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Protocol

from model import compute

from .job_status import create_job, job_view, jobs_dir, list_jobs, new_job_id, read_job, remove_job, update_job

log = logging.getLogger(__name__)

JOB_FUNCTIONS = {"train": "ls_backend.jobs.run_queued", "autolabel": "ls_backend.jobs.run_queued_autolabel"}
ON_FAILURE = "ls_backend.jobs.on_rq_failure"
WAITING = "lsyolo:waiting:{kind}:{project}"
LOCK = "lsyolo:lock:{kind}:{project}"
LOCK_TTL = 30  # seconds; a killed worker's lock expires, a live one refreshes it
MAX_ATTEMPTS = 3  # a job interrupted this often (say, killed for memory every time) is not queued again


class JobQueue(Protocol):
    kind: str
    model_dir: Path

    def schedule(self, project: str, kind: str = "train", **fields) -> str: ...

    def status(self, project: str, kind: str = "train") -> dict: ...

    def close(self) -> None: ...


def resume(queue: JobQueue, job: dict, why: str) -> None:
    """Mark a job that died with its process as interrupted and queue it again, unless that happened too often."""
    attempt = job.get("attempt", 1)
    again = attempt < MAX_ATTEMPTS
    update_job(queue.model_dir, job["project"], job["job_id"], state="interrupted", finished=time.time(),
               error=f"{why}; " + ("queued again" if again else f"not queued again after {attempt} interruptions"))
    if again:
        queue.schedule(job["project"], job["kind"], resumes=job["job_id"], attempt=attempt + 1)


class LocalQueue:
    """Background threads in the server run the jobs, for a user with nothing but the server.

    Up to `concurrency` jobs run at once, of different projects (or of different kinds); a project never runs two
    jobs of one kind at once, and its waiting one starts when its running one ends."""

    kind = "in-process"

    def __init__(self, model_dir, runners: dict[str, Callable[..., object]] | None = None, concurrency: int = 1):
        self.model_dir = Path(model_dir)
        self.runners: dict[str, Callable[..., object]] = {}  # kind -> function(project, job_id=...)
        self.concurrency = max(1, concurrency)
        self._waiting: deque[tuple[str, str, str]] = deque()  # kind, project, job id
        self._running: list[tuple[str, str, str]] = []
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._recover()
        if runners is not None:
            self.start(runners)

    def start(self, runners: dict[str, Callable[..., object]]) -> None:
        """Start the threads once the runners exist (they need the scheduler, which needs this queue)."""
        self.runners = runners
        self._threads = [threading.Thread(target=self._loop, name=f"job-worker-{n}", daemon=True)
                         for n in range(self.concurrency)]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Take no more jobs, and stop a running training at its next batch: it stays "running" on disk, so the next
        start queues it again. Waits for the threads, since a process that exits under torch or OpenVINO work aborts."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        compute.stop(self._threads)
        for thread in self._threads:
            thread.join(timeout)
        compute.forget([t for t in self._threads if not t.is_alive()])

    def schedule(self, project: str, kind: str = "train", **fields) -> str:
        with self._cond:
            if any((k, p) == (kind, project) for k, p, _ in self._waiting):
                return "folded"
            job_id = new_job_id(kind, project)
            create_job(self.model_dir, project, kind, job_id, self.kind, **fields)
            self._waiting.append((kind, project, job_id))
            self._cond.notify_all()
            return "queued"

    def _recover(self) -> None:
        """Take over what an earlier server process left: its waiting jobs wait again, and the job it was running
        died with it, so that one is marked interrupted and queued again."""
        root = self.model_dir
        projects = sorted(p.name for p in root.iterdir() if jobs_dir(root, p.name).is_dir()) if root.is_dir() else []
        left = [j for p in projects for j in list_jobs(root, p)
                if j.get("queue") == self.kind and j.get("state") in ("queued", "running")]
        self._waiting.extend((j["kind"], j["project"], j["job_id"]) for j in left if j["state"] == "queued")
        for job in left:
            if job["state"] == "running":
                resume(self, job, "the server stopped while it ran")

    def _take(self) -> tuple[str, str, str] | None:
        """The oldest waiting job whose project runs no job of its kind; called with the condition held."""
        busy = {(k, p) for k, p, _ in self._running}
        for job in self._waiting:
            if job[:2] not in busy:
                self._waiting.remove(job)
                self._running.append(job)
                return job
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (job := self._take()) is None:
                    self._cond.wait()
                if self._closed:
                    return
            kind, project, job_id = job
            try:
                self.runners[kind](project, job_id=job_id)
            except compute.Stopped:
                log.info("project %s: %s job stopped with the server; it is queued again at the next start", project, kind)
            except Exception:
                log.exception("project %s: %s job failed", project, kind)
            finally:
                with self._cond:
                    self._running.remove(job)
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
        return job_view(self.model_dir, project, kind)


class RQQueue:
    """Jobs on a named RQ queue, run by `python -m ls_backend.worker` anywhere that shares Redis and MODEL_DIR."""

    kind = "rq"

    def __init__(self, model_dir, redis_url: str, queue_name: str, job_timeout: int):
        from redis import Redis
        from rq import Queue

        self.model_dir = Path(model_dir)
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

    def schedule(self, project: str, kind: str = "train", **fields) -> str:
        """Enqueue a job unless one is already waiting for the project (raises if Redis is down)."""
        from rq import Callback
        from rq.job import JobStatus

        key = WAITING.format(kind=kind, project=project)
        with self.redis.lock(f"lsyolo:schedule:{project}", timeout=10, blocking_timeout=2):
            waiting = self.redis.get(key)
            if waiting and self._job_status(waiting.decode()) in (JobStatus.QUEUED, JobStatus.DEFERRED):
                return "folded"
            job_id = new_job_id(kind, project)
            create_job(self.model_dir, project, kind, job_id, self.kind, **fields)  # before a worker can start it
            try:
                self.queue.enqueue(JOB_FUNCTIONS[kind], project, job_timeout=self.job_timeout, job_id=job_id,
                                   result_ttl=86400, failure_ttl=7 * 86400, on_failure=Callback(ON_FAILURE))
                self.redis.set(key, job_id, ex=self.job_timeout * 4)
            except Exception:
                remove_job(self.model_dir, project, job_id)
                raise
        return "queued"

    def lost(self, project: str, job_id: str, why: str) -> None:
        """RQ gave up on a job: if its state still says running, its worker died, and it is resumed.

        The resumed job waits for the project's lock, so a work-horse that outlived its worker finishes first."""
        job = read_job(self.model_dir, project, job_id)
        if job.get("state") == "running":  # otherwise it ended and said so (a failure it recorded, a finished run)
            resume(self, job, why)

    def close(self) -> None:
        """Nothing to stop here: the jobs run in RQ workers, which outlive the server."""

    def status(self, project: str, kind: str = "train") -> dict:
        """The jobs' state in MODEL_DIR, after resuming a running one whose worker RQ lost without it saying so."""
        from rq.job import JobStatus

        for job in list_jobs(self.model_dir, project, kind):
            if job.get("state") != "running" or job.get("queue") != self.kind:
                continue
            try:
                rq_state = self._job_status(job["job_id"])
            except Exception:  # Redis down: report what the files say
                break
            if rq_state in (JobStatus.STOPPED, JobStatus.CANCELED):
                update_job(self.model_dir, project, job["job_id"], state="failed", error=f"RQ: {rq_state}",
                           finished=time.time())
            elif rq_state in (None, JobStatus.FAILED):
                self.lost(project, job["job_id"], f"the worker running it was lost (RQ: {rq_state or 'no such job'})")
        return job_view(self.model_dir, project, kind)


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
