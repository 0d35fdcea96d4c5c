"""Cross-checked thresholds: two held-out tasks are too few to decide which boxes every annotator is served.

While the served version rests on fewer than CROSSCHECK_IMAGES held-out tasks, idle runs train its recipe again
from the base, each with another group of its training tasks held out (a fold), and predict that group. When the
last fold is done, the held-out predictions of the version and of the folds are pooled, the thresholds are learned
again on all of them, and the same weights are served as a new version with those thresholds, its boxes fused with
the fold models' (model/fusion.py).
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

from . import thresholds
from .dataset import build_dataset
from .label_config import RectangleLabelsControl
from .pipeline import NotEnoughData, RunOutcome, known_rows, model_names
from .policy import CROSSCHECK_IMAGES, LEND_FOLDS_FROM_SHARE, serve_z
from .project_store import ProjectStore
from .registry import MEMBERS, ProjectRegistry, Version, read_json, write_json
from .runtime import export_folder
from .trainer import ProgressFn, TrainParams, backbone_layers, checkpoint_model, model_cost, plan, train
from .validator import pooled_map50

log = logging.getLogger(__name__)


def folds(train_tasks: list[int], held_out: int) -> list[list[int]]:
    """Groups of training tasks the size of the version's held-out set (two at least), as many as bring the
    evidence to CROSSCHECK_IMAGES tasks or use up the tasks."""
    size = max(2, held_out)
    ordered = sorted(train_tasks, key=lambda task: hashlib.sha1(f"fold-{task}".encode()).hexdigest())
    groups = [ordered[i:i + size] for i in range(0, len(ordered), size)]
    return groups[:max(0, math.ceil((CROSSCHECK_IMAGES - held_out) / size))]


def more_models(done: list[dict]) -> str:
    """How many models the folds trained, in words: a fold whose images were all broken trained none."""
    trained = sum(1 for fold in done if fold.get("tasks"))
    return f"{trained} more model{'' if trained == 1 else 's'}"


def _state_file(registry: ProjectRegistry, version: Version) -> Path:
    return registry.crosscheck_dir / f"{version.name}.json"


def _fold_file(registry: ProjectRegistry, version: str, index: int) -> Path:
    return registry.crosscheck_dir / f"{version}-fold{index}.json"


def _fold_models(registry: ProjectRegistry, version: str) -> Path:
    return registry.crosscheck_dir / version / MEMBERS


def lent_folds(registry: ProjectRegistry, train_tasks: set[int],
               labels: list[str]) -> tuple[list[thresholds.HeldOutImage], dict | None]:
    """The last finished cross-check's fold predictions of tasks a new version trains on, and where they come from.

    A version after a cross-check holds out as few tasks as the one before it; until its own cross-check runs (it
    waits for idle time, which active labeling never leaves), those folds' models, which never saw their tasks, still
    say more about the recipe's boxes than two or three tasks do, while they trained on LEND_FOLDS_FROM_SHARE of the
    version's tasks (README, "Folds lent to the next version"). Folds of another label set judge other boxes: none.
    """
    checked = next((v for v in reversed(registry.versions()) if v.meta.get("crosscheck")), None)
    if checked is None or checked.meta.get("labels") != labels:
        return [], None
    images, lent = [], []
    for index, fold in enumerate(checked.meta["crosscheck"]["folds"]):
        path = _fold_file(registry, checked.meta["parent"], index)
        recent = len(fold.get("trained_on") or []) >= LEND_FOLDS_FROM_SHARE * len(train_tasks)
        if fold.get("tasks") and set(fold["tasks"]) <= train_tasks and recent and path.is_file():
            images += thresholds.load_held_out(path)
            lent.append(fold)
    return images, ({"from": checked.name, "folds": lent, "tasks": len(images)} if lent else None)


def pending(registry: ProjectRegistry) -> tuple[Version, list[list[int]], int] | None:
    """The served version, its folds and how many are done, while its thresholds rest on too few tasks."""
    version = registry.current()
    if version is None or version.meta.get("crosscheck") or not version.held_out.is_file() \
            or not version.weights.is_file() or "pseudo_tasks" not in version.meta:
        return None
    held = len(version.meta.get("val_tasks") or [])
    human = sorted(set(version.meta.get("train_tasks") or []) - set(version.meta["pseudo_tasks"]))
    groups = folds(human, held)
    done = len(read_json(_state_file(registry, version), {}).get("folds", []))
    return (version, groups, done) if held < CROSSCHECK_IMAGES and done < len(groups) else None


def run_crosscheck(store: ProjectStore, registry: ProjectRegistry, control: RectangleLabelsControl,
                   fetch: Callable[[dict], Path], base_weights: Path, params: TrainParams,
                   default_conf: float = 0.25, progress: ProgressFn | None = None) -> RunOutcome:
    """Train and predict the served version's next fold; after the last, serve its weights with pooled thresholds."""
    found = pending(registry)
    if found is None:
        raise NotEnoughData("nothing to cross-check: the served version's thresholds rest on enough tasks")
    version, groups, index = found
    fold = set(groups[index])
    tasks = set(version.meta["train_tasks"]) | set(version.meta["val_tasks"])
    records = [r for r in store.records() if r["task_id"] in tasks]  # the version's own human labels
    started = time.time()
    work = registry.root / "runs" / f"crosscheck-{int(started * 1000)}"
    images, done = [], {"tasks": []}
    try:
        info = build_dataset(records, control, fetch, work / "dataset", held_out=fold)
        if info.train and info.val and set(info.val) <= fold:  # else the fold's images are broken: it adds nothing
            network = checkpoint_model(base_weights)
            run_plan = plan(params, len(info.train), [max(size) for size in info.image_sizes], info.box_sides,
                            (version.meta.get("plan") or {}).get("imgsz"), model_cost(network),
                            backbone_layers(network))
            log.info("project %s: cross-checking %s, fold %d of %d (tasks %s), %s", store.project, version.name,
                     index + 1, len(groups), info.val, run_plan)
            weights, seconds = train(info.yaml_path, base_weights, work / "train", run_plan, params.device,
                                     params.seed, progress, known_rows(control, model_names(network)))
            images = thresholds.held_out_predictions(weights, info.yaml_path, run_plan.imgsz, params.device)
            kept = _fold_models(registry, version.name)  # served with the version once every fold is done
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy2(weights, kept / f"fold{index}.pt")
            done = {"tasks": info.val, "trained_on": info.train, "seconds": round(seconds, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    thresholds.save_held_out(images, _fold_file(registry, version.name, index))
    state = read_json(_state_file(registry, version), {"version": version.name, "folds": []})
    state["folds"].append(done)
    write_json(_state_file(registry, version), state)
    if index + 1 < len(groups):
        reason = f"cross-check fold {index + 1} of {len(groups)} of {version.name} done (tasks {done['tasks']})"
        return RunOutcome(version, False, reason)
    return _serve_pooled(registry, version, state["folds"], default_conf)


def _serve_pooled(registry: ProjectRegistry, version: Version, done: list[dict], default_conf: float) -> RunOutcome:
    """The version's weights as a new version, with thresholds learned on its own and every fold's predictions and
    the fold models as its members."""
    pooled = thresholds.load_held_out(version.held_out)
    for index in range(len(done)):
        pooled += thresholds.load_held_out(_fold_file(registry, version.name, index))
    own = len(version.meta.get("val_tasks") or [])
    # The pooled tasks come from several models, which spread more than one model does: keep the bound of few tasks.
    served, evidence = thresholds.learn(pooled, version.meta["labels"], default_conf, z=serve_z(own))
    map50 = pooled_map50(pooled)
    members = _fold_models(registry, version.name)
    fused = len(list(members.glob("*.pt")))
    reason = (f"thresholds of {version.name} cross-checked on {len(pooled)} tasks: its {own} held-out ones and "
              f"{len(pooled) - own} held out of {more_models(done)} of its recipe"
              + (f"; its boxes fused with those {fused} models'" if fused else ""))
    meta = {key: value for key, value in version.meta.items() if key not in ("version", "created", "status")}
    meta.update(parent=version.name, conf=served.default, thresholds=served.as_dict(), threshold_evidence=evidence,
                crosscheck={"folds": done, "tasks": len(pooled), "map50": round(map50, 4)}, fused_models=fused,
                reason=reason, gain=None)
    still_served = registry.current_name() == version.name  # a rollback meanwhile keeps its choice
    companions = [folder for folder in (export_folder(version.weights), members) if folder.is_dir()]
    checked = registry.add(version.weights, meta, make_current=still_served, companions=companions)
    shutil.rmtree(members.parent, ignore_errors=True)
    thresholds.save_held_out(pooled, checked.held_out)
    log.info("project %s: %s %s (%s)", registry.project, checked.name, "served" if still_served else "kept", reason)
    return RunOutcome(checked, still_served, reason, {"map50": round(map50, 4), "tasks": len(pooled)})
