"""Several models' boxes of one image fused into one set: where models trained on other tasks agree, a box is surer
and sits nearer the object than any one model's (README, "Fold models fused")."""
from __future__ import annotations

import numpy as np

from .policy import FUSE_IOU, FUSE_MIN_SCORE


def overlaps(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one row (x1, y1, x2, y2, ...) with each of `boxes`' rows."""
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def fuse(found: list[np.ndarray], iou: float = FUSE_IOU) -> np.ndarray:
    """Weighted boxes fusion of each member's rows (x1, y1, x2, y2, score, class) on one image.

    Boxes are taken surest first; one overlapping a cluster of its class by at least `iou` joins it, and a cluster
    becomes the score-weighted mean of its boxes, scored by their sum over the members (a member that found
    nothing there adds 0), so a box only one of five models sees keeps a fifth of its score.
    """
    members = len(found)
    rows = np.concatenate([f[:, :6] for f in found]) if found else np.zeros((0, 6))
    rows = rows[rows[:, 4] >= FUSE_MIN_SCORE]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    clusters: list[list[np.ndarray]] = []
    fused = np.zeros((0, 6))
    for row in rows:
        same = np.flatnonzero(fused[:, 5] == row[5])
        overlap = overlaps(row, fused[same]) if len(same) else np.zeros(0)
        if len(overlap) and overlap.max() >= iou:
            index = same[int(overlap.argmax())]
            clusters[index].append(row)
        else:
            index = len(clusters)
            clusters.append([row])
            fused = np.vstack([fused, row])
        boxes = np.array(clusters[index])
        weights = boxes[:, 4:5]
        fused[index, :4] = (boxes[:, :4] * weights).sum(0) / weights.sum()
        fused[index, 4] = weights.sum() / max(members, len(boxes))
    return fused[np.argsort(-fused[:, 4], kind="stable")]
