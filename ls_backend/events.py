"""Turn Label Studio webhook events into stored annotations and training requests."""
from __future__ import annotations

import logging

from model.kinds import parse_controls
from model.label_config import ConfigError, RectangleLabelsControl
from model.effort import compare
from model.project_store import ProjectStore, annotation_record

from .backend import Backend
from .controls import any_trained, measure_controls
from .scheduler import Scheduler
from .schemas import AnnotationEvent, AnnotationsDeleted, Event

log = logging.getLogger(__name__)


def remember_config(backend: Backend, project: str, config: str | None, **extra) -> None:
    """Store the project's label config; a config we cannot serve is kept but logged."""
    if not config:
        return
    store = backend.store(project)
    if store.info().get("label_config") != config:
        try:
            controls = parse_controls(config)
            log.info("project %s: label config now has %s", project,
                     {c.name: list(c.labels) for c in controls})
        except ConfigError as exc:
            log.warning("project %s: label config cannot be served: %s", project, exc)
    store.update_info(label_config=config, **extra)


def measure_effort(store: ProjectStore, record: dict) -> None:
    """Compare the submitted boxes with the prediction we gave the task, if we gave one."""
    predicted = store.prediction(record["task_id"])
    if not predicted:
        return
    config = store.info().get("label_config", "")
    try:
        controls = parse_controls(config)
    except ConfigError:
        return
    if len(controls) != 1 or not isinstance(controls[0], RectangleLabelsControl):
        effort = measure_controls(store, record, config)  # every control's corrections, summed
        if effort is not None:
            store.put_effort(record["task_id"], effort)
        return
    control = controls[0]
    ours, _ = control.from_result(predicted["result"])
    theirs, _ = control.from_result(record["result"])
    effort = compare(ours, theirs)
    store.put_effort(record["task_id"], {"version": predicted["version"], **effort.as_dict()})


def handle_event(backend: Backend, scheduler: Scheduler, event: Event) -> dict:
    """Apply one validated event; everything slow (training, resync) is left to the job."""
    project = event.project.id
    remember_config(backend, project, event.project.label_config, title=event.project.title)
    store = backend.store(project)
    training = None
    if isinstance(event, AnnotationEvent):
        record = annotation_record(event.task.as_sent(), event.annotation.as_sent())
        if record["cancelled"]:
            stored = store.get(record["task_id"])
            if stored is None or stored.get("annotation_id") == record["annotation_id"]:
                store.remove_task(record["task_id"])
        else:
            store.put(record)
            measure_effort(store, record)
        training = scheduler.after_annotation(project)
    elif isinstance(event, AnnotationsDeleted):
        ids = {a.id for a in event.annotations}
        removed = store.delete_annotations(ids)
        log.info("project %s: forgot %d of %d deleted annotations", project, removed, len(ids))
    elif event.action == "TASKS_CREATED" and any_trained(backend, project):
        training = scheduler.autolabel(project)
    elif event.action == "START_TRAINING":
        backend.sync.request_resync(project)  # the job then exports everything once more
        training = scheduler.request(project)
    return {"status": "ok", "action": event.action, "project": project, "training": training}
