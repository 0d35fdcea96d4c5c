"""One training run of a polygon, choices, keypoint or rotated-box control: the boxes' run with its kind's model.

Like model.pipeline: every stored annotation, a warm start from the served version, the same held-out tasks, the
not-worse gate on the kind's own metric (mask mAP, top-1 accuracy, pose mAP, rotated-box mAP), a new version.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import compute, policy
from .dataset import DatasetInfo
from .heads import seeded_model
from .kind_dataset import build_kind_dataset
from .pipeline import NotEnoughData, RunOutcome, judge
from .project_store import ProjectStore
from .registry import ProjectRegistry
from .trainer import (ProgressFn, TrainParams, TrainPlan, backbone_layers, model_cost, plan, prepare_run, run_arguments,
                      trained_weights)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KindScores:
    """The kind's held-out metric: fitness is what the not-worse gate compares."""

    fitness: float
    map50: float | None  # mask, pose or rotated-box mAP50; top-1 accuracy for choices
    map50_95: float | None
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_kind(weights: Path, data: Path, task: str, imgsz: int, out_dir: Path, device: str = "",
                  images: int = 0) -> KindScores:
    """Validate with Ultralytics' own metric code on the val split."""
    from ultralytics import YOLO

    kwargs = dict(data=str(data), split="val", imgsz=imgsz, batch=8, workers=0, plots=False, verbose=False,
                  project=str(out_dir.resolve()), name="val", exist_ok=True)
    if task != "classify":
        kwargs["conf"] = 0.001
    if device:
        kwargs["device"] = device
    metrics = YOLO(str(weights)).val(**kwargs)
    if task == "classify":
        return KindScores(float(metrics.top1), float(metrics.top1), None, images)
    part = {"segment": "seg", "pose": "pose"}.get(task, "box")
    found = getattr(metrics, part)
    return KindScores(0.1 * float(found.map50) + 0.9 * float(found.map), float(found.map50), float(found.map), images)


def _train(model, data: Path, task: str, run_dir: Path, run_plan: TrainPlan, classes: int, device: str, seed: int,
           progress: ProgressFn | None) -> tuple[Path, float]:
    """Ultralytics training with the boxes' small-data settings (AdamW, a step per batch, short warm-up)."""
    prepare_run(model, progress)
    kwargs = run_arguments(data, run_dir, run_plan, classes, device, seed)
    if task == "pose":
        kwargs["fliplr"] = 0.0  # a mirrored left hand would be learned as a right hand: the config says no pairs
    started = time.monotonic()
    with compute.training():  # counted, like a box run, so runs side by side share the cores
        compute.use_training_threads()
        model.train(**kwargs)
    return trained_weights(run_dir), time.monotonic() - started


def _records(store: ProjectStore) -> tuple[list[dict], float]:
    files = list(store.annotations_dir.glob("*.json")) if store.annotations_dir.is_dir() else []
    return store.records(), max((p.stat().st_mtime for p in files), default=0.0)


def run_kind_training(store: ProjectStore, registry: ProjectRegistry, control, task: str,
                      fetch: Callable[[dict], Path], base_weights: Path, params: TrainParams, min_annotations: int,
                      accept_only_if_not_worse: bool, keep_versions: int, progress: ProgressFn | None = None,
                      refined: bool = False, default_conf: float = 0.25, refine_round: int = 0) -> RunOutcome:
    """Train a new version of one control from every stored annotation, warm-starting from its served version."""
    from ultralytics import YOLO

    started = time.time()
    records, upto = _records(store)
    if len(records) < max(2, min_annotations):
        raise NotEnoughData(f"project {store.project} has {len(records)} annotated tasks; training starts at {min_annotations}")
    work = registry.root / "runs" / f"run-{int(started * 1000)}"
    try:
        info: DatasetInfo = build_kind_dataset(records, control, task, fetch, work / "dataset")
        labeled = len(info.train) + len(info.val)
        if len(info.train) < 1 or labeled < max(2, min(min_annotations, len(records))):
            raise NotEnoughData(f"control {control.name}: only {labeled} of {len(records)} tasks are usable "
                                f"({'answered' if task == 'classify' else 'with images'}): {info.skipped}")
        parent = registry.current()
        parent_ok = parent is not None and parent.weights.is_file() and parent.meta.get("task") == task
        classes = len(info.names)
        kpt_shape = (len(control.labels), 3) if task == "pose" else None
        if parent_ok and list(parent.meta.get("labels", [])) == info.names:
            model = YOLO(str(parent.weights))
        else:
            model = seeded_model(parent.weights if parent_ok else base_weights, task, classes, work, kpt_shape)
        parent_imgsz = (parent.meta.get("plan") or {}).get("imgsz") if parent_ok and not refined else None
        if task == "classify":
            epochs = params.epochs if params.epochs > 0 else policy.target_epochs(len(info.train))
            imgsz = params.imgsz or parent_imgsz or policy.CLASSIFY_IMGSZ
            freeze = backbone_layers(model.model) if params.freeze < 0 else params.freeze  # as boxes: TRAIN_FREEZE
            run_plan = TrainPlan(epochs, imgsz, freeze, max(1, min(params.batch, len(info.train))), params.time_budget)
        else:
            run_plan = plan(params, len(info.train), [max(size) for size in info.image_sizes], info.box_sides,
                            parent_imgsz, model_cost(model.model), backbone_layers(model.model))
        data = info.yaml_path
        log.info("project %s control %s (%s): training %s on %d train / %d val tasks from %s", store.project,
                 control.name, task, run_plan, len(info.train), len(info.val),
                 parent.name if parent_ok else base_weights.name)
        weights, seconds = _train(model, data, task, work / "train", run_plan, classes, params.device, params.seed,
                                  progress)
        scores = evaluate_kind(weights, data, task, run_plan.imgsz, work, params.device, len(info.val))
        accepted, reason, parent_scores, gain = judge(
            parent if parent_ok else None, info.names, scores.fitness, len(info.val), accept_only_if_not_worse,
            lambda: evaluate_kind(parent.weights, data, task, run_plan.imgsz, work, params.device, len(info.val)),
            must_gain=refined and policy.refinement_must_gain(task, refine_round))
        meta = {
            "control": control.name, "task": task, "parent": parent.name if parent_ok else None,
            "base_weights": str(parent.weights if parent_ok else base_weights), "annotations": labeled,
            "pseudo_labeled": 0, "train_tasks": info.train, "val_tasks": info.val, "held_out_tasks": len(info.val),
            "skipped_tasks": info.skipped, "labels": info.names, "metrics": scores.as_dict(),
            "parent_metrics": parent_scores.as_dict() if parent_scores else None, "gain": gain,
            "plan": run_plan.__dict__, "conf": default_conf, "thresholds": {"default": default_conf, "per_label": {}},
            "train_seconds": round(seconds, 1), "seconds": round(time.time() - started, 1), "trained_upto": upto,
            "reason": reason, "refined": refined, "refine_round": refine_round, "status": "rejected",
        }
        version = registry.add(weights, meta, make_current=accepted)
        registry.prune(keep_versions)
        log.info("project %s control %s: %s %s (%s)", store.project, control.name, version.name,
                 "served" if accepted else "rejected", reason)
        return RunOutcome(version, accepted, reason, scores.as_dict(), gain)
    finally:
        shutil.rmtree(work, ignore_errors=True)
