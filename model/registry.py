"""Per-project model versions on disk, shared by servers and workers through MODEL_DIR."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .workspace import Workspace

WEIGHTS = "weights.pt"
META = "meta.json"
HELD_OUT = "held_out.json"  # the version's predictions on its held-out tasks (model.thresholds.save_held_out)
MEMBERS = "members"  # models whose boxes are fused with the version's own when it predicts (model.fusion)
_VERSION = re.compile(r"^v(\d+)$")


def write_json(path: Path, data: Any) -> None:
    """Write a JSON file so that readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


@dataclass(frozen=True)
class Version:
    """One trained model of a project and what we know about it."""

    name: str
    path: Path
    meta: dict

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def held_out(self) -> Path:
        return self.path / HELD_OUT

    @property
    def members(self) -> list[Path]:
        """Further models served fused with this one's weights; its weights alone are what later runs train from
        and are judged against (the members trained on its held-out tasks)."""
        return sorted((self.path / MEMBERS).glob("*.pt"))

    @property
    def number(self) -> int:
        return int(self.name[1:])


class ProjectRegistry:
    """The versions of one project; a version is complete on disk before it can become current."""

    def __init__(self, model_dir: Path, project: str | int):
        workspace = Workspace(model_dir, project)
        self.project, self.root = workspace.project, workspace.root
        self.versions_dir = workspace.versions
        self.current_file = workspace.current_file
        self.crosscheck_dir = workspace.crosscheck

    def versions(self) -> list[Version]:
        """All versions, oldest first, pruned ones included (their weights are gone, their history stays)."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for entry in self.versions_dir.iterdir():
            if _VERSION.match(entry.name) and (entry / META).is_file():
                found.append(Version(entry.name, entry, read_json(entry / META, {})))
        return sorted(found, key=lambda v: v.number)

    def get(self, name: str) -> Version | None:
        path = self.versions_dir / name
        if not _VERSION.match(name) or not (path / META).is_file():
            return None
        return Version(name, path, read_json(path / META, {}))

    def current_name(self) -> str | None:
        """The served version's name; a stat and a small read, cheap enough for every request."""
        data = read_json(self.current_file)
        return data.get("version") if data else None

    def current(self) -> Version | None:
        name = self.current_name()
        return self.get(name) if name else None

    def add(self, weights: Path, meta: dict, make_current: bool, companions: list[Path] = ()) -> Version:
        """Copy weights (and folders that go with them, such as an export) into a new numbered version, write its
        metadata, and switch to it if asked."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".staging-"))
        shutil.copy2(weights, staging / WEIGHTS)
        for folder in companions:
            shutil.copytree(folder, staging / folder.name)
        while True:
            last = max((v.number for v in self.versions()), default=0)
            name = f"v{last + 1}"
            meta = {**meta, "version": name, "created": meta.get("created", time.time())}
            meta["status"] = "current" if make_current else meta.get("status", "rejected")
            write_json(staging / META, meta)
            try:
                os.rename(staging, self.versions_dir / name)
                break
            except OSError:
                continue
        if make_current:
            self.set_current(name)
        return self.get(name)

    def set_current(self, name: str) -> None:
        """Atomically point the project at a version whose weights exist."""
        target = self.get(name)
        if target is None or not target.weights.is_file():
            raise ValueError(f"project {self.project} has no version {name} with weights")
        previous = self.current_name()
        write_json(self.current_file, {"version": name, "since": time.time()})
        self._update_status(name, "current")
        if previous and previous != name:
            self._update_status(previous, "superseded")

    def _update_status(self, name: str, status: str) -> None:
        version = self.get(name)
        if version is not None:
            write_json(version.path / META, {**version.meta, "status": status})

    def rollback(self, name: str | None = None) -> Version:
        """Serve an earlier version: the named one, or the newest accepted one before the current."""
        current = self.current()
        if name is None:
            older = [
                v for v in self.versions()
                if v.weights.is_file() and v.meta.get("status") in ("superseded", "current")
                and (current is None or v.number < current.number)
            ]
            if not older:
                raise ValueError(f"project {self.project} has no earlier version to roll back to")
            name = older[-1].name
        self.set_current(name)
        return self.get(name)

    def prune(self, keep: int) -> list[str]:
        """Delete the weights of all but the newest `keep` versions, never the current one, and the fold models of
        cross-checks no longer owed (only the current version's cross-check goes on)."""
        current = self.current_name()
        for folder in self.crosscheck_dir.glob("v*/"):  # nothing when no cross-check ever ran
            if folder.name != current:
                shutil.rmtree(folder, ignore_errors=True)
        with_weights = [v for v in self.versions() if v.weights.is_file() and v.name != current]
        removed = []
        for version in with_weights[: max(0, len(with_weights) - max(keep - 1, 0))]:
            version.weights.unlink(missing_ok=True)
            shutil.rmtree(version.path / f"{Path(WEIGHTS).stem}_openvino_model", ignore_errors=True)  # model.runtime
            shutil.rmtree(version.path / MEMBERS, ignore_errors=True)
            write_json(version.path / META, {**version.meta, "status": "pruned", "was": version.meta.get("status")})
            removed.append(version.name)
        return removed
