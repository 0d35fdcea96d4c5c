"""The training job of a project with several controls or a non-box one: each control learns in turn, on its own.

A control with nothing new is left alone, one that lacks data is skipped, and one that fails is recorded as failed
while the others still train and stay served.
"""
from __future__ import annotations

import logging
import time

from model import compute
from model.kind_training import run_kind_training
from model.pipeline import NotEnoughData, run_training
from model.policy import SELF_TRAINING_FROM_ROUND
from model.trainer import TrainParams

from .backend import Backend
from .controls import ControlModel, any_trained, composite_version, control_models, kind_weights
from .jobs import next_run, pseudo_labels

log = logging.getLogger(__name__)


def train_one(backend: Backend, project: str, model: ControlModel, run: tuple[str, float, int], status) -> dict:
    """One control's run, as train_project does it for boxes: its result as the job status records it."""
    s = backend.settings
    kind, budget, refine_round = run
    store = backend.store(project)
    control = model.control
    fetcher = backend.fetcher(project)
    params = TrainParams(s.train_epochs, s.train_imgsz, budget, s.train_freeze, s.train_batch, s.device)

    def progress(epoch: int, epochs: int) -> None:
        status(progress={"epoch": epoch, "epochs": epochs, "run": kind, "control": control.name})

    def fetch(record):
        return fetcher.fetch(record["data"].get(control.value_key))

    started = time.time()
    if model.primary:
        self_training = kind == "refine" and refine_round >= SELF_TRAINING_FROM_ROUND
        pseudo = pseudo_labels(backend, project, control) if self_training else []
        outcome = run_training(store, model.registry, control, fetch, backend.train_base_weights(), params,
                               s.min_annotations, s.accept_only_if_not_worse, s.keep_versions, progress,
                               refined=kind != "update", default_conf=s.predict_conf, refine_round=refine_round,
                               pseudo=pseudo)
    else:
        outcome = run_kind_training(store, model.registry, control, model.task, fetch,
                                    kind_weights(backend, model.task), params, s.min_annotations,
                                    s.accept_only_if_not_worse, s.keep_versions, progress,
                                    refined=kind != "update", default_conf=s.predict_conf, refine_round=refine_round)
    return {"state": "finished", "task": model.task, "run": kind, "version": outcome.version.name,
            "accepted": outcome.accepted, "reason": outcome.reason, "metrics": outcome.metrics,
            "seconds": round(time.time() - started, 1)}


def train_controls(backend: Backend, project: str, resync_requested: bool, status, started: float,
                   scheduler=None) -> dict:
    """Train every control that has something to learn, then queue auto-labeling and further rounds as boxes do."""
    s = backend.settings
    store = backend.store(project)
    from model.kinds import parse_controls

    models = control_models(backend, project, parse_controls(store.info().get("label_config", "")), store.records())
    controls: dict[str, dict] = {}
    for model in models:
        run = next_run(backend, project, resync_requested, model.registry)
        if run is None:
            controls[model.control.name] = {"state": "skipped", "reason": "nothing new to learn"}
            continue
        try:
            controls[model.control.name] = train_one(backend, project, model, run, status)
        except NotEnoughData as exc:
            controls[model.control.name] = {"state": "skipped", "reason": str(exc)}
        except compute.Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded; the other controls still learn and stay served
            log.exception("project %s control %s: training failed", project, model.control.name)
            controls[model.control.name] = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finished = {n: r for n, r in controls.items() if r["state"] == "finished"}
    failed = {n: r for n, r in controls.items() if r["state"] == "failed"}
    if not finished and not failed:
        raise NotEnoughData("; ".join(f"{n}: {r['reason']}" for n, r in controls.items()))
    if not finished:
        raise RuntimeError("; ".join(f"{n}: {r['error']}" for n, r in failed.items()))
    accepted = any(r["accepted"] for r in finished.values())
    result = {"state": "finished", "run": next(iter(finished.values()))["run"],
              "version": composite_version(backend, project, control_models(
                  backend, project, [m.control for m in models])),
              "accepted": accepted, "reason": "; ".join(f"{n}: {r['reason']}" for n, r in finished.items()),
              "metrics": {n: r["metrics"] for n, r in finished.items()}, "controls": controls,
              "seconds": round(time.time() - started, 1)}
    status(**result, finished=time.time())
    follow_up = []
    if accepted and s.autolabel_after_train and backend.client(project) is not None and any_trained(backend, project):
        follow_up.append("autolabel")
    if accepted and any(m.registry.current() is not None and next_run(backend, project, False, m.registry) is not None
                        for m in models):
        follow_up.append("train")
    for job in follow_up:  # the scheduler retries one it cannot queue now, as it does a webhook's request
        if scheduler is not None:
            scheduler.request(project, job)
    return result
