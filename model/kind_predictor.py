"""Predict polygons, choices, keypoints and rotated boxes as Label Studio regions, with a task score per image."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kind_dataset import class_folder
from .kinds import Keypoint, Polygon, ls_rectangle, simplify
from .policy import KEYPOINT_MIN_VISIBILITY, MULTI_CHOICE_MIN
from .predictor import CANDIDATE_CONF, LoadedModel, image_uncertainty


@dataclass(frozen=True)
class KindPrediction:
    """One image's regions of one control and how sure the model is of the whole image."""

    regions: list[dict]
    uncertainty: float

    @property
    def score(self) -> float:
        return round(1.0 - self.uncertainty, 4)


def kind_label_map(control, task: str, model_names: dict[int, str], aliases: bool) -> dict[int, str]:
    """Model class index to our label: by name (a classifier's classes are its folder names), then by alias."""
    if task == "pose":
        return {i: "object" for i in model_names}  # a pose model has one class: the object its points belong to
    found = control.model_label_map(model_names, aliases)
    if task == "classify":
        folders = {class_folder(label).lower(): label for label in control.labels}
        found.update({i: folders[n.lower()] for i, n in model_names.items() if n.lower() in folders})
    return found


def predict_kind(model: LoadedModel, images: list[np.ndarray], control, task: str, label_map: dict[int, str],
                 imgsz: int, conf: float, batch: int, device: str = "") -> list[KindPrediction]:
    """Run the model over BGR images in batches and turn each result into the control's regions."""
    out: list[KindPrediction] = []
    kwargs = {"imgsz": imgsz, "verbose": False}
    if task != "classify":
        kwargs["conf"] = CANDIDATE_CONF
    if device:
        kwargs["device"] = device
    for start in range(0, len(images), max(1, batch)):
        with model.lock:
            results = model.yolo.predict(images[start:start + batch], **kwargs)
        for image, result in zip(images[start:start + batch], results):
            height, width = image.shape[:2]
            convert = {"classify": _choices, "segment": _polygons, "pose": _keypoints, "obb": _rotated}[task]
            out.append(convert(result, control, label_map, conf, width, height))
    return out


def _choices(result, control, label_map: dict[int, str], conf: float, width: int, height: int) -> KindPrediction:
    """The top class, and with choice="multiple" every class at least MULTI_CHOICE_MIN probable.

    Uncertainty is the margin between the two most probable classes: a coin flip between two is 1, certainty 0.
    """
    probs = result.probs.data.cpu().numpy() if result.probs is not None else np.zeros(0)
    ours: dict[str, float] = {}
    for index, p in enumerate(probs.tolist()):
        label = label_map.get(index)
        if label is not None:
            ours[label] = ours.get(label, 0.0) + p
    if not ours:
        return KindPrediction([], 0.0)
    ranked = sorted(ours.items(), key=lambda kv: kv[1], reverse=True)
    top, p1 = ranked[0]
    p2 = ranked[1][1] if len(ranked) > 1 else 0.0
    chosen = [top] + ([label for label, p in ranked[1:] if p >= MULTI_CHOICE_MIN] if control.multiple else [])
    return KindPrediction([control.to_result(chosen, p1)], float(min(1.0, max(0.0, 1.0 - (p1 - p2)))))


def _polygons(result, control, label_map: dict[int, str], conf: float, width: int, height: int) -> KindPrediction:
    regions, candidates = [], []
    if result.boxes is None or result.masks is None:
        return KindPrediction([], 0.0)
    data = result.boxes.data.cpu().numpy()
    for (score, cls), outline in zip(data[:, 4:6].tolist(), result.masks.xy):
        label = label_map.get(int(cls))
        if label is None:
            continue
        candidates.append(float(score))
        if score < conf or len(outline) < 3:
            continue
        points = simplify(np.asarray(outline))
        if len(points) >= 3:
            polygon = Polygon(label, tuple((float(x), float(y)) for x, y in points), float(score))
            regions.append(control.to_region(polygon, width, height))
    return KindPrediction(regions, image_uncertainty(candidates))


def _keypoints(result, control, label_map: dict[int, str], conf: float, width: int, height: int) -> KindPrediction:
    regions, candidates = [], []
    if result.boxes is None or result.keypoints is None:
        return KindPrediction([], 0.0)
    scores = result.boxes.conf.cpu().numpy().tolist()
    points = result.keypoints.data.cpu().numpy()  # (objects, keypoints, 3): x, y, visibility
    for score, object_points in zip(scores, points):
        candidates.append(float(score))
        if score < conf:
            continue
        for label, row in zip(control.labels, object_points):
            visible = float(row[2]) if len(row) > 2 else 1.0
            if visible >= KEYPOINT_MIN_VISIBILITY:
                regions.append(control.to_region(Keypoint(label, float(row[0]), float(row[1]), float(score)),
                                                 width, height))
    return KindPrediction(regions, image_uncertainty(candidates))


def _rotated(result, control, label_map: dict[int, str], conf: float, width: int, height: int) -> KindPrediction:
    regions, candidates = [], []
    if result.obb is None:
        return KindPrediction([], 0.0)
    for (cx, cy, bw, bh, angle), score, cls in zip(result.obb.xywhr.cpu().numpy().tolist(),
                                                   result.obb.conf.cpu().numpy().tolist(),
                                                   result.obb.cls.cpu().numpy().tolist()):
        label = label_map.get(int(cls))
        if label is None:
            continue
        candidates.append(float(score))
        if score < conf:
            continue
        box = ls_rectangle(cx, cy, bw, bh, angle)
        value = {"x": 100.0 * box["x"] / width, "y": 100.0 * box["y"] / height,
                 "width": 100.0 * box["width"] / width, "height": 100.0 * box["height"] / height,
                 "rotation": box["rotation"], "rectanglelabels": [label]}
        regions.append({"from_name": control.name, "to_name": control.to_name, "type": "rectanglelabels",
                        "original_width": width, "original_height": height, "image_rotation": 0,
                        "value": value, "score": round(float(score), 4)})
    return KindPrediction(regions, image_uncertainty(candidates))
