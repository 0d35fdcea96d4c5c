"""A real Label Studio connected to our backend retrieves person boxes for Ultralytics' own sample photos."""
from __future__ import annotations

import time

import pytest
import requests

from .label_studio import basic_auth_header, ultralytics_asset, wait_until

pytestmark = pytest.mark.e2e

# `person` is served by the person-fall detector, whose classes are Normal and Fall.
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="person" background="green" predicted_values="Normal,Fall"/>
  </RectangleLabels>
</View>"""

# The people in the photos, in pixels (x1, y1, x2, y2), as a COCO detector draws them. Each "must" person needs a
# predicted box on it; the partly visible man at bus.jpg's left edge may or may not be found.
PEOPLE = {
    "bus.jpg": {"size": (810, 1080),
                "must": [(50, 398, 243, 905), (221, 405, 344, 857), (668, 392, 810, 880)],
                "may": [(0, 550, 63, 873)]},
    "zidane.jpg": {"size": (1280, 720),
                   "must": [(749, 43, 1148, 705), (115, 196, 1095, 708)],
                   "may": []},
}
MATCH_IOU = 0.4  # a "must" person is found when some predicted box overlaps it at least this much
STRAY_IOU = 0.3  # every predicted box must overlap some person at least this much (no box on the bus)


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def pixel_box(region: dict) -> tuple[float, float, float, float]:
    v, w, h = region["value"], region["original_width"], region["original_height"]
    x, y = v["x"] * w / 100, v["y"] * h / 100
    return x, y, x + v["width"] * w / 100, y + v["height"] * h / 100


def set_up_project(ls, title: str) -> tuple[int, dict[int, str]]:
    """A project with bus.jpg uploaded and zidane.jpg served from a Local Files storage; task id -> photo name."""
    project = ls.create_project(LABEL_CONFIG, title=title)["id"]
    ls.import_files(project, [ultralytics_asset("bus.jpg")])
    folder = f"project{project}"
    url = ls.put_local_file(ultralytics_asset("zidane.jpg"), f"{folder}/zidane.jpg")
    ls.add_local_storage(project, ls.document_root / folder)
    ls.import_tasks(project, [{"image": url}])
    names = {}
    for task in ls.tasks(project):
        image = task["data"]["image"]
        uploaded = image.startswith(f"/data/upload/{project}/") and image.endswith("-bus.jpg")
        names[task["id"]] = "zidane.jpg" if image == url else "bus.jpg" if uploaded else image
        # Label Studio itself must serve the image, or the backend has nothing to fetch.
        served = ls.session.get(ls.url + image, timeout=30)
        assert served.status_code == 200 and len(served.content) > 10_000, \
            f"Label Studio does not serve {image}: {served.status_code}"
    assert sorted(names.values()) == ["bus.jpg", "zidane.jpg"], f"unexpected tasks after import: {names}"
    return project, names


def connect(ls, project: int, backend, basic_auth=None) -> dict:
    """Connect the backend and check Label Studio calls it connected, not errored."""
    ml = ls.connect_ml(project, backend.url, basic_auth=basic_auth)
    state = ls.ml_backend(ml["id"])
    assert state.get("state") != "ER", f"Label Studio marks the backend as errored: {state.get('error_message')}"
    assert state.get("state") == "CO", f"backend not connected: state={state.get('state')} " \
                                       f"error={state.get('error_message')}"
    return state


def retrieve_and_check(ls, project: int, names: dict[int, str], ml: dict) -> list[dict]:
    """Press "Retrieve predictions" and check the stored predictions put person boxes on the people."""
    started = time.monotonic()
    answer = ls.retrieve_predictions(project)
    seconds = time.monotonic() - started
    predictions = ls.predictions(project)
    by_task: dict[int, list[dict]] = {}
    for prediction in predictions:
        by_task.setdefault(prediction["task"], []).append(prediction)
    assert set(by_task) == set(names), \
        f"predictions stored for tasks {sorted(by_task)}, wanted {sorted(names)} " \
        f"(action answered {answer} after {seconds:.1f}s)"
    state = ls.ml_backend(ml["id"])
    assert state.get("state") != "ER", f"backend errored while predicting: {state.get('error_message')}"
    for task, found in by_task.items():
        name = names[task]
        assert len(found) == 1, f"{name}: {len(found)} predictions for one retrieve: {found}"
        prediction = found[0]
        assert prediction.get("model_version"), f"{name}: prediction without model_version: {prediction}"
        assert prediction.get("score") is not None and prediction["score"] > 0, f"{name}: no score: {prediction}"
        regions = prediction["result"]
        assert regions, f"{name}: prediction without boxes: {prediction}"
        width, height = PEOPLE[name]["size"]
        boxes = []
        for region in regions:
            assert region["type"] == "rectanglelabels" and region["from_name"] == "label" \
                and region["to_name"] == "image", f"{name}: region for the wrong control: {region}"
            assert region["value"]["rectanglelabels"] == ["person"], f"{name}: not a person box: {region}"
            assert (region["original_width"], region["original_height"]) == (width, height), \
                f"{name}: wrong image size in {region}"
            assert 0 < region.get("score", 0) <= 1, f"{name}: region without a score: {region}"
            boxes.append(pixel_box(region))
        people = PEOPLE[name]["must"] + PEOPLE[name]["may"]
        for person in PEOPLE[name]["must"]:
            best = max(iou(person, box) for box in boxes)
            assert best >= MATCH_IOU, f"{name}: nobody boxed at {person} (best IoU {best:.2f}); boxes {boxes}"
        for box in boxes:
            best = max(iou(person, box) for person in people)
            assert best >= STRAY_IOU, f"{name}: box {box} is on no person (best IoU {best:.2f})"
    versions = {p["model_version"] for p in predictions}
    assert len(versions) == 1, f"one retrieve gave several model versions: {versions}"
    if state.get("model_version"):
        assert versions == {state["model_version"]}, \
            f"predictions carry {versions} but Label Studio lists the backend at {state['model_version']}"
    return predictions


def test_retrieve_predictions_boxes_people(label_studio, backend):
    project, names = set_up_project(label_studio, "e2e predict")
    ml = connect(label_studio, project, backend)
    retrieve_and_check(label_studio, project, names, ml)


def test_retrieve_predictions_with_basic_auth(label_studio, start_backend):
    # Non-ASCII: Label Studio (Python requests) sends the pair as Latin-1, the webhook header we set is UTF-8.
    creds = ("zoë", "pässwörd")
    backend = start_backend(BASIC_AUTH_USER=creds[0], BASIC_AUTH_PASS=creds[1])
    anonymous = requests.get(f"{backend.url}/health", timeout=10)
    assert anonymous.status_code == 401, f"backend answers without credentials: {anonymous.status_code}"

    project, names = set_up_project(label_studio, "e2e predict basic auth")
    refused = label_studio.api("POST", "/api/ml", expect=(201, 400), json={
        "url": backend.url, "project": project, "title": "no creds", "auth_method": "NONE"})
    assert refused.status_code == 400, f"Label Studio connected without credentials: {refused.text[:300]}"
    ml = connect(label_studio, project, backend, basic_auth=creds)
    retrieve_and_check(label_studio, project, names, ml)

    # No manual step: the backend (it has LABEL_STUDIO_URL and an API key) gives the webhook Label Studio
    # created for it our credentials, and then an annotation reaches it.
    wanted = basic_auth_header(*creds)["Authorization"]

    def patched():
        hooks = [h for h in label_studio.webhooks(project) if h["url"] == f"{backend.url}/webhook"]
        return hooks if hooks and all((h.get("headers") or {}).get("Authorization") == wanted for h in hooks) else None

    wait_until(patched, 90, backend.process, f"the webhook of project {project} to carry the backend's credentials")
    task = next(t for t, name in names.items() if name == "bus.jpg")
    label_studio.create_annotation(task, [{
        "from_name": "label", "to_name": "image", "type": "rectanglelabels",
        "original_width": 810, "original_height": 1080, "image_rotation": 0,
        "value": {"x": 6.2, "y": 36.9, "width": 23.8, "height": 46.9, "rotation": 0, "rectanglelabels": ["person"]},
    }])
    status = backend.get(f"/status/{project}")
    assert status.status_code == 200, f"/status/{project} answered {status.status_code}: {status.text[:300]}"
    assert status.json().get("annotated_tasks") == 1, \
        f"the ANNOTATION_CREATED webhook did not reach the backend with basic auth: {status.json()}"
