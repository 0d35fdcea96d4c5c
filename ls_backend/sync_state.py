"""Whether a project's stored annotations already mirror Label Studio, kept where every job finds it.

A job that exported the whole project from Label Studio says so here; later jobs, on any worker, then train on
what webhooks stored since, and fetch nothing. The Train button (START_TRAINING) asks for one more export.
With REDIS_URL the state is a Redis hash per project (an RQ work-horse's memory dies with it); without, a JSON
file in the project's folder.

Presses of the Train button are counted, and a job records the count it acted on: a press that arrives while
a job is exporting is not mistaken for one that export already covered.
"""
from __future__ import annotations

import logging
from typing import Protocol

from model.registry import read_json, write_json
from model.workspace import Workspace

log = logging.getLogger(__name__)

KEY = "lsyolo:sync:{project}"
PRESSED_OFFLINE = "resync_requested"  # a Train button press noted on disk while Redis was unreachable


class SyncState(Protocol):
    def read(self, project: str) -> dict: ...

    def request_resync(self, project: str) -> None: ...

    def mark(self, project: str, **counts: float) -> None: ...


def needs_export(state: dict) -> bool:
    """Never exported, or the Train button was pressed after the last export."""
    return state.get("synced") is None or state.get("requested", 0) > state["synced"]


def full_run_requested(state: dict) -> bool:
    """The Train button was pressed after the last job that trained everything for it started."""
    return state.get("requested", 0) > state.get("full", 0)


class FileSyncState:
    """sync.json in the project's folder: for the in-process queue, whose jobs share one server process."""

    def __init__(self, model_dir):
        self.model_dir = model_dir

    def _file(self, project: str):
        return Workspace(self.model_dir, project).sync_file

    def read(self, project: str) -> dict:
        return read_json(self._file(project), {}) or {}

    def request_resync(self, project: str) -> None:
        state = self.read(project)
        write_json(self._file(project), {**state, "requested": state.get("requested", 0) + 1})

    def mark(self, project: str, **counts: float) -> None:
        write_json(self._file(project), {**self.read(project), **counts})


class RedisSyncState:
    """A Redis hash per project, shared by the server and every RQ worker and work-horse."""

    def __init__(self, model_dir, redis_url: str):
        from redis import Redis

        self.model_dir = model_dir
        self.redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def _marker(self, project: str):
        return Workspace(self.model_dir, project).root / PRESSED_OFFLINE

    def read(self, project: str) -> dict:
        """The stored counts; with Redis unreachable, an empty state, so the job exports rather than miss anything."""
        try:
            raw = self.redis.hgetall(KEY.format(project=project))
        except Exception as exc:
            log.warning("project %s: sync state unreadable (%s); exporting from Label Studio again", project, exc)
            return {}
        state = {k.decode(): float(v) for k, v in raw.items()}
        if self._marker(project).exists():  # a press Redis missed: one more than any count Redis holds
            state["requested"] = max(state.get("requested", 0), state.get("synced", 0), state.get("full", 0)) + 1
        return state

    def request_resync(self, project: str) -> None:
        try:
            self.redis.hincrby(KEY.format(project=project), "requested", 1)
        except Exception as exc:
            log.warning("project %s: Redis unreachable (%s); the resync request is kept on disk", project, exc)
            marker = self._marker(project)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()

    def mark(self, project: str, **counts: float) -> None:
        marker = self._marker(project)
        pressed_offline = marker.exists()
        if pressed_offline:  # the count the job acted on includes that press: Redis counts on from there
            counts = {**counts, "requested": max(counts.values())}
        try:
            self.redis.hset(KEY.format(project=project), mapping=counts)
            if pressed_offline and "full" in counts:
                marker.unlink(missing_ok=True)
        except Exception as exc:  # the next job exports again: more work, nothing lost
            log.warning("project %s: could not record the sync state: %s", project, exc)


def sync_state(model_dir, redis_url: str) -> SyncState:
    return RedisSyncState(model_dir, redis_url) if redis_url else FileSyncState(model_dir)

