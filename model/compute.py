"""Share the CPU between training and serving in one process: train on every core unless a request is waiting."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

_in_flight = {"serving": 0, "training": 0}
_lock = threading.Lock()
_elsewhere: Callable[[], int] = lambda: 0
_stopping: set[threading.Thread] = set()


class Stopped(Exception):
    """The process is shutting down: a training run stops at its next batch and its job is queued again later."""


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _marked(kind: str) -> Iterator[None]:
    with _lock:
        _in_flight[kind] += 1
    try:
        yield
    finally:
        with _lock:
            _in_flight[kind] -= 1


def serving() -> contextlib.AbstractContextManager[None]:
    """Mark a prediction in flight, so an in-process training run leaves it a core."""
    return _marked("serving")


def default_job_concurrency() -> int:
    """In-process jobs at once by default: one per two cores, since a YOLO training on one core runs at well under
    half the speed it reaches on two, and a server without Redis must still answer predictions."""
    return max(1, cores() // 2)


def training() -> contextlib.AbstractContextManager[None]:
    """Mark a training run in flight, so concurrent runs in one process share the cores instead of each taking all."""
    return _marked("training")


def share_with(count: Callable[[], int]) -> None:
    """Count training runs in other processes on this machine (RQ workers beside this one), so each takes its share
    of the cores instead of all of them: two runs each on every core of a 2-core machine thrash, measured in
    bench/scale.py."""
    global _elsewhere
    _elsewhere = count


def training_threads() -> int:
    """Torch threads for a training thread's next batch: its share of the cores, one fewer while serving."""
    with _lock:
        busy, runs = _in_flight["serving"] > 0, max(1, _in_flight["training"])
    runs += _elsewhere()
    share = max(1, cores() // runs)
    return max(1, share - 1) if busy else share


def stop(threads: list[threading.Thread]) -> None:
    """Ask these threads' training runs to end at their next batch (a process that exits under a running torch or
    OpenVINO thread aborts)."""
    with _lock:
        _stopping.update(threads)


def forget(threads: list[threading.Thread]) -> None:
    with _lock:
        _stopping.difference_update(threads)


def use_training_threads() -> None:
    """Apply training_threads() to the calling thread (torch's thread count is per calling thread), or stop it."""
    import torch

    if threading.current_thread() in _stopping:
        raise Stopped("the server is stopping")

    wanted = training_threads()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
