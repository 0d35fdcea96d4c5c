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
