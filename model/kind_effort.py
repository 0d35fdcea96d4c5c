"""How much a human changed a prediction of polygons, choices or keypoints: the boxes' Effort, counted per kind.

Polygons are kept when the final outline covers the predicted one with mask IoU >= KEEP_IOU; choices are kept or
changed; keypoints are kept when the final point lies within KEYPOINT_KEEP of the predicted one.
"""
from __future__ import annotations

import math

from .effort import KEEP_IOU, MATCH_IOU, Effort, compare, match_greedily
from .kinds import ChoicesControl, Keypoint, KeyPointLabelsControl, Polygon, PolygonLabelsControl, polygon_iou

KEYPOINT_KEEP = 0.02  # share of the image diagonal a point may move and still count as kept
KEYPOINT_MATCH = 0.1  # farther than this share, a final point is a new one and the predicted one was deleted


def compare_polygons(predicted: list[Polygon], final: list[Polygon]) -> Effort:
    pairs = sorted(((polygon_iou(p, f), i, j) for i, p in enumerate(predicted) for j, f in enumerate(final)),
                   reverse=True)
    return match_greedily(pairs, predicted, final, MATCH_IOU, KEEP_IOU, higher_is_closer=True)


def compare_choices(predicted: list[str], final: list[str]) -> Effort:
    """Each predicted choice the human kept is kept, each one removed deleted, each one added added; a single
    choice replaced by another is one relabel."""
    kept = [c for c in predicted if c in final]
    removed = [c for c in predicted if c not in final]
    added = [c for c in final if c not in predicted]
    relabelled = min(len(removed), len(added))
    return Effort(kept=len(kept), relabelled=relabelled, deleted=len(removed) - relabelled,
                  added=len(added) - relabelled, iou_sum=float(len(kept)))


def compare_keypoints(predicted: list[Keypoint], final: list[Keypoint], width: float, height: float) -> Effort:
    diagonal = math.hypot(width, height) or 1.0
    pairs = sorted(((math.hypot(p.x - f.x, p.y - f.y) / diagonal, i, j)
                    for i, p in enumerate(predicted) for j, f in enumerate(final)))
    return match_greedily(pairs, predicted, final, KEYPOINT_MATCH, KEYPOINT_KEEP, higher_is_closer=False)


def _size(result: list[dict]) -> tuple[float, float]:
    for region in result:
        if region.get("original_width") and region.get("original_height"):
            return float(region["original_width"]), float(region["original_height"])
    return 100.0, 100.0


def measure(control, predicted: list[dict], final: list[dict]) -> Effort:
    """The effort of one control between our prediction's result and the submitted result."""
    if isinstance(control, ChoicesControl):
        ours, _ = control.from_result(predicted)
        if not ours:
            return Effort()
        theirs, _ = control.from_result(final)
        return compare_choices(ours, theirs)
    if isinstance(control, PolygonLabelsControl):
        return compare_polygons(control.from_result(predicted)[0], control.from_result(final)[0])
    if isinstance(control, KeyPointLabelsControl):
        width, height = _size(predicted + final)
        return compare_keypoints(control.from_result(predicted)[0], control.from_result(final)[0], width, height)
    return compare(control.from_result(predicted)[0], control.from_result(final)[0])
