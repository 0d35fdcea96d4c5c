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


THRESHOLDS = tuple(round(0.1 + 0.05 * i, 2) for i in range(15))  # 0.10 .. 0.80


def best_confidence(weights: Path, data_yaml: Path, imgsz: int, default: float, device: str = "") -> float:
    """The box threshold at which a human would have to touch the fewest boxes on the held-out images.

    Too low and annotators delete false boxes, too high and they draw missed ones; the balance depends on the
    model and the data, so each version learns its own. Ties go to the threshold closest to the default.
    """
    import yaml
    from PIL import Image
    from ultralytics import YOLO

    from .effort import compare
    from .label_config import Box

    root = data_yaml.parent
    names = yaml.safe_load(data_yaml.read_text())["names"]
    images = sorted((root / "images" / "val").iterdir())
    if not images:
        return default
    model = YOLO(str(weights), task="detect")
    touched = dict.fromkeys(THRESHOLDS, 0)
    for path in images:
        with Image.open(path) as image:
            width, height = image.size
        truth = []
        label = root / "labels" / "val" / f"{path.stem}.txt"
        for row in label.read_text().split("\n") if label.is_file() else []:
            if row.strip():
                c, xc, yc, w, h = (float(v) for v in row.split())
                truth.append(Box(names[int(c)], (xc - w / 2) * width, (yc - h / 2) * height,
                                 (xc + w / 2) * width, (yc + h / 2) * height))
        kwargs = {"imgsz": imgsz, "conf": THRESHOLDS[0], "verbose": False, **({"device": device} if device else {})}
        found = model.predict(str(path), **kwargs)[0].boxes.data.cpu().numpy()
        for threshold in THRESHOLDS:
            predicted = [Box(model.names[int(cls)], x1, y1, x2, y2) for x1, y1, x2, y2, score, cls in found
                         if score >= threshold]
            touched[threshold] += compare(predicted, truth).touched
    return min(THRESHOLDS, key=lambda t: (touched[t], abs(t - default)))
