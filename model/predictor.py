"""Load each model once per process and predict images in batches, one caller per model at a time."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .fusion import fuse
from .label_config import Box
from .policy import NMS_IOU, Thresholds
from .runtime import ExportedDetector, RuntimeUnavailable, export_folder, is_exported

log = logging.getLogger(__name__)

# Candidates below the display threshold still tell how unsure the model is about an image.
CANDIDATE_CONF = 0.05


@dataclass(frozen=True)
class Detections:
    """What a model found on one image: boxes to show and the uncertainty of the whole image."""

    boxes: list[Box]
    uncertainty: float

    @property
    def score(self) -> float:
        """The task score Label Studio sorts by: low means a human should look first."""
        return round(1.0 - self.uncertainty, 4)


def image_uncertainty(confidences: list[float]) -> float:
    """How close the most ambiguous candidate is to a coin flip: 1 at p=0.5, 0 when all are near 0 or 1."""
    return max((1.0 - abs(2.0 * c - 1.0) for c in confidences), default=0.0)


@dataclass
class LoadedModel:
    """A YOLO model and the lock every prediction with it holds: an Ultralytics predictor keeps per-call state
    (its arguments, batch, results) and is documented as not thread-safe."""

    yolo: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    exported: ExportedDetector | None = None  # set when the version's OpenVINO export serves instead of PyTorch

    @property
    def names(self) -> dict[int, str]:
        return self.exported.names if self.exported is not None else self.yolo.names

    @property
    def runtime(self) -> str:
        return "openvino" if self.exported is not None else "pytorch"


class ModelCache:
    """A small LRU of loaded YOLO models keyed by weights path and modification time."""

    def __init__(self, size: int = 4, device: str = "", runtime: str = "auto", precision: str = ""):
        self.size = size
        self.device = device
        self.runtime = runtime  # auto | openvino: a version's OpenVINO export when present; pytorch: never
        self.precision = precision
        self._models: OrderedDict[tuple[str, int, bool], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int, bool], threading.Lock] = {}

    def get(self, weights: Path) -> LoadedModel:
        key = (str(weights), weights.stat().st_mtime_ns, self.uses_export(weights))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = self._load(weights, exported=key[2])
            with self._lock:
                for stale in [k for k in self._models if k[0] == key[0]]:  # older weights or runtime of this path
                    del self._models[stale]
                self._models[key] = model
                self._loading.pop(key, None)
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
            return model

    def uses_export(self, weights: Path) -> bool:
        """Whether these weights are served from their OpenVINO export: on CPU, unless PREDICT_RUNTIME=pytorch."""
        return self.runtime != "pytorch" and self.device in ("", "cpu") and is_exported(weights)

    def _load(self, weights: Path, exported: bool) -> LoadedModel:
        if exported:
            try:
                return LoadedModel(None, exported=ExportedDetector(export_folder(weights), self.precision))
            except (RuntimeUnavailable, RuntimeError, OSError, ValueError) as exc:  # OpenVINO raises RuntimeError
                log.warning("%s: serving with PyTorch, its OpenVINO export does not load: %s", weights, exc)
        from ultralytics import YOLO

        return LoadedModel(YOLO(str(weights), task="detect"))

    def loaded(self) -> list[str]:
        with self._lock:
            return [key[0] for key in self._models]

    def runtimes(self) -> dict[str, str]:
        """Each loaded weights file and the runtime that predicts with it (openvino or pytorch)."""
        with self._lock:
            return {key[0]: model.runtime for key, model in self._models.items()}


def on_gpu(device: str) -> bool:
    """Whether PyTorch predicts on a GPU: DEVICE names one, or is empty and torch sees CUDA."""
    if device.lower() == "cpu":
        return False
    if device:
        return True
    import torch

    return torch.cuda.is_available()


def _found(model: LoadedModel, images: list[np.ndarray], kwargs: dict, device: str) -> list[np.ndarray]:
    """Each image's rows (x1, y1, x2, y2, score, class) above CANDIDATE_CONF."""
    with model.lock:
        if model.exported is not None:
            return model.exported.predict(images, kwargs["imgsz"], CANDIDATE_CONF)
        # PyTorch on a CPU: one image per forward pass. A batch of four 640 px images raised the server's peak by
        # ~200 MiB and saved no time (bench/speed.py); a GPU gets the whole chunk at once.
        parts = [images] if on_gpu(device) else [[image] for image in images]
        return [r.boxes.data.cpu().numpy() if r.boxes is not None else np.zeros((0, 6))
                for part in parts for r in model.yolo.predict(part, **kwargs)]


def predict(model: LoadedModel, images: list[np.ndarray], label_map: dict[int, str], imgsz: int,
            thresholds: Thresholds, batch: int, device: str = "",
            members: Sequence[LoadedModel] = ()) -> list[Detections]:
    """Run the model over BGR images in batches and keep the boxes of labels the project knows above their thresholds;
    with members (models of the same labels), each image's boxes of all of them fused (model.fusion)."""
    out: list[Detections] = []
    kwargs = {"imgsz": imgsz, "conf": CANDIDATE_CONF, "iou": NMS_IOU, "verbose": False}
    if device:
        kwargs["device"] = device
    for start in range(0, len(images), max(1, batch)):
        chunk = images[start:start + batch]
        found = _found(model, chunk, kwargs, device)
        if members:
            each = [found] + [_found(member, chunk, kwargs, device) for member in members]
            found = [fuse(list(rows)) for rows in zip(*each)]
        for data in found:
            boxes, candidates = [], []
            for x1, y1, x2, y2, score, cls in data[:, :6]:
                label = label_map.get(int(cls))
                if label is None or score < CANDIDATE_CONF:
                    continue
                candidates.append(float(score))
                if score >= thresholds.of(label):
                    boxes.append(Box(label, float(x1), float(y1), float(x2), float(y2), float(score)))
            out.append(Detections(boxes, image_uncertainty(candidates)))
    return out
