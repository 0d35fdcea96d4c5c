"""Every control tag of a labeling config as a 'kind': what it labels, which YOLO task learns it, its regions.

One class per control tag, as Label Studio's own ML examples do. Boxes keep their own class
(model.label_config.RectangleLabelsControl) and recipe; polygons, image choices and keypoints are defined here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar
from xml.etree.ElementTree import Element

import numpy as np
from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from .label_config import ConfigError, ImageControl, RectangleLabelsControl, _attr

MAX_POLYGON_POINTS = 64  # a predicted outline is simplified until it has at most this many vertices
POLYGON_TOLERANCE = 0.004  # ... and never by more than this share of the outline's length


@dataclass(frozen=True)
class Polygon:
    """An outline in pixels with a label name."""

    label: str
    points: tuple[tuple[float, float], ...]
    score: float | None = None


@dataclass(frozen=True)
class Keypoint:
    """One labeled point in pixels."""

    label: str
    x: float
    y: float
    score: float | None = None


@dataclass(frozen=True)
class LabelsControl(ImageControl):
    """A control learned by a YOLO task other than detection: its tag, its task and the type of its regions."""

    tag: ClassVar[str] = ""
    task: ClassVar[str] = ""
    result_type: ClassVar[str] = ""

    def _regions(self, result: list[dict]) -> list[dict]:
        return [r for r in result or [] if r.get("from_name") == self.name
                and (r.get("type") or "").lower() == self.result_type]

    def _region(self, value: dict, width: int, height: int, score: float | None) -> dict:
        region = {"from_name": self.name, "to_name": self.to_name, "type": self.result_type,
                  "original_width": width, "original_height": height, "image_rotation": 0, "value": value}
        if score is not None:
            region["score"] = round(float(score), 4)
        return region


@dataclass(frozen=True)
class PolygonLabelsControl(LabelsControl):
    """PolygonLabels: outlines, learned by a YOLO segmentation model."""

    tag: ClassVar[str] = "polygonlabels"
    task: ClassVar[str] = "segment"
    result_type: ClassVar[str] = "polygonlabels"

    def from_result(self, result: list[dict], width: int | None = None,
                    height: int | None = None) -> tuple[list[Polygon], list[str]]:
        """Polygons in pixels from an annotation's result, plus the labels we did not know."""
        found, unknown = [], []
        for region in self._regions(result):
            value = region.get("value") or {}
            names = value.get("polygonlabels") or []
            w = region.get("original_width") or width
            h = region.get("original_height") or height
            points = value.get("points") or []
            if not names or not w or not h or len(points) < 3:
                continue
            if names[0] not in self.labels:
                unknown.append(names[0])
                continue
            pixels = tuple((min(max(float(x), 0.0), 100.0) * w / 100, min(max(float(y), 0.0), 100.0) * h / 100)
                           for x, y in points)
            found.append(Polygon(names[0], pixels, region.get("score")))
        return found, unknown

    def to_region(self, polygon: Polygon, width: int, height: int) -> dict:
        value = {"points": [[round(100.0 * x / width, 3), round(100.0 * y / height, 3)] for x, y in polygon.points],
                 "closed": True, "polygonlabels": [polygon.label]}
        return self._region(value, width, height, polygon.score)


@dataclass(frozen=True)
class ChoicesControl(LabelsControl):
    """Choices on an image: one or (choice="multiple") several classes per image, learned by a YOLO classifier."""

    multiple: bool = False

    tag: ClassVar[str] = "choices"
    task: ClassVar[str] = "classify"
    result_type: ClassVar[str] = "choices"

    def from_result(self, result: list[dict], width: int | None = None,
                    height: int | None = None) -> tuple[list[str], list[str]]:
        """The chosen classes of an annotation (empty when this control was not answered), and unknown ones."""
        chosen, unknown = [], []
        for region in self._regions(result):
            for name in (region.get("value") or {}).get("choices") or []:
                (chosen if name in self.labels else unknown).append(name)
        return list(dict.fromkeys(chosen)), unknown

    def to_result(self, chosen: list[str], score: float) -> dict:
        return {"from_name": self.name, "to_name": self.to_name, "type": "choices",
                "value": {"choices": chosen}, "score": round(float(score), 4)}


@dataclass(frozen=True)
class KeyPointLabelsControl(LabelsControl):
    """KeyPointLabels: the labels are the points of one object (in order), learned by a YOLO pose model.

    Points belong to the object of the smallest rectangle of the same image that holds them; an image without
    rectangles holds one object made of all its points.
    """

    tag: ClassVar[str] = "keypointlabels"
    task: ClassVar[str] = "pose"
    result_type: ClassVar[str] = "keypointlabels"

    def from_result(self, result: list[dict], width: int | None = None,
                    height: int | None = None) -> tuple[list[Keypoint], list[str]]:
        found, unknown = [], []
        for region in self._regions(result):
            value = region.get("value") or {}
            names = value.get("keypointlabels") or []
            w = region.get("original_width") or width
            h = region.get("original_height") or height
            if not names or not w or not h:
                continue
            if names[0] not in self.labels:
                unknown.append(names[0])
                continue
            found.append(Keypoint(names[0], float(value.get("x", 0.0)) * w / 100, float(value.get("y", 0.0)) * h / 100,
                                  region.get("score")))
        return found, unknown

    def to_region(self, point: Keypoint, width: int, height: int) -> dict:
        value = {"x": 100.0 * point.x / width, "y": 100.0 * point.y / height, "width": 0.5,
                 "keypointlabels": [point.label]}
        return self._region(value, width, height, point.score)


Control = RectangleLabelsControl | PolygonLabelsControl | ChoicesControl | KeyPointLabelsControl
_KINDS = {cls.tag: cls for cls in (PolygonLabelsControl, ChoicesControl, KeyPointLabelsControl)}
SUPPORTED = ("RectangleLabels", "PolygonLabels", "Choices", "KeyPointLabels")


def kind_of(control) -> str:
    """'boxes' for RectangleLabels, else the Ultralytics task of the control."""
    return getattr(control, "task", "") or "boxes"


def parse_controls(xml: str) -> list[Control]:
    """Every control of the config bound to an Image that this backend can learn, in config order.

    A config with none is a ConfigError saying what is missing; a broken control is named in it.
    """
    if not xml or not xml.strip():
        raise ConfigError("the label config is empty")
    try:
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise ConfigError(f"the label config is not valid XML: {exc}") from exc
    images = {el.get("name"): el for el in root.iter() if el.tag.lower() == "image" and el.get("name")}
    if not images:
        raise ConfigError("the label config has no <Image> object tag with a name")
    controls: list[Control] = []
    problems: list[str] = []
    for element in root.iter():
        tag = element.tag.lower()
        if tag != "rectanglelabels" and tag not in _KINDS:
            continue
        control = _control(element, tag, images, problems)
        if control is not None:
            controls.append(control)
    if controls:
        return controls
    if problems:
        raise ConfigError("; ".join(problems))
    raise ConfigError(f"the label config has no control this backend learns: one of {', '.join(SUPPORTED)} "
                      "on an <Image>")


def _control(element: Element, tag: str, images: dict, problems: list[str]) -> Control | None:
    name, to_name = element.get("name"), _attr(element, "toName", "to_name")
    shown = element.tag
    if not name or not to_name:
        problems.append(f"a <{shown}> lacks name or toName")
        return None
    image = images.get(to_name.split(",")[0])
    if image is None:
        if tag != "choices":  # choices about a text or audio object are simply not ours
            problems.append(f"<{shown} name='{name}'> points at toName='{to_name}', which is not an <Image>")
        return None
    value = image.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        problems.append(f"<Image name='{to_name}'> needs value='$key' naming the task field with the image")
        return None
    child = "choice" if tag == "choices" else "label"
    labels, predicted = [], {}
    for label in element.iter():
        if label is element or label.tag.lower() != child or not label.get("value"):
            continue
        labels.append(label.get("value"))
        mapped = _attr(label, "predicted_values", "predictedValues")
        if mapped:
            predicted[label.get("value")] = tuple(v.strip() for v in mapped.split(",") if v.strip())
    if not labels:
        problems.append(f"<{shown} name='{name}'> has no <{child.title()} value='...'> children")
        return None
    args = (name, to_name.split(",")[0], value[1:], tuple(labels), predicted)
    if tag == "rectanglelabels":
        return RectangleLabelsControl(*args)
    if tag == "choices":
        return ChoicesControl(*args, multiple=(element.get("choice") or "").lower() == "multiple")
    return _KINDS[tag](*args)


# -- geometry -------------------------------------------------------------------------------------------------------
def simplify(points: np.ndarray, max_points: int = MAX_POLYGON_POINTS) -> np.ndarray:
    """Fewer vertices for a predicted outline: Douglas-Peucker at a small share of its length, then coarser until
    at most max_points remain (a reviewer drags vertices; hundreds of them help nobody)."""
    import cv2

    contour = np.asarray(points, dtype=np.float32).reshape(-1, 1, 2)
    if len(contour) < 3:
        return contour.reshape(-1, 2)
    length = cv2.arcLength(contour, True)
    tolerance = POLYGON_TOLERANCE * length
    simplified = cv2.approxPolyDP(contour, tolerance, True)
    while len(simplified) > max_points:
        tolerance *= 1.5
        simplified = cv2.approxPolyDP(contour, tolerance, True)
    return simplified.reshape(-1, 2)


def polygon_iou(a: Polygon, b: Polygon, grid: int = 256) -> float:
    """Mask IoU of two outlines, rasterised on a grid over their joint bounds."""
    from PIL import Image, ImageDraw

    xs = [x for x, _ in a.points + b.points]
    ys = [y for _, y in a.points + b.points]
    x0, y0 = min(xs), min(ys)
    scale = grid / max(max(xs) - x0, max(ys) - y0, 1e-6)

    def mask(poly: Polygon) -> np.ndarray:
        canvas = Image.new("1", (grid + 1, grid + 1), 0)
        ImageDraw.Draw(canvas).polygon([((x - x0) * scale, (y - y0) * scale) for x, y in poly.points], fill=1)
        return np.asarray(canvas, dtype=bool)

    ma, mb = mask(a), mask(b)
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 0.0


def polygon_area(points: tuple[tuple[float, float], ...]) -> float:
    return 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1])))


def rotated_corners(value: dict, w: float, h: float) -> list[tuple[float, float]]:
    """The four pixel corners of a Label Studio rectangle, which rotates about its top-left corner."""
    x, y = value.get("x", 0.0) * w / 100, value.get("y", 0.0) * h / 100
    bw, bh = value.get("width", 0.0) * w / 100, value.get("height", 0.0) * h / 100
    angle = math.radians(value.get("rotation") or 0.0)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (bw, 0), (bw, bh), (0, bh))]


def ls_rectangle(cx: float, cy: float, bw: float, bh: float, angle: float) -> dict:
    """A rotated box (centre, size, angle in radians clockwise) as Label Studio's x, y, width, height, rotation (px)."""
    cos, sin = math.cos(angle), math.sin(angle)
    x = cx - bw / 2 * cos + bh / 2 * sin
    y = cy - bw / 2 * sin - bh / 2 * cos
    return {"x": x, "y": y, "width": bw, "height": bh, "rotation": math.degrees(angle) % 360}
