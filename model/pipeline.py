"""One training run of a project: dataset, fine-tune, judge against the served version, register."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .dataset import build_dataset
from .label_config import RectangleLabelsControl
from .project_store import ProjectStore
from .registry import ProjectRegistry, Version
from .trainer import ProgressFn, TrainParams, plan, train
from .validator import best_confidence, evaluate

log = logging.getLogger(__name__)

TOLERANCE = 0.005  # fitness noise on a handful of held-out images; 'not worse' allows this much


class NotEnoughData(RuntimeError):
    """Too few usable annotated tasks to train; the message says how many there are."""


@dataclass
class RunOutcome:
    """What a run produced and whether it is now served."""

    version: Version
    accepted: bool
    reason: str
    metrics: dict = field(default_factory=dict)


def trained_upto(registry: ProjectRegistry) -> float:
    """Annotations changed after this time are new to every version of the project."""
    return max((v.meta.get("trained_upto", 0.0) for v in registry.versions()), default=0.0)


def run_training(store: ProjectStore, registry: ProjectRegistry, control: RectangleLabelsControl,
                 fetch: Callable[[dict], Path], base_weights: Path, params: TrainParams, min_annotations: int,
                 accept_only_if_not_worse: bool, keep_versions: int, progress: ProgressFn | None = None,
                 refined: bool = False, default_conf: float = 0.25) -> RunOutcome:
    """Train a new version from every stored annotation, warm-starting from the served one."""
    started = time.time()
    annotation_files = list(store.annotations_dir.glob("*.json")) if store.annotations_dir.is_dir() else []
    upto = max((p.stat().st_mtime for p in annotation_files), default=0.0)
    records = store.records()
    if len(records) < max(2, min_annotations):
        raise NotEnoughData(f"project {store.project} has {len(records)} annotated tasks; training starts at {min_annotations}")
    work = registry.root / "runs" / f"run-{int(started * 1000)}"
    try:
        info = build_dataset(records, control, fetch, work / "dataset")
        if len(info.train) < 1 or len(info.train) + len(info.val) < max(2, min(min_annotations, len(records))):
            raise NotEnoughData(f"only {len(info.train) + len(info.val)} of {len(records)} tasks had usable images: {info.skipped}")
        parent = registry.current()
        parent_ok = parent is not None and parent.weights.is_file()
        start_from = parent.weights if parent_ok else base_weights
        parent_imgsz = (parent.meta.get("plan") or {}).get("imgsz") if parent_ok and not refined else None
        run_plan = plan(params, len(info.train), info.image_sizes, parent_imgsz)
        log.info("project %s: training %s on %d train / %d val tasks from %s", store.project, run_plan,
                 len(info.train), len(info.val), start_from.name)
        weights, seconds = train(info.yaml_path, start_from, work / "train", run_plan, params.device, params.seed, progress)
        scores = evaluate(weights, info.yaml_path, run_plan.imgsz, work, params.device, len(info.val))
        conf = best_confidence(weights, info.yaml_path, run_plan.imgsz, default_conf, params.device)
        accepted, reason, parent_scores = True, "first trained version", None
        if parent_ok:
            if list(parent.meta.get("labels", [])) != info.names:
                reason = "the label set changed, so the previous version cannot be compared"
            else:
                parent_scores = evaluate(parent.weights, info.yaml_path, run_plan.imgsz, work, params.device, len(info.val))
                better = scores.fitness >= parent_scores.fitness - TOLERANCE
                accepted = better or not accept_only_if_not_worse
                reason = (f"fitness {scores.fitness:.4f} vs {parent.name} {parent_scores.fitness:.4f} on the same "
                          f"{len(info.val)} held-out tasks" + ("" if better else ": worse"))
        meta = {
            "parent": parent.name if parent_ok else None,
            "base_weights": str(start_from),
            "annotations": len(info.train) + len(info.val),
            "train_tasks": info.train,
            "val_tasks": info.val,
            "skipped_tasks": info.skipped,
            "labels": info.names,
            "metrics": scores.as_dict(),
            "parent_metrics": parent_scores.as_dict() if parent_scores else None,
            "plan": run_plan.__dict__,
            "conf": conf,
            "train_seconds": round(seconds, 1),
            "seconds": round(time.time() - started, 1),
            "trained_upto": upto,
            "reason": reason,
            "refined": refined,
            "status": "rejected",
        }
        version = registry.add(weights, meta, make_current=accepted)
        registry.prune(keep_versions)
        log.info("project %s: %s %s (%s)", store.project, version.name, "served" if accepted else "rejected", reason)
        return RunOutcome(version, accepted, reason, scores.as_dict())
    finally:
        shutil.rmtree(work, ignore_errors=True)
