"""Read a YOLO-format dataset folder as Label Studio annotations: for benchmarks, tests and imports."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image


@dataclass(frozen=True)
class YoloItem:
    """One labeled image of a YOLO dataset with its original split."""

    image: Path
    split: str
    width: int
    height: int
    rows: list[tuple[int, float, float, float, float]]  # class, x1, y1, x2, y2 normalised


def class_names(root: Path) -> list[str]:
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def _bounds(values: list[float]) -> tuple[float, float, float, float]:
    """A box row (xc yc w h) or a polygon row (x1 y1 x2 y2 ...) as normalised corner bounds."""
    if len(values) == 4:
        xc, yc, w, h = values
        return xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def read_dataset(root: Path) -> list[YoloItem]:
    """Every image with its labels; split.txt gives the original split when present."""
    splits = {}
    if (root / "split.txt").is_file():
        splits = dict(line.split() for line in (root / "split.txt").read_text().splitlines() if line.strip())
    items = []
    for image in sorted((root / "images").iterdir()):
        label = root / "labels" / f"{image.stem}.txt"
        rows = []
        if label.is_file():
            for line in label.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 5:
                    x1, y1, x2, y2 = (min(1.0, max(0.0, v)) for v in _bounds([float(v) for v in parts[1:]]))
                    rows.append((int(parts[0]), x1, y1, x2, y2))
        with Image.open(image) as im:
            width, height = im.size
        items.append(YoloItem(image, splits.get(image.name, "train"), width, height, rows))
    return items


def to_result(item: YoloItem, names: list[str], from_name: str = "label", to_name: str = "image") -> list[dict]:
    """The annotation result a human would have drawn in Label Studio for this image."""
    return [{
        "id": f"r{i}", "from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
        "original_width": item.width, "original_height": item.height, "image_rotation": 0,
        "value": {"x": 100 * x1, "y": 100 * y1, "width": 100 * (x2 - x1), "height": 100 * (y2 - y1),
                  "rotation": 0, "rectanglelabels": [names[cls]]},
    } for i, (cls, x1, y1, x2, y2) in enumerate(item.rows)]


def label_config(names: list[str]) -> str:
    labels = "".join(f'<Label value="{name}"/>' for name in names)
    return f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{labels}</RectangleLabels></View>'
