"""Share the CPU between training and serving in one process: train on every core unless a request is waiting."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_active = 0
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


def training_threads() -> int:
    """Torch threads for the training thread's next batch: all cores when idle, all but one while serving."""
    with _lock:
        busy = _active > 0
    return max(1, cores() - 1) if busy else cores()


def use_training_threads() -> None:
    """Apply training_threads() to the calling thread (torch's thread count is per calling thread)."""
    import torch

    wanted = training_threads()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
