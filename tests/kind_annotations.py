"""Label Studio results for polygons, choices, keypoints and rotated boxes, made from the real datasets in ../shared."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tests.conftest import recorded

POLY_CHOICE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<PolygonLabels name="outline" toName="image"><Label value="pothole"/></PolygonLabels>'
    '<Choices name="size" toName="image"><Choice value="one"/><Choice value="several"/></Choices></View>')


@dataclass(frozen=True)
class SegItem:
    """One image of a YOLO-seg dataset: its outlines as (class, [(x, y) normalised, ...])."""

    image: Path
    split: str
    width: int
    height: int
    outlines: list[tuple[int, list[tuple[float, float]]]]


def read_seg(root: Path) -> list[SegItem]:
    splits = dict(line.split() for line in (root / "split.txt").read_text().splitlines() if line.strip())
    items = []
    for image in sorted((root / "images").iterdir()):
        outlines = []
        label = root / "labels" / f"{image.stem}.txt"
        for line in label.read_text().splitlines() if label.is_file() else []:
            values = line.split()
            if len(values) >= 7:
                coords = [min(1.0, max(0.0, float(v))) for v in values[1:]]
                outlines.append((int(values[0]), list(zip(coords[0::2], coords[1::2]))))
        with Image.open(image) as im:
            width, height = im.size
        items.append(SegItem(image, splits.get(image.name, "train"), width, height, outlines))
    return items


def polygon_result(item: SegItem, names: list[str], from_name: str = "outline") -> list[dict]:
    return [{"id": f"p{i}", "from_name": from_name, "to_name": "image", "type": "polygonlabels",
             "original_width": item.width, "original_height": item.height, "image_rotation": 0,
             "value": {"points": [[100 * x, 100 * y] for x, y in points], "closed": True,
                       "polygonlabels": [names[cls]]}}
            for i, (cls, points) in enumerate(item.outlines)]


def choice_result(choices: list[str], from_name: str = "size") -> list[dict]:
    return [{"id": "c0", "from_name": from_name, "to_name": "image", "type": "choices",
             "value": {"choices": choices}}]


def size_choice(item: SegItem) -> str:
    """A real property of the human outlines: one pothole or several."""
    return "one" if len(item.outlines) <= 1 else "several"


def event(project: int, task_id: int, image_ref: str, result: list[dict], config: str) -> dict:
    body = copy.deepcopy(recorded("webhook_ANNOTATION_CREATED"))
    body["project"]["id"] = project
    body["project"]["label_config"] = config
    body["task"].update(id=task_id, project=project, data={"image": image_ref})
    body["annotation"].update(id=1000 + task_id, task=task_id, project=project, result=result, was_cancelled=False,
                              updated_at=f"2026-11-24T06:{task_id % 60:02d}:00Z")
    return body


def crops(root: Path, names: list[str], per_class: int, out: Path) -> list[tuple[Path, str]]:
    """Box crops of a detection dataset as a classification set: each crop is one class, as a human drew it."""
    from model.yolo_import import read_dataset

    out.mkdir(parents=True, exist_ok=True)
    counts = {n: 0 for n in names}
    found = []
    for item in read_dataset(root):
        if item.split != "train":
            continue
        for k, (cls, x1, y1, x2, y2) in enumerate(item.rows):
            name = names[cls]
            if counts[name] >= per_class or (x2 - x1) * item.width < 12 or (y2 - y1) * item.height < 12:
                continue
            with Image.open(item.image) as im:
                crop = im.convert("RGB").crop((x1 * item.width, y1 * item.height, x2 * item.width, y2 * item.height))
            path = out / f"{item.image.stem}-{k}.jpg"
            crop.save(path)
            counts[name] += 1
            found.append((path, name))
        if all(c >= per_class for c in counts.values()):
            break
    return found


def rotated_box_result(item: SegItem, from_name: str = "label") -> list[dict]:
    """Each outline's minimum-area rotated rectangle, as Label Studio stores a rotated box (top-left corner, degrees)."""
    import cv2
    import numpy as np

    from model.kinds import ls_rectangle

    regions = []
    for i, (_, points) in enumerate(item.outlines):
        pixels = np.array([(x * item.width, y * item.height) for x, y in points], dtype=np.float32)
        (cx, cy), (w, h), angle = cv2.minAreaRect(pixels)
        box = ls_rectangle(cx, cy, w, h, np.radians(angle))
        regions.append({"id": f"r{i}", "from_name": from_name, "to_name": "image", "type": "rectanglelabels",
                        "original_width": item.width, "original_height": item.height, "image_rotation": 0,
                        "value": {"x": 100 * box["x"] / item.width, "y": 100 * box["y"] / item.height,
                                  "width": 100 * box["width"] / item.width, "height": 100 * box["height"] / item.height,
                                  "rotation": box["rotation"], "rectanglelabels": ["pothole"]}})
    return regions


def keypoint_result(item: SegItem, from_name: str = "ends") -> list[dict]:
    """Each outline's leftmost and rightmost vertex as keypoints 'left' and 'right', inside the outline's box."""
    regions = []
    for i, (_, points) in enumerate(item.outlines):
        xs, ys = [x for x, _ in points], [y for _, y in points]
        regions.append({"id": f"b{i}", "from_name": "object", "to_name": "image", "type": "rectanglelabels",
                        "original_width": item.width, "original_height": item.height,
                        "value": {"x": 100 * min(xs), "y": 100 * min(ys), "width": 100 * (max(xs) - min(xs)),
                                  "height": 100 * (max(ys) - min(ys)), "rotation": 0, "rectanglelabels": ["pothole"]}})
        for label, (x, y) in (("left", min(points)), ("right", max(points))):
            regions.append({"id": f"k{i}{label}", "from_name": from_name, "to_name": "image",
                            "type": "keypointlabels", "original_width": item.width, "original_height": item.height,
                            "value": {"x": 100 * x, "y": 100 * y, "width": 1, "keypointlabels": [label]}})
    return regions
