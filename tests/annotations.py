"""Build the webhooks an annotator would send, from a real labeled dataset in ../shared/datasets."""
from __future__ import annotations

import copy

from model.yolo_import import YoloItem, label_config, to_result
from tests.conftest import recorded


def annotation_event(project: int, task_id: int, image_ref: str, result: list[dict], names: list[str],
                     action: str = "ANNOTATION_CREATED", cancelled: bool = False) -> dict:
    """The recorded ANNOTATION_CREATED payload, re-targeted at this project, task, image and result."""
    body = copy.deepcopy(recorded("webhook_ANNOTATION_CREATED"))
    body["action"] = action
    body["project"]["id"] = project
    body["project"]["label_config"] = label_config(names)
    body["task"].update(id=task_id, project=project, data={"image": image_ref})
    body["annotation"].update(id=1000 + task_id, task=task_id, project=project, result=result,
                              was_cancelled=cancelled, updated_at=f"2026-11-24T05:{task_id % 60:02d}:00Z")
    return body


def dataset_events(media, items: list[YoloItem], names: list[str], project: int = 1, first_task: int = 1) -> list[dict]:
    """One upload per image on the fake Label Studio and the webhook for its human annotation."""
    events = []
    for offset, item in enumerate(items):
        ref = media.add("upload", f"p{project}-{item.image.name}", item.image)
        events.append(annotation_event(project, first_task + offset, ref, to_result(item, names), names))
    return events


def export_tasks(events: list[dict]) -> list[dict]:
    """What Label Studio's JSON export returns for these annotated tasks."""
    return [{**e["task"], "annotations": [e["annotation"]]} for e in events]
