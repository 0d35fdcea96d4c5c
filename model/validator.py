"""Score a model on a dataset's held-out split, the same way for every version."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Scores:
    """Box metrics on the held-out images; fitness weighs them as Ultralytics does."""

    map50: float
    map50_95: float
    precision: float
    recall: float
    images: int

    @property
    def fitness(self) -> float:
        return 0.1 * self.map50 + 0.9 * self.map50_95

    def as_dict(self) -> dict:
        return {**asdict(self), "fitness": self.fitness}


def evaluate(weights: Path, data_yaml: Path, imgsz: int, out_dir: Path, device: str = "", images: int = 0) -> Scores:
    """Validate weights on the dataset's val split with Ultralytics' own metric code."""
    from ultralytics import YOLO

    kwargs = dict(data=str(data_yaml), split="val", imgsz=imgsz, batch=8, workers=0, plots=False, verbose=False,
                  save_json=False, conf=0.001, project=str(out_dir.resolve()), name="val",
                  exist_ok=True)
    if device:
        kwargs["device"] = device
    metrics = YOLO(str(weights), task="detect").val(**kwargs)
    box = metrics.box
    return Scores(float(box.map50), float(box.map), float(box.mp), float(box.mr), images)


def pooled_map50(images) -> float:
    """mAP50 of held-out predictions pooled from several models (model.thresholds.HeldOutImage, boxes at confidence
    0.1 and up), with Ultralytics' AP code: one figure over every pooled task, where a mean of each fold's mAP50 on
    its two tasks would leave out the labels those tasks lack and read far too high."""
    import numpy as np
    import torch
    from ultralytics.utils.metrics import ap_per_class, box_iou

    labels = sorted({b.label for image in images for b in image.truth})
    if not labels:
        return 0.0
    hits, scores, predicted, truth = [], [], [], []
    for image in images:
        boxes = sorted((b for b in image.predicted if b.label in labels), key=lambda b: -(b.score or 0.0))
        taken: set[int] = set()
        if boxes and image.truth:
            iou = box_iou(torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in boxes]),
                          torch.tensor([[b.x1, b.y1, b.x2, b.y2] for b in image.truth])).numpy()
        for i, box in enumerate(boxes):
            candidates = [j for j, t in enumerate(image.truth) if j not in taken and t.label == box.label
                          and iou[i, j] >= 0.5]
            match = max(candidates, key=lambda j: iou[i, j], default=None)
            if match is not None:
                taken.add(match)
            hits.append(match is not None)
            scores.append(box.score or 0.0)
            predicted.append(labels.index(box.label))
        truth.extend(labels.index(t.label) for t in image.truth)
    if not hits:
        return 0.0
    ap = ap_per_class(np.array(hits)[:, None], np.array(scores), np.array(predicted), np.array(truth))[5]
    return float(ap[:, 0].mean())
