"""A project's training job state in MODEL_DIR, readable by every server whichever worker ran it."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from model.registry import read_json, write_json

log = logging.getLogger(__name__)


def status_path(model_dir: Path, project: str, kind: str) -> Path:
    return Path(model_dir) / project / f"{kind}-job.json"


def read_status(model_dir: Path, project: str, kind: str = "train") -> dict:
    return read_json(status_path(model_dir, project, kind), {}) or {}


def write_status(model_dir: Path, project: str, kind: str = "train", **fields) -> dict:
    """Merge fields into the job state and log the change of state."""
    status = {**read_status(model_dir, project, kind), **fields, "updated": time.time()}
    write_json(status_path(model_dir, project, kind), status)
    if "state" in fields:
        log.info("project %s %s job %s%s", project, kind, fields["state"],
                 f": {fields.get('error') or fields.get('reason')}" if fields.get("error") or fields.get("reason") else "")
    return status
