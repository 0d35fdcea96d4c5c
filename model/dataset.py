"""Turn stored Label Studio annotations into a YOLO dataset with a stable held-out split."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .images import probe, write_upright
from .label_config import RectangleLabelsControl

log = logging.getLogger(__name__)

VAL_PERMILLE = 200  # a task is held out for validation when its id hashes below this, forever


def is_held_out(task_id: int) -> bool:
    """Membership never changes as the project grows, so old models are never scored on their training images."""
    return int(hashlib.sha1(str(task_id).encode()).hexdigest(), 16) % 1000 < VAL_PERMILLE


@dataclass
class DatasetInfo:
    """Where the dataset is and what went into it."""

    yaml_path: Path
    names: list[str]
    train: list[int] = field(default_factory=list)
    val: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    unknown_labels: set[str] = field(default_factory=set)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    box_sides: list[float] = field(default_factory=list)  # each labeled box's shorter side in image pixels
    pseudo: list[int] = field(default_factory=list)  # unlabeled tasks trained on with the served model's boxes


def yolo_rows(record: dict, control: RectangleLabelsControl, size: tuple[int, int]) -> tuple[list[str], list[str]]:
    """Label lines 'cls xc yc w h' normalised to the image, plus labels the config no longer has."""
    width, height = size
    boxes, unknown = control.from_result(record.get("result") or [], width, height)
    rows = []
    for box in boxes:
        # Regions carry their own original size; normalise by it so a resized copy still lines up.
        rows.append(
            f"{control.labels.index(box.label)} {(box.x1 + box.x2) / 2 / width:.6f} {(box.y1 + box.y2) / 2 / height:.6f}"
            f" {(box.x2 - box.x1) / width:.6f} {(box.y2 - box.y1) / height:.6f}"
        )
    return rows, unknown


def _region_size(record: dict, upright: tuple[int, int]) -> tuple[int, int]:
    for region in record.get("result") or []:
        if region.get("original_width") and region.get("original_height"):
            return int(region["original_width"]), int(region["original_height"])
    return upright


def build_dataset(records: list[dict], control: RectangleLabelsControl, fetch: Callable[[dict], Path],
                  out_dir: Path, held_out: set[int] | None = None) -> DatasetInfo:
    """Write images and labels for train and val; a task that fails is skipped and named.

    Images are links to the cache, except those whose EXIF orientation turns them: those are written upright (as
    the one decoder, model.images, sees them and Label Studio shows them), so Ultralytics reads them the same way.
    held_out names the tasks to hold out in place of those is_held_out picks (a cross-check fold).
    """
    info = DatasetInfo(out_dir / "data.yaml", list(control.labels))
    chosen = held_out if held_out is not None else {r["task_id"] for r in records if is_held_out(r["task_id"])}
    held = [r for r in records if r["task_id"] in chosen and not r.get("pseudo")]  # judged on humans only
    if not held and len(records) >= 2:
        held = [min(records, key=lambda r: hashlib.sha1(str(r["task_id"]).encode()).hexdigest())]
    held_ids = {r["task_id"] for r in held}
    for split in ("train", "val"):
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
    for record in records:
        task_id = record["task_id"]
        try:
            source = fetch(record)
            image = probe(source)
            actual = (image.width, image.height)
            rows, unknown = yolo_rows(record, control, _region_size(record, actual))
            split = "val" if task_id in held_ids else "train"
            link = out_dir / "images" / split / f"{task_id}.{'jpg' if image.format == 'jpeg' else image.format}"
            if image.rotated:
                write_upright(source, link)
            else:
                link.unlink(missing_ok=True)
                os.symlink(source.resolve(), link)
        except Exception as exc:  # a broken image or an unreachable host costs one task, not the run
            info.skipped[task_id] = str(exc)
            log.warning("task %s left out of training: %s", task_id, exc)
            continue
        info.unknown_labels.update(unknown)
        (out_dir / "labels" / split / f"{task_id}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
        getattr(info, split).append(task_id)
        if record.get("pseudo"):
            info.pseudo.append(task_id)
            continue
        info.image_sizes.append(actual)
        info.box_sides.extend(min(float(w) * actual[0], float(h) * actual[1])
                              for w, h in (row.split()[3:5] for row in rows))
    if info.unknown_labels:
        log.warning("labels not in the config were left out: %s", sorted(info.unknown_labels))
    if not info.val and len(info.train) - len(info.pseudo) >= 2:
        # Every run needs held-out data to be judged on; borrow the last training image when none is left.
        moved = [t for t in info.train if t not in info.pseudo][-1]
        info.train.remove(moved)
        for sub in ("images", "labels"):
            for path in (out_dir / sub / "train").glob(f"{moved}.*"):
                path.rename(out_dir / sub / "val" / path.name)
        info.val.append(moved)
    info.yaml_path.write_text(yaml.safe_dump({
        "path": str(out_dir), "train": "images/train", "val": "images/val",
        "names": dict(enumerate(info.names)),
    }, sort_keys=False))
    return info
