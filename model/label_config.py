"""Understand a Label Studio labeling config well enough to know what to predict and train."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException


class ConfigError(ValueError):
    """A labeling config this backend cannot serve; the message says what is missing."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels with a label name."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None


@dataclass(frozen=True)
class ImageControl:
    """What every labeling control of an image has: its name, its image, its labels and their base-model aliases."""

    name: str
    to_name: str
    value_key: str
    labels: tuple[str, ...]
    predicted_values: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def model_label_map(self, model_names: dict[int, str], aliases: bool = True) -> dict[int, str]:
        """Map a model's class indices to our labels by name, case-insensitively; predicted_values only for a base model."""
        wanted: dict[str, str] = {}
        for label in self.labels:
            for alias in (self.predicted_values.get(label) if aliases else None) or (label,):
                wanted.setdefault(alias.strip().lower(), label)
        return {i: wanted[n.lower()] for i, n in model_names.items() if n.lower() in wanted}


@dataclass(frozen=True)
class RectangleLabelsControl(ImageControl):
    """The RectangleLabels control tag: converts between Label Studio regions and pixel boxes."""

    def to_region(self, box: Box, width: int, height: int) -> dict:
        """A Label Studio rectangle region in percent of the image."""
        region = {
            "from_name": self.name,
            "to_name": self.to_name,
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": 100.0 * box.x1 / width,
                "y": 100.0 * box.y1 / height,
                "width": 100.0 * (box.x2 - box.x1) / width,
                "height": 100.0 * (box.y2 - box.y1) / height,
                "rotation": 0,
                "rectanglelabels": [box.label],
            },
        }
        if box.score is not None:
            region["score"] = round(float(box.score), 4)
        return region

    def from_result(self, result: list[dict], width: int | None = None, height: int | None = None) -> tuple[list[Box], list[str]]:
        """Boxes in pixels from an annotation's result, plus the labels we did not know."""
        boxes: list[Box] = []
        unknown: list[str] = []
        for region in result or []:
            if region.get("from_name") != self.name or region.get("type", "").lower() != "rectanglelabels":
                continue
            value = region.get("value") or {}
            names = value.get("rectanglelabels") or []
            w = region.get("original_width") or width
            h = region.get("original_height") or height
            if not names or not w or not h:
                continue
            if names[0] not in self.labels:
                unknown.append(names[0])
                continue
            x1, y1, x2, y2 = _rotated_bounds(value, float(w), float(h))
            x1, y1 = max(0.0, x1), max(0.0, y1)
            x2, y2 = min(float(w), x2), min(float(h), y2)
            if x2 - x1 >= 1 and y2 - y1 >= 1:
                boxes.append(Box(names[0], x1, y1, x2, y2, region.get("score")))
        return boxes, unknown


def _rotated_bounds(value: dict, w: float, h: float) -> tuple[float, float, float, float]:
    """The pixel bounds of a rectangle that Label Studio rotates about its top-left corner."""
    x, y = value.get("x", 0.0) * w / 100, value.get("y", 0.0) * h / 100
    bw, bh = value.get("width", 0.0) * w / 100, value.get("height", 0.0) * h / 100
    angle = math.radians(value.get("rotation") or 0.0)
    if not angle:
        return x, y, x + bw, y + bh
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    return min(xs), min(ys), max(xs), max(ys)


def _attr(element: Element, *names: str) -> str | None:
    for name in names:
        if element.get(name) is not None:
            return element.get(name)
    return None


def parse_label_config(xml: str) -> RectangleLabelsControl:
    """The first RectangleLabels control bound to an Image tag, or a ConfigError saying what is missing."""
    if not xml or not xml.strip():
        raise ConfigError("the label config is empty")
    try:
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise ConfigError(f"the label config is not valid XML: {exc}") from exc
    images = {el.get("name"): el for el in root.iter() if el.tag.lower() == "image" and el.get("name")}
    if not images:
        raise ConfigError("the label config has no <Image> object tag with a name")
    controls = [el for el in root.iter() if el.tag.lower() == "rectanglelabels"]
    if not controls:
        raise ConfigError("the label config has no <RectangleLabels> control: this backend predicts bounding boxes only")
    problems = []
    for control in controls:
        name, to_name = control.get("name"), _attr(control, "toName", "to_name")
        if not name or not to_name:
            problems.append("a <RectangleLabels> lacks name or toName")
            continue
        image = images.get(to_name.split(",")[0])
        if image is None:
            problems.append(f"<RectangleLabels name='{name}'> points at toName='{to_name}', which is not an <Image>")
            continue
        value = image.get("value") or ""
        if not value.startswith("$") or len(value) < 2:
            problems.append(f"<Image name='{to_name}'> needs value='$key' naming the task field with the image")
            continue
        labels, predicted = [], {}
        for label in control.iter():
            if label is control or label.tag.lower() != "label" or not label.get("value"):
                continue
            labels.append(label.get("value"))
            mapped = _attr(label, "predicted_values", "predictedValues")
            if mapped:
                predicted[label.get("value")] = tuple(v.strip() for v in mapped.split(",") if v.strip())
        if not labels:
            problems.append(f"<RectangleLabels name='{name}'> has no <Label value='...'> children")
            continue
        return RectangleLabelsControl(name, to_name.split(",")[0], value[1:], tuple(labels), predicted)
    raise ConfigError("; ".join(problems))
