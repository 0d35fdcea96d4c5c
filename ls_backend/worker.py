"""`python -m ls_backend.worker`: an RQ worker for the training queue, on any machine sharing Redis and MODEL_DIR."""
from __future__ import annotations

import argparse
import logging

from .job_context import get_backend
from .settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        parser.error("REDIS_URL is not set: without Redis the server trains in-process and needs no worker")
    from redis import Redis
    from rq import Queue, Worker

    get_backend()  # prepare Ultralytics' offline config before any job imports it
    import ultralytics  # noqa: F401  imported once here, so each forked job starts training at once
    import os

    import torch

    # Ultralytics leaves a core free for a server; a worker has nothing else to do, so it trains on all of them.
    torch.set_num_threads(os.cpu_count() or 1)
    connection = Redis.from_url(settings.redis_url)
    worker = Worker([Queue(settings.queue_name, connection=connection)], connection=connection)
    worker.work(burst=args.burst, logging_level=settings.log_level.upper())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
