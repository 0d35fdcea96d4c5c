"""Every control of a project served at once: each has its own model versions, one's failure never empties another's.

The first RectangleLabels control keeps the project's own folder (MODEL_DIR/<project>), as before; every other
control (polygons, choices, keypoints, a second box control, rotated boxes) has MODEL_DIR/<project>/controls/<name>.
A prediction carries the regions of all of them, and its model_version names each control's version
('v3+kind-v2'); a project of one box control keeps its plain 'v3'.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model import compute
from model.images import ImageError, read_image
from model.kind_effort import measure
from model.kind_predictor import KindPrediction, kind_label_map, predict_kind
from model.kinds import Control, parse_controls
from model.label_config import ConfigError, RectangleLabelsControl
from model.pipeline import trained_upto
from model.predictor import predict
from model.registry import ProjectRegistry
from model.weights import resolve_weights

if TYPE_CHECKING:
    from model.project_store import ProjectStore

    from .backend import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlModel:
    """A control, the YOLO task that learns it and where its versions live."""

    control: Control
    task: str  # detect, segment, classify, pose or obb
    registry: ProjectRegistry
    primary: bool  # the project's first box control, served and trained by the boxes' own path


def control_folder(name: str) -> str:
    """The control's name as a folder name where it is a safe one; a config's names never reach outside the project."""
    if re.fullmatch(r"[A-Za-z0-9_][\w.-]{0,99}", name) and ".." not in name:
        return name
    return "control-" + hashlib.sha1(name.encode()).hexdigest()[:12]


def control_registry(model_dir: Path, project: str, name: str) -> ProjectRegistry:
    return ProjectRegistry(Path(model_dir) / str(project) / "controls", control_folder(name))


def project_registries(backend: Backend, project: str) -> list[ProjectRegistry]:
    """The project's own registry and every control's, whether or not the config still has the control."""
    found = [backend.registry(project)]
    root = backend.settings.model_dir / str(project) / "controls"
    if root.is_dir():
        found += [control_registry(backend.settings.model_dir, project, p.name) for p in sorted(root.iterdir())
                  if p.is_dir()]
    return found


def any_trained(backend: Backend, project: str) -> bool:
    return any(r.versions() for r in project_registries(backend, project))


def project_trained_upto(backend: Backend, project: str) -> float:
    """Annotations changed after this time are new to every control's model (all are trained in one job)."""
    return max((trained_upto(r) for r in project_registries(backend, project)), default=0.0)


def control_models(backend: Backend, project: str, controls: list[Control],
                   records: list[dict] | None = None) -> list[ControlModel]:
    """Each control with its task and registry. A box control whose annotations are rotated learns oriented boxes
    (records given, when training), or is served as such once it has an oriented version."""
    from model.kind_dataset import uses_rotation

    out, primary_taken = [], False
    for control in controls:
        registry = control_registry(backend.settings.model_dir, project, control.name)
        if isinstance(control, RectangleLabelsControl):
            if records is not None:
                rotated = uses_rotation(records, control)
            else:
                current = registry.current()
                rotated = current is not None and current.meta.get("task") == "obb"
            if rotated:
                out.append(ControlModel(control, "obb", registry, False))
            elif not primary_taken:
                primary_taken = True
                out.append(ControlModel(control, "detect", backend.registry(project), True))
            else:
                out.append(ControlModel(control, "detect", registry, False))
        else:
            out.append(ControlModel(control, control.task, registry, False))
    return out


def only_boxes(models: list[ControlModel]) -> bool:
    """One plain box control: everything runs exactly as before kinds existed."""
    return len(models) == 1 and models[0].primary


def parse_for_project(backend: Backend, project: str, config: str | None = None,
                      records: list[dict] | None = None) -> list[ControlModel]:
    """The project's controls from its stored config (or the one given); records given: as training sees them."""
    config = config or backend.store(project).info().get("label_config", "")
    return control_models(backend, project, parse_controls(config), records)


def kind_weights(backend: Backend, task: str) -> Path:
    s = backend.settings
    if task == "detect":
        return backend.train_base_weights()
    return resolve_weights(s.kind_base(task), s.model_dir / "_weights", s.allow_downloads)


def serving_name(backend: Backend, model: ControlModel) -> str | None:
    """The name a non-primary control's served model goes by in model_version, or None when it serves nothing."""
    current = model.registry.current()
    if current is not None and current.weights.is_file():
        return f"{model.control.name}-{current.name}"
    if model.task == "detect" or getattr(backend.settings, f"{model.task}_base_model", ""):
        return f"{model.control.name}-base"
    return None  # a head seeded from the boxes' backbone knows nothing before it is trained


def serving(backend: Backend, model: ControlModel) -> tuple[Path, bool, int, float] | None:
    """What a non-primary control serves: its current version, else a base model of its task that knows some of its
    labels (zero-shot through predicted_values), else nothing."""
    s = backend.settings
    current = model.registry.current()
    if current is not None and current.weights.is_file():
        imgsz = (current.meta.get("plan") or {}).get("imgsz") or s.predict_imgsz
        return current.weights, False, imgsz, current.meta.get("conf") or s.predict_conf
    if serving_name(backend, model) is None:
        return None
    weights = backend.base_weights() if model.task == "detect" else resolve_weights(
        getattr(s, f"{model.task}_base_model"), s.model_dir / "_weights", s.allow_downloads)
    return weights, True, s.predict_imgsz, s.predict_conf


def composite_version(backend: Backend, project: str, models: list[ControlModel]) -> str:
    """Every control's served model in config order: 'v3' for one box control, 'v3+kind-v2' for two controls."""
    parts = [backend.model_version(project) if m.primary else serving_name(backend, m) for m in models]
    return "+".join(p for p in parts if p) or backend.model_version(project)


def predict_controls(backend: Backend, project: str, models: list[ControlModel],
                     tasks: list[dict]) -> tuple[str, list[dict], set[int]]:
    """One Label Studio prediction per task holding every control's regions, the composite version, failed tasks."""
    if only_boxes(models):
        return backend.predict_tasks(project, models[0].control, tasks)
    version = composite_version(backend, project, models)
    per_task: list[list[dict]] = [[] for _ in tasks]
    scores: list[list[float]] = [[] for _ in tasks]
    failed: set[int] = set()
    for model in models:
        try:
            if model.primary:
                _, results, broken = backend.predict_tasks(project, model.control, tasks)
                failed |= broken
                for i, item in enumerate(results):
                    per_task[i] += item["result"]
                    if i not in broken:
                        scores[i].append(item["score"])
                continue
            served = serving(backend, model)
            if served is None:
                continue
            weights, is_base, imgsz, conf = served
            loaded = backend.models.get(weights)
            label_map = kind_label_map(model.control, model.task, loaded.names, aliases=is_base)
            if not label_map:
                continue
            files = backend.predictions.fetch_images(project, model.control, tasks)
            failed.update(i for i, found in enumerate(files) if isinstance(found, Exception))
            for i, prediction in _predict_files(backend, model, loaded, files, label_map, imgsz, conf).items():
                per_task[i] += prediction.regions
                scores[i].append(prediction.score)
        except Exception as exc:  # noqa: BLE001 - one control's failure must never empty the others' regions
            log.error("project %s control %s: no predictions: %s: %s", project, model.control.name,
                      type(exc).__name__, exc)
    results, store = [], backend.store(project)
    for i, task in enumerate(tasks):
        item = {"result": per_task[i], "score": min(scores[i]) if scores[i] else 0.0, "model_version": version}
        if i not in failed and task.get("id") is not None:
            store.remember_prediction(task["id"], version, item["result"])
        results.append(item)
    return version, results, failed


def _predict_files(backend: Backend, model: ControlModel, loaded, files: list, label_map: dict[int, str],
                   imgsz: int, conf: float) -> dict[int, KindPrediction]:
    """Decode and predict the images in batches of one shape; an undecodable image is skipped."""
    s = backend.settings
    images: dict[int, object] = {}
    for i, found in enumerate(files):
        if isinstance(found, Exception):
            continue
        try:
            images[i] = read_image(found[0])
        except ImageError as exc:
            log.warning("image skipped: %s", exc)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in images.items():
        by_shape.setdefault(image.shape, []).append(i)
    out: dict[int, KindPrediction] = {}
    size = max(1, s.predict_batch)
    for same in by_shape.values():
        for k in range(0, len(same), size):
            chunk = same[k:k + size]
            with compute.serving():
                batch = [images[i] for i in chunk]
                if model.task == "detect":
                    found = predict(loaded, batch, label_map, imgsz, _Flat(conf), len(chunk), s.device)
                    predictions = [KindPrediction([model.control.to_region(b, img.shape[1], img.shape[0])
                                                   for b in d.boxes], d.uncertainty) for d, img in zip(found, batch)]
                else:
                    predictions = predict_kind(loaded, batch, model.control, model.task, label_map, imgsz, conf,
                                               len(chunk), s.device)
            out.update(zip(chunk, predictions))
    return out


class _Flat:
    """One threshold for every label, for a second box control."""

    def __init__(self, conf: float):
        self.conf = conf

    def of(self, label: str) -> float:
        return self.conf


def measure_controls(store: ProjectStore, record: dict, config: str) -> dict | None:
    """Effort between the prediction we gave a task and the submitted annotation, summed over every control."""
    predicted = store.prediction(record["task_id"])
    if not predicted:
        return None
    try:
        controls = parse_controls(config)
    except ConfigError:
        return None
    total, per_control = None, {}
    for control in controls:
        effort = measure(control, predicted["result"], record["result"])
        per_control[control.name] = effort.as_dict()
        total = effort if total is None else total + effort
    return {"version": predicted["version"], **total.as_dict(), "controls": per_control}
