"""Learn which boxes a version should serve: the thresholds that leave a reviewer the fewest boxes to touch."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .effort import Effort, compare
from .label_config import Box
from .policy import (MIN_BOXES_PER_CLASS, NEVER, NMS_IOU, SERVE_Z, THIN_LABELS_FOLLOW_FROM_IMAGES, THRESHOLDS,
                     Thresholds, serve_z)


@dataclass(frozen=True)
class HeldOutImage:
    """One held-out image's candidate boxes (lowest threshold) and its human boxes."""

    predicted: list[Box]
    truth: list[Box]


def held_out_predictions(weights: Path, data_yaml: Path, imgsz: int, device: str = "",
                         options: dict | None = None) -> list[HeldOutImage]:
    """Predict the dataset's val images once at the lowest threshold, sizes taken from the decoded pixels.

    options are further Ultralytics predict arguments (NMS overlap, test-time augmentation) a benchmark compares.
    """
    import yaml
    from ultralytics import YOLO

    from .images import read_image

    root = data_yaml.parent
    names = yaml.safe_load(data_yaml.read_text())["names"]
    model = YOLO(str(weights), task="detect")
    kwargs = {"imgsz": imgsz, "conf": THRESHOLDS[0], "iou": NMS_IOU, "verbose": False,
              **({"device": device} if device else {}), **(options or {})}
    found = []
    for path in sorted((root / "images" / "val").iterdir()):
        image = read_image(path)  # the decoder prediction uses, so a version is judged on what it will be shown
        result = model.predict(image, **kwargs)[0]
        height, width = image.shape[:2]
        predicted = [Box(model.names[int(c)], x1, y1, x2, y2, s)
                     for x1, y1, x2, y2, s, c in result.boxes.data.cpu().numpy().tolist()]
        truth = []
        label = root / "labels" / "val" / f"{path.stem}.txt"
        for row in label.read_text().splitlines() if label.is_file() else []:
            if row.strip():
                c, xc, yc, w, h = (float(v) for v in row.split()[:5])
                truth.append(Box(names[int(c)], (xc - w / 2) * width, (yc - h / 2) * height,
                                 (xc + w / 2) * width, (yc + h / 2) * height))
        found.append(HeldOutImage(predicted, truth))
    return found


def save_held_out(images: list[HeldOutImage], path: Path) -> None:
    """Keep a version's held-out predictions, so later evidence can be pooled with them without predicting again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"predicted": [vars(b) for b in i.predicted], "truth": [vars(b) for b in i.truth]}
                                for i in images]))


def load_held_out(path: Path) -> list[HeldOutImage]:
    return [HeldOutImage([Box(**b) for b in image["predicted"]], [Box(**b) for b in image["truth"]])
            for image in json.loads(path.read_text())]


def effort_at(images: list[HeldOutImage], thresholds: Thresholds, label: str | None = None) -> Effort:
    """What a reviewer would do on these images if served the boxes above the thresholds (of one label, or all)."""
    total = Effort()
    for image in images:
        predicted = [b for b in image.predicted if (label is None or b.label == label)
                     and (b.score or 0.0) >= thresholds.of(b.label)]
        truth = [b for b in image.truth if label is None or b.label == label]
        total = total + compare(predicted, truth)
    return total


def saving_bound(effort: Effort, z: float) -> float:
    """The boxes a reviewer saves against drawing them all (kept minus false; a moved box costs what drawing does),
    less z times its spread."""
    return effort.kept - effort.deleted - z * math.sqrt(effort.kept + effort.deleted)


def learn(images: list[HeldOutImage], labels: list[str], default: float,
          z: float | None = None) -> tuple[Thresholds, dict]:
    """The thresholds whose served boxes save a reviewer work with confidence, or NEVER where none do.

    A threshold is judged by its saving's lower bound (saving - z * spread), not by the saving seen on the few
    held-out images: there, a threshold that looks best is often lucky, and held-out images without a box of some
    label say nothing about serving it. No confident saving, nothing served. One threshold for all labels, then each
    label seen on the held-out images is served at its own threshold (with MIN_BOXES_PER_CLASS boxes) or the shared
    one, or withheld, by the bound with SERVE_Z; on THIN_LABELS_FOLLOW_FROM_IMAGES images or more, a label with few
    boxes follows the shared threshold unless its boxes were seen to cost more than they saved. The shared threshold
    and, last, all that would be served together are judged with serve_z(images), wider on few images: there a
    label's few right boxes may be one easy image's luck, and labels never seen on the held-out images, which follow
    the shared threshold, add no evidence at all. z overrides serve_z for evidence pooled from several models.
    """
    z = serve_z(len(images)) if z is None else z

    def bound(t: float, label: str | None = None) -> float:
        return saving_bound(effort_at(images, Thresholds(t, {}), label), z if label is None else SERVE_Z)

    def pick(options, label: str | None = None) -> float:
        chosen = max(options, key=lambda t: (bound(t, label), -abs(t - default)))
        return chosen if bound(chosen, label) > 0 else NEVER

    best = pick(THRESHOLDS)
    counts: dict[str, int] = {}
    for image in images:
        for box in image.truth + image.predicted:
            counts.setdefault(box.label, 0)
        for box in image.truth:
            counts[box.label] += 1
    per_label: dict[str, float] = {}
    for label, count in counts.items():
        if count >= MIN_BOXES_PER_CLASS or best == NEVER:
            chosen = pick(THRESHOLDS, label)
        elif len(images) >= THIN_LABELS_FOLLOW_FROM_IMAGES:
            seen = effort_at(images, Thresholds(best, {}), label)
            chosen = NEVER if seen.kept < seen.deleted else best
        else:
            chosen = pick((best,), label)
        if chosen != best:
            per_label[label] = chosen
    thresholds = Thresholds(best, per_label)
    if saving_bound(effort_at(images, thresholds), z) <= 0:
        thresholds = Thresholds(NEVER, {})
    served = effort_at(images, thresholds)
    evidence = {
        "images": len(images), "boxes": served.final, "touched": served.touched,
        "touched_if_none_served": effort_at(images, Thresholds(NEVER, {})).touched,
        "withheld_labels": [label for label in labels if thresholds.of(label) >= NEVER],
    }
    return thresholds, evidence
