"""Predict with a version's OpenVINO export: about half PyTorch's CPU time per image, and no torch in the process.

The pre- and post-processing repeat what Ultralytics does for a PyTorch detector (letterbox to the stride with the
minimum padding when a batch has one shape, class-aware NMS at policy.NMS_IOU, at most 300 boxes, boxes scaled
back and clipped to the image), so the same image gives the same boxes in either runtime, within the network's
precision.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import yaml

from .policy import NMS_IOU

log = logging.getLogger(__name__)

MAX_DET = 300
MAX_NMS = 30_000
CLASS_OFFSET = 7680  # pixels between classes, so one NMS pass never lets boxes of two classes suppress each other
PAD_VALUE = 114
PRECISIONS = ("", "f32", "bf16")  # "": OpenVINO's default for the CPU (bf16 where the CPU computes it natively)


class RuntimeUnavailable(RuntimeError):
    """The exported runtime cannot be used here; the message says why, and serving falls back to PyTorch."""


def available() -> str | None:
    """Why OpenVINO cannot be imported in this process, or None when it can."""
    # `import openvino` loads its converter, which reports usage to Google Analytics unless its telemetry package is
    # missing; this backend sends nothing anywhere, so the converter's built-in stand-in is made to load instead.
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not installed: {exc}"
    return None


def export_folder(weights: Path) -> Path:
    """Where a weights file's OpenVINO export lives: beside it, named as Ultralytics names it."""
    return weights.parent / f"{weights.stem}_openvino_model"


def is_exported(weights: Path) -> bool:
    folder = export_folder(weights)
    return (folder / "metadata.yaml").is_file() and any(folder.glob("*.xml"))


def read_metadata(folder: Path) -> dict:
    return yaml.safe_load((folder / "metadata.yaml").read_text()) or {}


class ExportedDetector:
    """An OpenVINO-compiled detector with the class names and stride Ultralytics stored beside it."""

    def __init__(self, folder: Path, precision: str = ""):
        reason = available()
        if reason:
            raise RuntimeUnavailable(reason)
        import openvino as ov

        meta = read_metadata(folder)
        if meta.get("task", "detect") != "detect":
            raise RuntimeUnavailable(f"{folder.name} is a {meta.get('task')} model; only detection is exported")
        self.folder = folder
        self.names: dict[int, str] = {int(k): str(v) for k, v in (meta.get("names") or {}).items()}
        self.stride = int(meta.get("stride") or 32)
        self.end2end = bool(meta.get("end2end"))
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(core.read_model(next(folder.glob("*.xml"))), "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # "bf16" or "f32"

    def predict(self, images: list[np.ndarray], imgsz: int, conf: float) -> list[np.ndarray]:
        """For each BGR image its boxes as rows (x1, y1, x2, y2, score, class) in the image's pixels."""
        size = max(self.stride, math.ceil(imgsz / self.stride) * self.stride)  # as Ultralytics' check_imgsz
        rect = len({image.shape for image in images}) == 1
        batch = np.stack([letterbox(image, size, self.stride, rect) for image in images])
        x = np.ascontiguousarray(batch[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        output = self.compiled(x)[self.compiled.output(0)]
        shape = x.shape[2:]
        out = []
        for image, pred in zip(images, output):
            rows = pred if self.end2end else nms(pred.T, conf)
            if self.end2end:
                rows = rows[rows[:, 4] > conf]
            out.append(scale_boxes(rows, shape, image.shape[:2]))
        return out


def letterbox(image: np.ndarray, size: int, stride: int, rect: bool) -> np.ndarray:
    """The image scaled into size x size keeping its aspect, padded grey: only to the stride when rect."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = size - new_w, size - new_h
    if rect:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)


def nms(pred: np.ndarray, conf: float, iou: float = NMS_IOU) -> np.ndarray:
    """Rows (x1, y1, x2, y2, score, class) kept by class-aware NMS from raw (cx, cy, w, h, class scores...) rows."""
    scores = pred[:, 4:]
    cls = scores.argmax(1)
    score = scores[np.arange(len(pred)), cls]
    keep = score > conf
    pred, cls, score = pred[keep], cls[keep], score[keep]
    order = np.argsort(-score, kind="stable")[:MAX_NMS]
    xy, wh = pred[order, :2], pred[order, 2:4] / 2
    boxes = np.concatenate([xy - wh, xy + wh], axis=1)
    cls, score = cls[order], score[order]
    shifted = boxes + (cls * CLASS_OFFSET)[:, None]
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    alive = np.ones(len(boxes), dtype=bool)
    kept = []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) == MAX_DET:
            break
        rest = np.nonzero(alive[i + 1:])[0] + i + 1
        if not len(rest):
            continue
        lt = np.maximum(shifted[i, :2], shifted[rest, :2])
        rb = np.minimum(shifted[i, 2:], shifted[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        alive[rest[inter / (area[i] + area[rest] - inter) > iou]] = False
    kept = np.asarray(kept, dtype=int)
    return np.concatenate([boxes[kept], score[kept, None], cls[kept, None].astype(np.float32)], axis=1)


def scale_boxes(rows: np.ndarray, shape: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """Rows from the letterboxed input's pixels to the original image's, clipped to it."""
    rows = rows.astype(np.float32, copy=True)
    h0, w0 = original
    gain = min(shape[0] / h0, shape[1] / w0)
    new_h, new_w = max(round(h0 * gain), 1), max(round(w0 * gain), 1)
    pad_x, pad_y = round((shape[1] - new_w) / 2 - 0.1), round((shape[0] - new_h) / 2 - 0.1)
    rows[:, [0, 2]] = ((rows[:, [0, 2]] - pad_x) / (new_w / w0)).clip(0, w0)
    rows[:, [1, 3]] = ((rows[:, [1, 3]] - pad_y) / (new_h / h0)).clip(0, h0)
    return rows
