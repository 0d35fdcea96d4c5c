"""One training run of a project: dataset, fine-tune, judge against the served version, register."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from . import thresholds
from .dataset import build_dataset
from .export import export_version
from .label_config import RectangleLabelsControl
from .policy import CROSSCHECK_IMAGES, REFINE_MIN_GAIN, refinement_must_gain, serve_z, worse_margin
from .project_store import ProjectStore
from .registry import ProjectRegistry, Version
from .trainer import ProgressFn, TrainParams, backbone_layers, checkpoint_model, model_cost, plan, train
from .validator import evaluate

log = logging.getLogger(__name__)
S = TypeVar("S")  # a validator's scores (boxes or another kind): what the gate compares is their fitness


class NotEnoughData(RuntimeError):
    """Too few usable annotated tasks to train; the message says how many there are."""


@dataclass
class RunOutcome:
    """What a run produced and whether it is now served."""

    version: Version
    accepted: bool
    reason: str
    metrics: dict = field(default_factory=dict)
    gain: float | None = None  # fitness over the served version on the same held-out tasks


def trained_upto(registry: ProjectRegistry) -> float:
    """Annotations changed after this time are new to every version of the project."""
    return max((v.meta.get("trained_upto", 0.0) for v in registry.versions()), default=0.0)


def known_rows(control: RectangleLabelsControl, base_names: dict[int, str]) -> dict[int, int]:
    """For each label the base model already knows, its class index in the new model and in the base."""
    rows: dict[int, int] = {}
    for base_index, label in sorted(control.model_label_map(base_names, aliases=True).items()):
        rows.setdefault(control.labels.index(label), base_index)
    return rows


def model_names(model) -> dict[int, str]:
    names = getattr(model, "names", None) or {}
    return dict(enumerate(names)) if isinstance(names, list) else dict(names)


def judge(parent: Version | None, names: list[str], fitness: float, held_out: int, only_if_not_worse: bool,
          score_parent: Callable[[], S], must_gain: bool = False) -> tuple[bool, str, S | None, float | None]:
    """Whether a new version replaces the served one: not worse on the same held-out tasks beyond their noise, or,
    with must_gain, measurably better there."""
    if parent is None:
        return True, "first trained version", None, None
    if list(parent.meta.get("labels", [])) != names:
        return True, "the label set changed, so the previous version cannot be compared", None, None
    parent_scores = score_parent()
    gain = fitness - parent_scores.fitness
    if must_gain:
        better = gain >= REFINE_MIN_GAIN
        rule, verdict = f"served only if higher by at least {REFINE_MIN_GAIN}", "no gain"
    else:
        margin = worse_margin(held_out)
        better = gain >= -margin
        rule, verdict = f"served unless lower by more than {margin:.3f}", "worse"
    reason = (f"fitness {fitness:.4f} vs {parent.name} {parent_scores.fitness:.4f} on the same {held_out} held-out "
              f"tasks ({rule})" + ("" if better else f": {verdict}"))
    return better or not only_if_not_worse, reason, parent_scores, gain


def run_training(store: ProjectStore, registry: ProjectRegistry, control: RectangleLabelsControl,
                 fetch: Callable[[dict], Path], base_weights: Path, params: TrainParams, min_annotations: int,
                 accept_only_if_not_worse: bool, keep_versions: int, progress: ProgressFn | None = None,
                 refined: bool = False, default_conf: float = 0.25, refine_round: int = 0,
                 pseudo: list[dict] | None = None, export: bool = False, export_precision: str = "") -> RunOutcome:
    """Train a new version from every stored annotation, warm-starting from the served one.

    pseudo: unlabeled tasks with the served version's confident boxes as their result, trained on but never
    held out, so every version is still judged on human labels only. export: a promoted version is then exported
    to OpenVINO (model.export), checked against PyTorch on its held-out images; a failed export only logs.
    """
    started = time.time()
    annotation_files = list(store.annotations_dir.glob("*.json")) if store.annotations_dir.is_dir() else []
    upto = max((p.stat().st_mtime for p in annotation_files), default=0.0)
    records = store.records()
    if len(records) < max(2, min_annotations):
        raise NotEnoughData(f"project {store.project} has {len(records)} annotated tasks; training starts at {min_annotations}")
    work = registry.root / "runs" / f"run-{int(started * 1000)}"
    try:
        human = {r["task_id"] for r in records}  # a task labeled since its pseudo-label was made keeps the human label
        pseudo = [{**p, "pseudo": True} for p in pseudo or [] if p["task_id"] not in human]
        info = build_dataset(records + pseudo, control, fetch, work / "dataset")
        labeled = len(info.train) - len(info.pseudo) + len(info.val)
        if len(info.train) - len(info.pseudo) < 1 or labeled < max(2, min(min_annotations, len(records))):
            raise NotEnoughData(f"only {labeled} of {len(records)} tasks had usable images: {info.skipped}")
        parent = registry.current()
        parent_ok = parent is not None and parent.weights.is_file()
        start_from = parent.weights if parent_ok else base_weights
        parent_imgsz = (parent.meta.get("plan") or {}).get("imgsz") if parent_ok and not refined else None
        network = checkpoint_model(start_from)
        run_plan = plan(params, len(info.train), [max(size) for size in info.image_sizes], info.box_sides,
                        parent_imgsz, model_cost(network), backbone_layers(network))
        rows = {} if parent_ok else known_rows(control, model_names(network))
        log.info("project %s: training %s on %d train / %d val tasks from %s%s", store.project, run_plan,
                 len(info.train), len(info.val), start_from.name, f", keeping head rows {rows}" if rows else "")
        weights, seconds = train(info.yaml_path, start_from, work / "train", run_plan, params.device, params.seed,
                                 progress, rows)
        scores = evaluate(weights, info.yaml_path, run_plan.imgsz, work, params.device, len(info.val))
        held_out = thresholds.held_out_predictions(weights, info.yaml_path, run_plan.imgsz, params.device)
        from .crosscheck import lent_folds  # crosscheck builds on this module

        lent, lent_from = lent_folds(registry, set(info.train) - set(info.pseudo), info.names) \
            if len(held_out) < CROSSCHECK_IMAGES else ([], None)
        # Pooled from several models, as a cross-check pools them: the bound of the version's own few tasks.
        served_boxes, evidence = thresholds.learn(held_out + lent, info.names, default_conf,
                                                  z=serve_z(len(held_out)) if lent else None)
        accepted, reason, parent_scores, gain = judge(
            parent if parent_ok else None, info.names, scores.fitness, len(info.val), accept_only_if_not_worse,
            lambda: evaluate(parent.weights, info.yaml_path, run_plan.imgsz, work, params.device, len(info.val)),
            must_gain=refined and refinement_must_gain("detect", refine_round))
        meta = {
            "parent": parent.name if parent_ok else None,
            "base_weights": str(start_from),
            "annotations": labeled,
            "pseudo_labeled": len(info.pseudo),
            "pseudo_tasks": info.pseudo,
            "train_tasks": info.train,
            "val_tasks": info.val,
            "held_out_tasks": len(info.val),
            "skipped_tasks": info.skipped,
            "labels": info.names,
            "known_rows": {info.names[new]: old for new, old in rows.items()},
            "metrics": scores.as_dict(),
            "parent_metrics": parent_scores.as_dict() if parent_scores else None,
            "gain": gain,
            "plan": run_plan.__dict__,
            "conf": served_boxes.default,
            "thresholds": served_boxes.as_dict(),
            "threshold_evidence": evidence,
            "lent_folds": lent_from,
            "train_seconds": round(seconds, 1),
            "seconds": round(time.time() - started, 1),
            "trained_upto": upto,
            "reason": reason,
            "refined": refined,
            "refine_round": refine_round,
            "status": "rejected",
        }
        version = registry.add(weights, meta, make_current=accepted)
        thresholds.save_held_out(held_out, version.held_out)
        if accepted and export:  # after it is served, so exporting never delays a version; servers switch to it
            export_version(version, run_plan.imgsz, info.yaml_path.parent / "images" / "val", export_precision)
            version = registry.get(version.name)
        registry.prune(keep_versions)
        log.info("project %s: %s %s (%s)", store.project, version.name, "served" if accepted else "rejected", reason)
        return RunOutcome(version, accepted, reason, scores.as_dict(), gain)
    finally:
        shutil.rmtree(work, ignore_errors=True)
