"""`python -m ls_backend.worker`: an RQ worker for the training queue, on any machine sharing Redis and MODEL_DIR."""
from __future__ import annotations

import argparse
import logging
import socket
import time
from typing import Callable

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker

from .job_context import get_backend
from .settings import get_settings


def busy_neighbours(connection: Redis, own_name: str, every: float = 10.0) -> Callable[[], int]:
    """How many other RQ workers on this host are running a job, asked of Redis at most every `every` seconds."""
    host, seen = socket.gethostname(), [0.0, 0]

    def count() -> int:
        if time.monotonic() - seen[0] >= every:
            try:
                workers = Worker.all(connection=connection)
                seen[1] = sum(1 for w in workers if w.name != own_name and w.hostname == host
                              and w.get_state() == "busy")
            except RedisError:  # Redis away for a moment: keep the last count, training goes on
                pass
            seen[0] = time.monotonic()
        return seen[1]

    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        parser.error("REDIS_URL is not set: without Redis the server trains in-process and needs no worker")
    get_backend()  # prepare Ultralytics' offline config before any job imports it
    import ultralytics  # noqa: F401  imported once here, so each forked job starts training at once

    import torch

    from model import compute

    torch.set_num_threads(compute.cores())  # predictions in jobs; training sets its own share per batch
    connection = Redis.from_url(settings.redis_url)
    worker = Worker([Queue(settings.queue_name, connection=connection)], connection=connection)
    # A worker trains on every core it may use, shared with the other workers busy on this machine.
    compute.share_with(busy_neighbours(connection, worker.name))
    worker.work(burst=args.burst, logging_level=settings.log_level.upper())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
