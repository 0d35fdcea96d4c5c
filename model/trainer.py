"""Fine-tune a YOLO model on a small dataset within a time budget."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import compute, policy

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainParams:
    """Knobs a user may set; zero or negative values mean 'choose from the data'."""

    epochs: int = 0
    imgsz: int = 0
    time_budget: float = 60.0
    freeze: int = -1  # layers kept as pretrained from the input side; negative: the base model's backbone
    batch: int = 4
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


def _gpu(device: str) -> bool:
    import torch

    return device != "cpu" and torch.cuda.is_available()


def checkpoint_model(weights: Path):
    """The network stored in an Ultralytics checkpoint, read without building a trainer."""
    import torch

    checkpoint = torch.load(str(weights), map_location="cpu", weights_only=False)
    return checkpoint.get("ema") or checkpoint.get("model")


def model_cost(model) -> float:
    """How much slower than the YOLOv5n-sized reference one training pass of this network is."""
    parameters = sum(p.numel() for p in model.parameters()) if model is not None else policy.REFERENCE_PARAMETERS
    return max(0.25, parameters / policy.REFERENCE_PARAMETERS)


def backbone_layers(model) -> int:
    """How many of the network's first layers are its backbone (as its architecture file says)."""
    spec = getattr(model, "yaml", None)
    return len(spec.get("backbone") or []) if isinstance(spec, dict) else 0


def plan(params: TrainParams, n_train: int, image_sides: list[int], box_sides: list[float],
         parent_imgsz: int | None = None, cost: float = 1.0, backbone: int = 0) -> TrainPlan:
    """Adapt epochs and image size to the objects, the data and the time budget (see model/policy.py).

    A run that continues a trained version keeps its image size, so objects keep the scale it learned.
    """
    batch = max(1, min(params.batch, n_train))
    epochs = params.epochs if params.epochs > 0 else policy.target_epochs(n_train)
    freeze = backbone if params.freeze < 0 else params.freeze
    cost *= policy.FROZEN_BACKBONE_COST if freeze else 1.0
    if params.imgsz > 0:
        imgsz = params.imgsz
    elif parent_imgsz:
        imgsz = parent_imgsz
    else:
        imgsz = policy.choose_imgsz(params.time_budget, n_train, epochs, image_sides, box_sides, compute.cores(),
                                    _gpu(params.device), cost)
    return TrainPlan(epochs, imgsz, freeze, batch, params.time_budget)


def keep_known_rows(model, base_model, rows: dict[int, int]) -> None:
    """Copy the base model's classifier rows for labels it already knows into the new head (new index: base index)."""
    import torch

    head, base_head = model.model[-1], base_model.model[-1]
    if not rows or not hasattr(head, "cv3") or not hasattr(base_head, "cv3"):
        return
    with torch.no_grad():
        for branch, base_branch in zip(head.cv3, base_head.cv3):
            last, base_last = branch[-1], base_branch[-1]
            if not isinstance(last, torch.nn.Conv2d) or last.in_channels != base_last.in_channels:
                return
            for new, old in rows.items():
                last.weight[new].copy_(base_last.weight[old])
                if last.bias is not None and base_last.bias is not None:
                    last.bias[new].copy_(base_last.bias[old])


def _classes(data_yaml: Path) -> int:
    import yaml

    return len(yaml.safe_load(data_yaml.read_text())["names"])


def _save_only_when_stopping(trainer) -> None:
    """Checkpoints only for the pass a run ends on: writing two per pass took a quarter of a ten-image run."""
    save = trainer.save_model
    saved = {"epoch": None}

    def save_if_stopping() -> bool:
        if not trainer.stop:
            return False
        saved["epoch"] = trainer.epoch
        return save()

    def save_if_missed(trainer) -> None:
        # A time-limited run may learn it is over only after the save point of its last pass.
        if saved["epoch"] != trainer.epoch:
            from ultralytics.utils.torch_utils import strip_optimizer

            save()
            for path in (trainer.last, trainer.best):
                if path.is_file():
                    strip_optimizer(path)

    trainer.save_model = save_if_stopping
    trainer.add_callback("on_train_end", save_if_missed)


def run_arguments(data: Path, run_dir: Path, run_plan: TrainPlan, classes: int, device: str, seed: int) -> dict:
    """Ultralytics' train arguments for small data (AdamW, a step per batch, short warm-up), as every kind trains."""
    kwargs = dict(
        data=str(data), epochs=run_plan.epochs, imgsz=run_plan.imgsz, batch=run_plan.batch,
        freeze=run_plan.freeze or None, workers=0, project=str(run_dir.parent.resolve()), name=run_dir.name,
        exist_ok=True, val=False, plots=False, verbose=False, seed=seed, deterministic=False,
        nbs=run_plan.batch,  # step the optimizer every batch: accumulation over 64 images starves tiny datasets
        warmup_epochs=min(3.0, run_plan.epochs / 10), patience=0, amp=False, cache=False,
        optimizer="AdamW", lr0=policy.learning_rate(classes),
    )
    if run_plan.time_budget > 0:
        kwargs["time"] = run_plan.time_budget / 3600
    if device:
        kwargs["device"] = device
    return kwargs


def trained_weights(run_dir: Path) -> Path:
    """The checkpoint a finished run leaves: best.pt where Ultralytics wrote one, else last.pt."""
    out = run_dir / "weights"
    return out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"


def _channels_last_on_cpu(trainer) -> None:
    """NHWC convolutions give 3-11% more passes per budget on CPU (README, "NHWC on CPU"); Ultralytics uses them on
    CUDA only.

    Checkpoints are still written NCHW (Ultralytics' save_model converts its copy), so loading and export are unchanged.
    """
    import torch

    if trainer.device.type == "cpu":
        trainer.model.to(memory_format=torch.channels_last)
        if getattr(trainer, "ema", None) is not None:
            trainer.ema.ema.to(memory_format=torch.channels_last)


def prepare_run(model, progress: ProgressFn | None) -> None:
    """Every core per batch, NHWC on CPU, progress per pass, one checkpoint per run: what both trainers add to
    Ultralytics."""
    # Torch's thread count is per calling thread: set it in the thread that trains, before every batch, so the run
    # uses every core but gives one back while the same process serves a prediction.
    model.add_callback("on_train_batch_start", lambda trainer: compute.use_training_threads())
    model.add_callback("on_pretrain_routine_end", _save_only_when_stopping)
    model.add_callback("on_pretrain_routine_end", _channels_last_on_cpu)
    if progress is not None:
        model.add_callback("on_fit_epoch_end", lambda trainer: progress(min(trainer.epoch + 1, trainer.epochs), trainer.epochs))


def train(data_yaml: Path, weights: Path, run_dir: Path, run_plan: TrainPlan, device: str = "",
          seed: int = 0, progress: ProgressFn | None = None, known_rows: dict[int, int] | None = None) -> tuple[Path, float]:
    """Run Ultralytics training and return the trained weights and the seconds it took.

    known_rows maps class indices of the new model to those of `weights` for labels the base already knows: their
    pretrained head rows are kept instead of starting from random ones.
    """
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    prepare_run(model, progress)
    if known_rows:
        base = YOLO(str(weights), task="detect").model

        def transfer(trainer) -> None:
            keep_known_rows(trainer.model, base, known_rows)
            if getattr(trainer, "ema", None) is not None:
                keep_known_rows(trainer.ema.ema, base, known_rows)
        model.add_callback("on_pretrain_routine_end", transfer)
    started = time.monotonic()
    with compute.training():
        compute.use_training_threads()
        model.train(**run_arguments(data_yaml, run_dir, run_plan, _classes(data_yaml), device, seed))
    return trained_weights(run_dir), time.monotonic() - started
