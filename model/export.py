"""Export a promoted version once, in the training job, to OpenVINO beside its weights; servers load it when present.

    python -m model.export WEIGHTS.pt [--imgsz 640]   # e.g. the base model, which no training job exports

The export is written to a staging folder and renamed into place, so a server never sees half of one. It is checked
before it is kept: on a few images it must find the boxes PyTorch finds, else it is deleted and PyTorch serves.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .policy import NMS_IOU
from .registry import META, Version, read_json, write_json
from .fusion import overlaps
from .runtime import ExportedDetector, RuntimeUnavailable, available, export_folder

log = logging.getLogger(__name__)

CHECK_IMAGES = 4  # held-out images the export must agree with PyTorch on before it is kept
CHECK_CONF = 0.25  # boxes compared by the check: those a user would see at the default threshold
CHECK_IOU = 0.8  # a PyTorch box is found again when an exported box of its class overlaps it this much
CHECK_SCORE = 0.05  # and their scores differ by at most this (bf16 on CPU moves scores by ~0.02)
CHECK_FOUND = 0.95  # the share of PyTorch's boxes the export must find again (f32 finds all)


class ExportFailed(RuntimeError):
    """The export could not be made or found other boxes than PyTorch; the message says which."""


@dataclass(frozen=True)
class ExportReport:
    """Where an export went, how long it took, and what the check compared."""

    folder: Path
    seconds: float
    checked_images: int
    checked_boxes: int
    precision: str

    def as_dict(self) -> dict:
        return {"runtime": "openvino", "folder": self.folder.name, "seconds": round(self.seconds, 1),
                "checked_images": self.checked_images, "checked_boxes": self.checked_boxes,
                "precision": self.precision}


def unmatched(reference: np.ndarray, candidate: np.ndarray, iou: float = CHECK_IOU,
              score: float = CHECK_SCORE) -> list[int]:
    """Indices of reference rows (x1, y1, x2, y2, score, class) that no candidate row of the same class matches."""
    missing = []
    for i, row in enumerate(reference):
        same = candidate[candidate[:, 5] == row[5]]
        if not len(same):
            missing.append(i)
            continue
        if not np.any((overlaps(row, same) >= iou) & (np.abs(same[:, 4] - row[4]) <= score)):
            missing.append(i)
    return missing


def compare(weights: Path, detector: ExportedDetector, images: list[np.ndarray], imgsz: int) -> int:
    """Boxes PyTorch finds above CHECK_CONF on the images; raises ExportFailed when the export misses more than
    1 - CHECK_FOUND of them (bf16 moves a weak model's crowded, overlapping boxes enough to swap a few in NMS)."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    boxes = missing = 0
    for image in images:
        reference = model.predict(image, imgsz=imgsz, conf=CHECK_CONF, iou=NMS_IOU, verbose=False, device="cpu")[0]
        ref = reference.boxes.data.cpu().numpy() if reference.boxes is not None else np.zeros((0, 6))
        # A box just above the threshold in one runtime may sit just below it in the other: look a little lower.
        found = detector.predict([image], imgsz, CHECK_CONF - CHECK_SCORE)[0]
        missing += len(unmatched(ref, found))
        boxes += len(ref)
    if missing > (1 - CHECK_FOUND) * boxes:
        raise ExportFailed(f"the export misses {missing} of the {boxes} boxes PyTorch finds on {len(images)} images")
    return boxes


def export_openvino(weights: Path, imgsz: int, check_images: list[np.ndarray] | None = None,
                    precision: str = "") -> ExportReport:
    """Export weights to OpenVINO beside them (replacing an older export) and check it on check_images."""
    reason = available()
    if reason:
        raise ExportFailed(reason)
    from ultralytics import YOLO

    started = time.time()
    target = export_folder(weights)
    staging = Path(tempfile.mkdtemp(dir=weights.parent, prefix=".export-"))
    try:
        copy = staging / weights.name
        shutil.copy2(weights, copy)
        try:
            made = Path(YOLO(str(copy), task="detect").export(format="openvino", imgsz=imgsz, dynamic=True,
                                                                half=False, device="cpu", verbose=False))
        except Exception as exc:  # Ultralytics wraps every exporter failure differently
            raise ExportFailed(f"OpenVINO export of {weights.name} failed: {exc}") from exc
        try:
            detector = ExportedDetector(made, precision)
        except (RuntimeUnavailable, RuntimeError) as exc:
            raise ExportFailed(f"the OpenVINO export of {weights.name} does not load: {exc}") from exc
        boxes = compare(weights, detector, check_images or [], imgsz)
        if target.exists():
            shutil.rmtree(target)
        made.rename(target)
        report = ExportReport(target, time.time() - started, len(check_images or []), boxes, detector.precision)
        log.info("exported %s to %s in %.1f s (checked %d boxes on %d images)", weights, target.name,
                 report.seconds, boxes, report.checked_images)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_version(version: Version, imgsz: int, check_dir: Path, precision: str = "") -> dict:
    """Export a promoted version and note the outcome in its metadata; a failure is logged, never raised."""
    from .images import ImageError, read_image

    images = []
    for path in sorted(check_dir.glob("*"))[:CHECK_IMAGES] if check_dir.is_dir() else []:
        try:
            images.append(read_image(path))
        except ImageError:
            continue
    try:
        outcome = export_openvino(version.weights, imgsz, images, precision).as_dict()
    except Exception as exc:  # PyTorch keeps serving the version; the reason is in its metadata
        log.warning("%s: not exported to OpenVINO, PyTorch serves it: %s", version.path, exc)
        outcome = {"runtime": "openvino", "error": f"{type(exc).__name__}: {exc}"}
    write_json(version.path / META, {**read_json(version.path / META, {}), "export": outcome})
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path)
    parser.add_argument("--imgsz", type=int, default=640, help="size traced at; the export accepts any size")
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="images PyTorch and the export must agree on")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ["YOLO_AUTOINSTALL"] = "false"  # never pip-install an exporter's requirement
    from .images import read_image

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = export_openvino(args.weights.resolve(), args.imgsz, [read_image(p) for p in args.check])
    except ExportFailed as exc:
        parser.exit(1, f"{exc}\n")
    print(report.as_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
