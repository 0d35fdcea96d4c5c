"""Auto-labeling every unlabeled task, resuming after a crash, stopping for a newer version; effort measured."""
from __future__ import annotations

import pytest

from model.effort import compare
from model.label_config import Box
from tests.annotations import annotation_event
from tests.conftest import TOKEN

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="Normal"/><Label value="Fall"/></RectangleLabels></View>')
NAMES = ["Normal", "Fall"]


def test_effort_arithmetic_on_hand_made_cases():
    a, b, c = Box("car", 0, 0, 100, 100), Box("car", 200, 200, 300, 300), Box("dog", 400, 0, 500, 100)
    effort = compare(
        predicted=[a, b, c, Box("car", 600, 600, 650, 650)],
        final=[a, Box("car", 200, 200, 300, 340), Box("cat", 400, 0, 500, 100), Box("car", 800, 0, 900, 50)],
    )
    # a kept; b moved (IoU 0.71 < 0.75); c relabelled dog->cat; the 4th prediction deleted; one box added
    assert (effort.kept, effort.moved, effort.relabelled, effort.deleted, effort.added) == (1, 1, 1, 1, 1)
    assert effort.touched == 4 and effort.final == 4 and effort.predicted == 4
    assert effort.acceptance == pytest.approx(0.25) and effort.touched_per_box == pytest.approx(1.0)
    assert compare([], []).touched_per_box == 0.0 and compare([], []).acceptance == 1.0
    assert compare([a], []).touched == 1 and compare([], [a]).added == 1
    perfect = compare([a, b], [b, a])
    assert perfect.kept == 2 and perfect.touched == 0 and perfect.iou_sum == pytest.approx(2.0)


@pytest.fixture
def served(make_client, media, person_weights, tmp_path):
    """A project whose served version is a real detector of Normal/Fall people, with tasks in Label Studio."""
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, predict_batch=2)
    client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": media.url, "access_token": TOKEN})
    registry = client.app.state.backend.registry("1")
    registry.add(person_weights, {"labels": NAMES}, make_current=True)

    def task(i: int, asset: str, **extra) -> dict:
        ref = media.add("upload", f"{i}-{asset}", media.assets / asset)
        return {"id": i, "data": {"image": ref}, "annotations": [], "predictions": [], **extra}

    return client, registry, task


@pytest.fixture
def media_assets(media, assets):
    media.assets = assets
    return media


def run_autolabel(client):
    from ls_backend.jobs import autolabel_project

    try:
        return autolabel_project("1")
    except Exception as exc:
        return {"state": "failed", "error": str(exc)}


def test_autolabel_predicts_every_unlabeled_task_once_and_resumes(media_assets, served):
    client, registry, task = served
    media = media_assets
    media.handler.tasks = [
        task(1, "bus.jpg"), task(2, "zidane.jpg"),
        task(3, "bus.jpg", annotations=[{"id": 9, "was_cancelled": False, "result": []}]),  # labeled: left alone
        task(4, "zidane.jpg", predictions=[{"model_version": "v1", "result": []}]),  # already done
        task(5, "bus.jpg"), task(6, "zidane.jpg"),
        task(7, "bus.jpg", annotations=[{"id": 10, "was_cancelled": True, "result": []}]),  # skipped: predict it
    ]
    media.handler.fail_after = 2  # the third POST fails, as if Label Studio went away mid-run
    first = run_autolabel(client)
    assert first["state"] == "failed"
    assert client.get("/status/1").json()["autolabel"]["state"] == "failed"
    assert len(media.handler.predictions) == 2
    media.handler.fail_after = None
    second = run_autolabel(client)
    assert second["state"] == "finished" and second["done"] == 3
    stored = sorted(p["task"] for p in media.handler.predictions)
    assert stored == [1, 2, 5, 6, 7]  # each unlabeled task exactly once, none for labeled or done tasks
    for prediction in media.handler.predictions:
        assert prediction["model_version"] == "v1" and 0 <= prediction["score"] <= 1
        assert prediction["result"] and all(r["value"]["rectanglelabels"][0] in NAMES for r in prediction["result"])
    assert run_autolabel(client)["done"] == 0  # nothing left to do


def test_autolabel_stops_when_a_newer_version_is_served(media_assets, served, person_weights):
    client, registry, task = served
    media = media_assets
    media.handler.tasks = [task(i, "bus.jpg") for i in range(1, 7)]
    media.handler.on_prediction = lambda count: count == 1 and registry.add(person_weights, {"labels": NAMES},
                                                                          make_current=True)
    result = run_autolabel(client)
    assert result["state"] == "superseded" and "v2 replaced v1" in result["reason"]
    assert len(media.handler.predictions) == 2  # the batch in flight finished, no further batch was started
    resumed = run_autolabel(client)
    assert resumed["state"] == "finished" and resumed["version"] == "v2" and resumed["done"] == 6


def test_autolabel_route_queues_a_job_and_corrections_are_measured(media_assets, served):
    client, registry, task = served
    media = media_assets
    media.handler.tasks = [task(1, "bus.jpg"), task(2, "zidane.jpg")]
    answer = client.post("/autolabel/1")
    assert answer.status_code == 200 and answer.json()["autolabel"] == "queued"
    assert client.app.state.queue.idle(timeout=120)
    assert client.get("/status/1").json()["autolabel"]["state"] == "finished"
    shown = {p["task"]: p["result"] for p in media.handler.predictions}
    # The annotator keeps every box on task 1 but moves the first far off and deletes the last.
    final = [dict(r) for r in shown[1][:-1]]
    final[0] = {**final[0], "value": {**final[0]["value"], "x": final[0]["value"]["x"] + 40}}
    event = annotation_event(1, 1, media.handler.tasks[0]["data"]["image"], final, NAMES)
    assert client.post("/webhook", json=event).status_code == 200
    efforts = client.app.state.backend.store("1").efforts()
    assert len(efforts) == 1 and efforts[0]["version"] == "v1"
    n = len(shown[1])
    assert (efforts[0]["kept"], efforts[0]["deleted"], efforts[0]["added"]) == (n - 2, 2, 1)
    metrics = client.get("/metrics").text
    assert f'lsyolo_acceptance_rate{{project="1",version="v1"}} {(n - 2) / n}' in metrics
    assert 'lsyolo_corrected_boxes{outcome="deleted",project="1",version="v1"} 2.0' in metrics
    page = client.get("/projects/1/")
    assert page.status_code == 200 and "acceptance rate" in page.text and "v1" in page.text
    plot = client.get("/projects/1/plot.png")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")


def test_autolabel_route_refuses_a_project_without_a_version(make_client):
    client = make_client()
    assert client.post("/autolabel/3").status_code == 409
