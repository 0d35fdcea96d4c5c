"""Training sets of the other kinds: YOLO-seg, OBB and pose label rows, and class folders for classification.

The held-out split is the boxes' one (model.dataset.is_held_out), so every control of a project is judged on the
same human-labeled tasks, never on pseudo-labels.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Callable

import yaml

from .dataset import DatasetInfo, _region_size, is_held_out
from .images import probe, write_upright
from .kinds import KeyPointLabelsControl, rotated_corners
from .label_config import RectangleLabelsControl

log = logging.getLogger(__name__)


def class_folder(label: str) -> str:
    """A folder name for a class: the label itself where it is a safe file name (Ultralytics names classes by folder)."""
    return label if re.fullmatch(r"[\w .+()-]{1,100}", label) and label not in (".", "..") else \
        "label-" + hashlib.sha1(label.encode()).hexdigest()[:10]


def uses_rotation(records: list[dict], control: RectangleLabelsControl) -> bool:
    """Whether a project's boxes are rotated: then they are learned as oriented boxes (OBB)."""
    return any(abs(float((r.get("value") or {}).get("rotation") or 0.0)) % 360 > 0.5
               for record in records for r in record.get("result") or []
               if r.get("from_name") == control.name and (r.get("type") or "").lower() == "rectanglelabels")


def label_rows(record: dict, control, task: str, size: tuple[int, int]) -> tuple[list[str], list[str], list[float]]:
    """YOLO label lines for one image of a segment, obb or pose set, unknown labels, and each object's shorter side."""
    width, height = size
    rows, sides = [], []
    result = record.get("result") or []
    if task == "segment":
        polygons, unknown = control.from_result(result, width, height)
        for polygon in polygons:
            coords = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in polygon.points)
            rows.append(f"{control.labels.index(polygon.label)} {coords}")
            xs, ys = [x for x, _ in polygon.points], [y for _, y in polygon.points]
            sides.append(min(max(xs) - min(xs), max(ys) - min(ys)))
        return rows, unknown, sides
    if task == "obb":
        unknown = []
        for region in result:
            value = region.get("value") or {}
            if region.get("from_name") != control.name or not value.get("rectanglelabels"):
                continue
            label = value["rectanglelabels"][0]
            if label not in control.labels:
                unknown.append(label)
                continue
            w, h = region.get("original_width") or width, region.get("original_height") or height
            corners = rotated_corners(value, float(w), float(h))
            rows.append(f"{control.labels.index(label)} " + " ".join(
                f"{min(max(x / w, 0.0), 1.0):.6f} {min(max(y / h, 0.0), 1.0):.6f}" for x, y in corners))
            sides.append(min(value.get("width", 0.0) * w, value.get("height", 0.0) * h) / 100)
        return rows, unknown, sides
    if task == "pose":
        return _pose_rows(result, control, width, height)
    raise ValueError(f"no label rows for task {task}")


def _pose_rows(result: list[dict], control: KeyPointLabelsControl, width: int,
               height: int) -> tuple[list[str], list[str], list[float]]:
    """One row per object: its box, then every keypoint label's x y visibility (0 0 0 where not marked)."""
    points, unknown = control.from_result(result, width, height)
    boxes = []
    for region in result:
        value = region.get("value") or {}
        if (region.get("type") or "").lower() == "rectanglelabels" and region.get("to_name") == control.to_name:
            w, h = region.get("original_width") or width, region.get("original_height") or height
            corners = rotated_corners(value, float(w), float(h))
            xs, ys = [x for x, _ in corners], [y for _, y in corners]
            boxes.append((min(xs), min(ys), max(xs), max(ys)))
    groups: dict[int, list] = {}
    for point in points:
        holding = [i for i, (x1, y1, x2, y2) in enumerate(boxes) if x1 <= point.x <= x2 and y1 <= point.y <= y2]
        owner = min(holding, key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])) if holding else -1
        groups.setdefault(owner, []).append(point)
    rows, sides = [], []
    for owner, members in groups.items():
        if owner >= 0:
            x1, y1, x2, y2 = boxes[owner]
        else:  # no rectangle: the object is the points' bounds, with a margin
            xs, ys = [p.x for p in members], [p.y for p in members]
            pad = 0.1 * max(max(xs) - min(xs), max(ys) - min(ys), 16.0)
            x1, y1 = max(0.0, min(xs) - pad), max(0.0, min(ys) - pad)
            x2, y2 = min(float(width), max(xs) + pad), min(float(height), max(ys) + pad)
        values = []
        for label in control.labels:
            point = next((p for p in members if p.label == label), None)
            values.append(f"{point.x / width:.6f} {point.y / height:.6f} 2" if point else "0 0 0")
        rows.append(f"0 {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} {(x2 - x1) / width:.6f} "
                    f"{(y2 - y1) / height:.6f} " + " ".join(values))
        sides.append(min(x2 - x1, y2 - y1))
    return rows, unknown, sides


def _split(records: list[dict]) -> set[int]:
    held = [r for r in records if is_held_out(r["task_id"]) and not r.get("pseudo")]
    if not held and len(records) >= 2:
        held = [min(records, key=lambda r: hashlib.sha1(str(r["task_id"]).encode()).hexdigest())]
    return {r["task_id"] for r in held}


def _place(source: Path, target: Path, rotated: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if rotated:
        write_upright(source, target)
    else:
        target.unlink(missing_ok=True)
        os.symlink(source.resolve(), target)


def build_kind_dataset(records: list[dict], control, task: str, fetch: Callable[[dict], Path],
                       out_dir: Path) -> DatasetInfo:
    """Write the images and labels of one control for train and val; a task that fails is skipped and named.

    Classification keeps only tasks where the control was answered; a task with several choices is a sample of
    each of them. The other kinds take every annotated task, an empty one as 'nothing here'.
    """
    classify = task == "classify"
    if classify:
        records = [r for r in records if control.from_result(r.get("result") or [])[0]]
        info = DatasetInfo(out_dir, list(control.labels))
    else:
        info = DatasetInfo(out_dir / "data.yaml", ["object"] if task == "pose" else list(control.labels))
    held_ids = _split(records)
    for split in ("train", "val"):
        if classify:
            for label in control.labels:
                (out_dir / split / class_folder(label)).mkdir(parents=True, exist_ok=True)
        else:
            (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
            (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
    for record in records:
        task_id = record["task_id"]
        split = "val" if task_id in held_ids else "train"
        try:
            source = fetch(record)
            image = probe(source)
            actual = (image.width, image.height)
            name = f"{task_id}.{'jpg' if image.format == 'jpeg' else image.format}"
            if classify:
                chosen, unknown = control.from_result(record.get("result") or [])
                for label in chosen:
                    _place(source, out_dir / split / class_folder(label) / name, image.rotated)
                sides: list[float] = []
            else:
                rows, unknown, sides = label_rows(record, control, task, _region_size(record, actual))
                _place(source, out_dir / "images" / split / name, image.rotated)
                (out_dir / "labels" / split / f"{task_id}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
        except Exception as exc:  # a broken image or an unreachable host costs one task, not the run
            info.skipped[task_id] = str(exc)
            log.warning("task %s left out of training: %s", task_id, exc)
            continue
        info.unknown_labels.update(unknown)
        getattr(info, split).append(task_id)
        if record.get("pseudo"):
            info.pseudo.append(task_id)
            continue
        info.image_sizes.append(actual)
        info.box_sides.extend(sides)
    if info.unknown_labels:
        log.warning("labels not in the config were left out: %s", sorted(info.unknown_labels))
    if not info.val and len(info.train) - len(info.pseudo) >= 2:
        moved = [t for t in info.train if t not in info.pseudo][-1]  # borrow one, so every run can be judged
        info.train.remove(moved)
        for path in out_dir.rglob(f"{moved}.*"):
            parts = list(path.relative_to(out_dir).parts)
            parts[parts.index("train")] = "val"
            target = out_dir.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
        info.val.append(moved)
    if classify:
        info.names = sorted(class_folder(label) for label in control.labels)
        return info
    data = {"path": str(out_dir), "train": "images/train", "val": "images/val", "names": dict(enumerate(info.names))}
    if task == "pose":
        data["kpt_shape"] = [len(control.labels), 3]
    info.yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return info
