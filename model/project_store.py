"""What a project has told us (config, annotations), kept on disk where every worker finds it."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

from .registry import read_json, write_json
from .workspace import Workspace


def annotation_record(task: dict, annotation: dict) -> dict:
    """The part of a Label Studio annotation that training needs."""
    return {
        "task_id": int(task.get("id") or annotation.get("task")),
        "annotation_id": annotation.get("id"),
        "data": task.get("data") or {},
        "result": annotation.get("result") or [],
        "cancelled": bool(annotation.get("was_cancelled")),
        "updated_at": annotation.get("updated_at") or annotation.get("created_at"),
    }


class ProjectStore:
    """One JSON file per annotated task plus the project's settings, written atomically."""

    def __init__(self, model_dir: Path, project: str | int):
        self.workspace = Workspace(model_dir, project)
        self.project, self.root = self.workspace.project, self.workspace.root
        self.annotations_dir = self.workspace.annotations
        self.info_file = self.workspace.info_file
        self.predictions_dir = self.workspace.predictions
        self.effort_dir = self.workspace.effort

    def info(self) -> dict:
        return read_json(self.info_file, {}) or {}

    def update_info(self, **fields) -> dict:
        """Merge fields into project.json; the file holds a token, so only its owner may read it."""
        info = {**self.info(), **{k: v for k, v in fields.items() if v is not None}}
        write_json(self.info_file, info)
        os.chmod(self.info_file, 0o600)
        return info

    def _path(self, task_id: int) -> Path:
        return self.annotations_dir / f"{int(task_id)}.json"

    def put(self, record: dict) -> None:
        """Keep the task's latest annotation; a cancelled one is remembered as 'not a label'."""
        write_json(self._path(record["task_id"]), {**record, "received": time.time()})

    def remove_task(self, task_id: int) -> None:
        self._path(task_id).unlink(missing_ok=True)

    def delete_annotations(self, annotation_ids: set[int]) -> int:
        """Forget annotations by id, as ANNOTATIONS_DELETED names only ids."""
        removed = 0
        for path, record in self._iter():
            if record.get("annotation_id") in annotation_ids:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _iter(self) -> Iterator[tuple[Path, dict]]:
        if not self.annotations_dir.is_dir():
            return
        for path in sorted(self.annotations_dir.glob("*.json")):
            record = read_json(path)
            if record:
                yield path, record

    def records(self) -> list[dict]:
        """Usable labels: submitted annotations, empty ones included, cancelled ones not."""
        return [r for _, r in self._iter() if not r.get("cancelled")]

    def get(self, task_id: int) -> dict | None:
        return read_json(self._path(task_id))

    def counts(self, since: float) -> tuple[int, int]:
        """How many tasks are labeled, and how many of them changed after `since`, from file times alone."""
        total = changed = 0
        if not self.annotations_dir.is_dir():
            return 0, 0
        with os.scandir(self.annotations_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    total += 1
                    changed += entry.stat().st_mtime > since
        return total, changed

    def replace_all(self, records: list[dict]) -> None:
        """Make the store mirror a full export, dropping tasks that lost their annotations meanwhile."""
        keep = set()
        for record in records:
            existing = self.get(record["task_id"])
            if existing is None or {k: existing.get(k) for k in record} != record:
                self.put(record)
            keep.add(self._path(record["task_id"]).name)
        if self.annotations_dir.is_dir():
            for path in self.annotations_dir.glob("*.json"):
                if path.name not in keep:
                    path.unlink(missing_ok=True)

    def remember_prediction(self, task_id: int, version: str, result: list[dict]) -> None:
        """The last prediction we gave a task, to compare with what the human finally submits."""
        write_json(self.predictions_dir / f"{int(task_id)}.json", {"version": version, "result": result})

    def prediction(self, task_id: int) -> dict | None:
        return read_json(self.predictions_dir / f"{int(task_id)}.json")

    def put_effort(self, task_id: int, effort: dict) -> None:
        """One comparison per task: an updated annotation replaces the task's earlier figures."""
        write_json(self.effort_dir / f"{int(task_id)}.json", effort)

    def efforts(self) -> list[dict]:
        if not self.effort_dir.is_dir():
            return []
        return [e for e in (read_json(p) for p in sorted(self.effort_dir.glob("*.json"))) if e]
