"""Share the CPU between training and serving in one process: train on every core unless a request is waiting."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_active = 0
_training = 0
_lock = threading.Lock()


def cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """Mark a prediction in flight, so an in-process training run leaves it a core."""
    global _active
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1


def default_job_concurrency() -> int:
    """In-process jobs at once by default: one per two cores, since a YOLO training on one core runs at well under
    half the speed it reaches on two, and a server without Redis must still answer predictions."""
    return max(1, cores() // 2)


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Mark a training run in flight, so concurrent runs in one process share the cores instead of each taking all."""
    global _training
    with _lock:
        _training += 1
    try:
        yield
    finally:
        with _lock:
            _training -= 1


def training_threads() -> int:
    """Torch threads for a training thread's next batch: its share of the cores, one fewer while serving."""
    with _lock:
        busy, runs = _active > 0, max(1, _training)
    share = max(1, cores() // runs)
    return max(1, share - 1) if busy else share


def use_training_threads() -> None:
    """Apply training_threads() to the calling thread (torch's thread count is per calling thread)."""
    import torch

    wanted = training_threads()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
