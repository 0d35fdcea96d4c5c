"""Predictions for Label Studio tasks, safe to ask for from request threads and jobs at the same time.

Each served model is loaded once per process and used under its own lock (model.predictor.LoadedModel): Ultralytics
predictors keep per-call state and are not thread-safe. A lock rather than one model per thread, as measured on 2
CPU cores (two threads, 8 bus.jpg predictions each at 640 px, three runs): sharing one locked model took 3.0-5.1 s
and peaked at 962-967 MiB, a copy per thread 4.4-6.8 s and 1116-1128 MiB. Torch already spreads one call over every
core, so copies only compete for them, and each costs memory for as long as its thread lives.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model import compute
from model.images import ImageError, probe, read_image
from model.label_config import RectangleLabelsControl
from model.predictor import Detections, ModelCache, predict

from .ls_client import LabelStudioError
from .media import MediaError

if TYPE_CHECKING:
    from .backend import Backend

log = logging.getLogger(__name__)


class PredictionService:
    """Fetches, decodes and batches task images, and predicts them with the project's served model."""

    def __init__(self, backend: Backend):
        self.backend = backend
        s = backend.settings
        # Room for a version fused with its four fold models (model.fusion) and the models of a few other projects.
        self.models = ModelCache(size=8, device=s.device, runtime=s.predict_runtime, precision=s.openvino_precision)
        self.io_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="media")

    def fetch_images(self, project: str, control: RectangleLabelsControl, tasks: list[dict]) -> list:
        """Each task's image as a local file and its upright (height, width), or the error that explains why not."""
        fetcher = self.backend.fetcher(project)

        def one(task: dict):
            try:
                ref = (task.get("data") or {}).get(control.value_key)
                if ref is None:
                    raise MediaError(f"task data has no '{control.value_key}' field")
                path = fetcher.fetch(ref)
                info = probe(path)
                return path, (info.height, info.width)
            except (MediaError, ImageError, LabelStudioError, OSError) as exc:
                log.warning("project %s task %s: image skipped: %s", project, task.get("id"), exc)
                return exc

        return list(self.io_pool.map(one, tasks))

    def predict_tasks(self, project: str, control: RectangleLabelsControl,
                      tasks: list[dict]) -> tuple[str, list[dict], set[int]]:
        """One Label Studio prediction per task, in order, and the indices whose image failed (empty result).

        Images of one shape are batched together (Ultralytics pads a mixed batch to a square, which is slower
        and changes results), and each batch is decoded while the previous one is predicted, so only two
        batches of pixels are ever held. Regions are sized by the decoded pixels, the ones the model saw.
        """
        s = self.backend.settings
        version, weights, is_base, imgsz, thresholds, members = self.backend.serving(project)
        model = self.models.get(weights)
        fused = [self.models.get(member) for member in members]
        label_map = control.model_label_map(model.names, aliases=is_base)
        files = self.fetch_images(project, control, tasks)
        failed = {i for i, f in enumerate(files) if isinstance(f, Exception)}
        found: dict[int, tuple[Detections, tuple[int, int]]] = {}
        if label_map:
            order = sorted((i for i in range(len(tasks)) if i not in failed), key=lambda i: files[i][1])
            size = max(1, s.predict_batch)
            chunks = [same[k:k + size] for _, group in groupby(order, key=lambda i: files[i][1])
                      for same in [list(group)] for k in range(0, len(same), size)]
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as decoder:
                pending = decoder.submit(_decode, files, chunks[0]) if chunks else None
                for n, chunk in enumerate(chunks):
                    images = pending.result()
                    pending = decoder.submit(_decode, files, chunks[n + 1]) if n + 1 < len(chunks) else None
                    ok = [(i, image) for i, image in zip(chunk, images) if not isinstance(image, Exception)]
                    failed.update(i for i, image in zip(chunk, images) if isinstance(image, Exception))
                    if ok:
                        with compute.serving():  # an in-process training run gives this request a core
                            detections = predict(model, [image for _, image in ok], label_map, imgsz, thresholds,
                                                 len(ok), s.device, fused)
                        found.update((i, (d, image.shape[:2])) for (i, image), d in zip(ok, detections))
        results, store = [], self.backend.store(project)
        for i, task in enumerate(tasks):
            item = {"result": [], "score": 0.0, "model_version": version}
            if i in found:
                detections, (h, w) = found[i]
                item["result"] = [control.to_region(box, w, h) for box in detections.boxes]
                item["score"] = detections.score
            if i not in failed and task.get("id") is not None:
                store.remember_prediction(task["id"], version, item["result"])
            results.append(item)
        return version, results, failed


def _decode(files: list, chunk: list[int]) -> list[np.ndarray | ImageError]:
    """The chunk's images, or for each that cannot be decoded the error saying why."""
    out: list[np.ndarray | ImageError] = []
    for i in chunk:
        path: Path = files[i][0]
        try:
            out.append(read_image(path))
        except ImageError as exc:
            log.warning("image skipped: %s", exc)
            out.append(exc)
    return out
