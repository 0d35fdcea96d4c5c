"""Learn which boxes a version should serve: the thresholds that leave a reviewer the fewest boxes to touch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .effort import Effort, compare
from .label_config import Box
from .policy import MIN_BOXES_PER_CLASS, NEVER, THRESHOLDS, Thresholds


@dataclass(frozen=True)
class HeldOutImage:
    """One held-out image's candidate boxes (lowest threshold) and its human boxes."""

    predicted: list[Box]
    truth: list[Box]


def held_out_predictions(weights: Path, data_yaml: Path, imgsz: int, device: str = "") -> list[HeldOutImage]:
    """Predict the dataset's val images once at the lowest threshold, sizes taken from the decoded pixels."""
    import yaml
    from ultralytics import YOLO

    from .images import read_image

    root = data_yaml.parent
    names = yaml.safe_load(data_yaml.read_text())["names"]
    model = YOLO(str(weights), task="detect")
    found = []
    for path in sorted((root / "images" / "val").iterdir()):
        kwargs = {"imgsz": imgsz, "conf": THRESHOLDS[0], "verbose": False, **({"device": device} if device else {})}
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


def effort_at(images: list[HeldOutImage], thresholds: Thresholds, label: str | None = None) -> Effort:
    """What a reviewer would do on these images if served the boxes above the thresholds (of one label, or all)."""
    total = Effort()
    for image in images:
        predicted = [b for b in image.predicted if (label is None or b.label == label)
                     and (b.score or 0.0) >= thresholds.of(b.label)]
        truth = [b for b in image.truth if label is None or b.label == label]
        total = total + compare(predicted, truth)
    return total


def learn(images: list[HeldOutImage], labels: list[str], default: float) -> tuple[Thresholds, dict]:
    """One threshold for all labels, then one per label where the held-out images hold enough of its boxes.

    NEVER is a candidate too: when served boxes would cost more to fix than drawing them does, none are served.
    Ties go to serving, and then to the threshold closest to the default.
    """
    candidates = (*THRESHOLDS, NEVER)

    def key(touched: int, t: float) -> tuple:
        return touched, t == NEVER, abs(t - default)

    best = min(candidates, key=lambda t: key(effort_at(images, Thresholds(t, {})).touched, t))
    per_label: dict[str, float] = {}
    counts: dict[str, int] = {}
    for image in images:
        for box in image.truth:
            counts[box.label] = counts.get(box.label, 0) + 1
    for label, count in counts.items():
        if count >= MIN_BOXES_PER_CLASS:
            chosen = min(candidates, key=lambda t: key(effort_at(images, Thresholds(t, {}), label).touched, t))
            if chosen != best:
                per_label[label] = chosen
    thresholds = Thresholds(best, per_label)
    served = effort_at(images, thresholds)
    evidence = {
        "images": len(images), "boxes": served.final, "touched": served.touched,
        "touched_if_none_served": effort_at(images, Thresholds(NEVER, {})).touched,
        "withheld_labels": [label for label in labels if thresholds.of(label) >= NEVER],
    }
    return thresholds, evidence
