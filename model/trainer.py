"""Fine-tune a YOLO model on a small dataset within a time budget."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainParams:
    """Knobs a user may set; zero or negative values mean 'choose from the data'."""

    epochs: int = 0
    imgsz: int = 0
    time_budget: float = 60.0
    freeze: int = -1
    batch: int = 8
    device: str = ""
    seed: int = 0


@dataclass(frozen=True)
class TrainPlan:
    """What a run will actually do, recorded in the version's metadata."""

    epochs: int
    imgsz: int
    freeze: int
    batch: int
    time_budget: float


STEPS_TARGET = 400  # optimizer steps a few-shot fine-tune wants when time allows
BACKBONE_LAYERS = 10  # the backbone of YOLOv5u/v8/11 models ends at layer 9


def plan(params: TrainParams, n_train: int, image_sizes: list[tuple[int, int]]) -> TrainPlan:
    """Adapt epochs, image size and freezing to how much data there is."""
    batch = max(1, min(params.batch, n_train))
    if params.imgsz > 0:
        imgsz = params.imgsz
    else:
        longest = sorted(max(w, h) for w, h in image_sizes)[len(image_sizes) // 2] if image_sizes else 640
        imgsz = max(64, min(640, int(math.ceil(longest / 32) * 32)))
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    epochs = params.epochs if params.epochs > 0 else max(10, min(300, STEPS_TARGET // steps_per_epoch))
    freeze = params.freeze if params.freeze >= 0 else (BACKBONE_LAYERS if n_train < 200 else 0)
    return TrainPlan(epochs, imgsz, freeze, batch, params.time_budget)


def train(data_yaml: Path, weights: Path, run_dir: Path, run_plan: TrainPlan, device: str = "",
          seed: int = 0, progress: ProgressFn | None = None) -> tuple[Path, float]:
    """Run Ultralytics training and return the trained weights and the seconds it took."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    if progress is not None:
        model.add_callback("on_fit_epoch_end", lambda trainer: progress(trainer.epoch + 1, trainer.epochs))
    started = time.monotonic()
    kwargs = dict(
        data=str(data_yaml), epochs=run_plan.epochs, imgsz=run_plan.imgsz, batch=run_plan.batch,
        freeze=run_plan.freeze or None, workers=0, project=str(run_dir.parent.resolve()), name=run_dir.name,
        exist_ok=True, val=False, plots=False, verbose=False, seed=seed, deterministic=False,
        nbs=run_plan.batch,  # step the optimizer every batch: accumulation over 64 images starves tiny datasets
        warmup_epochs=min(3.0, run_plan.epochs / 10), patience=0, amp=False, cache=False,
    )
    if run_plan.time_budget > 0:
        kwargs["time"] = run_plan.time_budget / 3600
    if device:
        kwargs["device"] = device
    model.train(**kwargs)
    out = run_dir / "weights"
    best = out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"
    return best, time.monotonic() - started
