"""MODEL_DIR/<project>: the one place that knows which file or folder of a project holds what."""
from __future__ import annotations

from pathlib import Path


class Workspace:
    """The layout of one project's folder, shared by the server and every worker through MODEL_DIR.

    annotations/<task>.json  the task's latest human label (webhooks and resyncs write, training reads)
    project.json             label config, title, /setup's hostname and token
    predictions/, effort/    the last prediction per task and how much of it the annotator changed
    versions/vN/, current.json  trained versions and which one is served (vN/members/: fold models fused with it)
    crosscheck/vN.json       the cross-check folds of version N trained so far, with their held-out predictions
    crosscheck/vN/           those folds' models, until the cross-check's version takes them as its members
    jobs/<job id>.json       each job's state
    sync.json                when the project was last resynced from Label Studio (without Redis)
    """

    def __init__(self, model_dir: Path | str, project: str | int):
        self.model_dir = Path(model_dir)
        self.project = str(project)
        self.root = self.model_dir / self.project

    @property
    def annotations(self) -> Path:
        return self.root / "annotations"

    @property
    def info_file(self) -> Path:
        return self.root / "project.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def effort(self) -> Path:
        return self.root / "effort"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def crosscheck(self) -> Path:
        return self.root / "crosscheck"

    @property
    def current_file(self) -> Path:
        return self.root / "current.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def sync_file(self) -> Path:
        return self.root / "sync.json"


def projects(model_dir: Path | str) -> list[str]:
    """Every project with a folder in MODEL_DIR (the _cache, _weights, ... folders are not projects)."""
    root = Path(model_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()) \
        if root.is_dir() else []
