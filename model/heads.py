"""Seed a segment, classify, pose or oriented-box model from a detector's backbone, so no kind needs a download."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

# Ultralytics' head module of each task and its arguments after the class count.
_HEADS = {"segment": "Segment", "pose": "Pose", "obb": "OBB", "detect": "Detect"}


def checkpoint_task(weights: Path) -> str:
    """The task an Ultralytics checkpoint was trained for ('detect' for older files that do not say)."""
    from .trainer import checkpoint_model

    model = checkpoint_model(weights)
    return getattr(model, "task", None) or "detect"


def kind_yaml(base: dict, task: str, classes: int, kpt_shape: tuple[int, int] | None = None) -> dict:
    """The base network's architecture with the head of another task: detection heads are swapped in place,
    classification keeps the backbone and puts a Classify layer on its last feature map."""
    cfg = copy.deepcopy({k: v for k, v in base.items() if k not in ("yaml_file",)})
    cfg["nc"] = classes
    if task == "classify":
        cfg["head"] = [[-1, 1, "Classify", [classes]]]
        return cfg
    if kpt_shape is not None:
        cfg["kpt_shape"] = list(kpt_shape)
    head = cfg["head"][-1]
    args = {"segment": [classes, 32, 256], "pose": [classes, list(kpt_shape or (17, 3))], "obb": [classes, 1],
            "detect": [classes]}[task]
    cfg["head"][-1] = [head[0], head[1], _HEADS[task], args]
    return cfg


def seeded_model(base_weights: Path, task: str, classes: int, work: Path, kpt_shape: tuple[int, int] | None = None):
    """A YOLO model of `task` whose matching layers are copied from `base_weights`.

    A base already of that task (e.g. an official yolo11n-seg.pt) is returned as it is, to fine-tune directly.
    """
    from ultralytics import YOLO

    from .trainer import checkpoint_model

    network = checkpoint_model(base_weights)
    if (getattr(network, "task", None) or "detect") == task:
        return YOLO(str(base_weights))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"seed-{task}.yaml"
    path.write_text(yaml.safe_dump(kind_yaml(dict(network.yaml), task, classes, kpt_shape), sort_keys=False))
    model = YOLO(str(path), task=task)
    model.load(str(base_weights))  # copies every tensor whose name and shape match: the backbone and neck
    return model
