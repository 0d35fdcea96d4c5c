"""Polygons, choices, keypoints and rotated boxes: parsed, converted, measured, and learned by real tiny training."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from model.kind_dataset import label_rows
from model.kind_effort import compare_choices, compare_polygons, measure
from model.kinds import (ChoicesControl, KeyPointLabelsControl, Polygon, PolygonLabelsControl, ls_rectangle,
                         parse_controls, polygon_iou, rotated_corners, simplify)
from model.label_config import ConfigError, RectangleLabelsControl
from tests.conftest import TOKEN, shared_file
from tests.kind_annotations import (POLY_CHOICE_CONFIG, choice_result, event, polygon_result, read_seg,
                                    size_choice)

MULTI = ('<View><Image name="img" value="$photo"/><Text name="t" value="$text"/>'
         '<RectangleLabels name="box" toName="img"><Label value="car" predicted_values="car,truck"/></RectangleLabels>'
         '<Choices name="weather" toName="img" choice="multiple"><Choice value="rain"/><Choice value="fog"/></Choices>'
         '<Choices name="sentiment" toName="t"><Choice value="pos"/></Choices>'
         '<PolygonLabels name="road" toName="img"><Label value="lane"/></PolygonLabels>'
         '<KeyPointLabels name="face" toName="img"><Label value="eye"/><Label value="nose"/></KeyPointLabels></View>')


def test_every_control_on_an_image_is_parsed_in_config_order():
    controls = parse_controls(MULTI)
    assert [type(c) for c in controls] == [RectangleLabelsControl, ChoicesControl, PolygonLabelsControl,
                                           KeyPointLabelsControl]  # the Choices about a Text is not ours
    box, weather, road, face = controls
    assert box.predicted_values == {"car": ("car", "truck")} and box.value_key == "photo"
    assert weather.multiple and weather.labels == ("rain", "fog") and weather.task == "classify"
    assert road.task == "segment" and face.task == "pose" and face.labels == ("eye", "nose")
    assert not parse_controls(POLY_CHOICE_CONFIG)[1].multiple
    with pytest.raises(ConfigError, match="PolygonLabels"):
        parse_controls('<View><Image name="i" value="$i"/><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>')
    with pytest.raises(ConfigError, match="has no <Choice"):
        parse_controls('<View><Image name="i" value="$i"/><Choices name="c" toName="i"></Choices></View>')


def test_polygons_round_trip_and_corrections_are_measured_by_mask_iou():
    control = parse_controls(POLY_CHOICE_CONFIG)[0]
    square = Polygon("pothole", ((10.0, 10.0), (50.0, 10.0), (50.0, 50.0), (10.0, 50.0)), 0.9)
    region = control.to_region(square, 200, 100)
    assert region["value"]["points"][1] == [25.0, 10.0] and region["type"] == "polygonlabels"
    [back], unknown = control.from_result([region, {**region, "value": {**region["value"], "polygonlabels": ["x"]}}])
    assert back.points == square.points and unknown == ["x"]
    nudged = Polygon("pothole", ((11.0, 10.0), (50.0, 10.0), (50.0, 51.0), (10.0, 50.0)))
    shrunk = Polygon("pothole", ((10.0, 10.0), (35.0, 10.0), (35.0, 50.0), (10.0, 50.0)))
    assert polygon_iou(square, nudged) > 0.9 and 0.5 < polygon_iou(square, shrunk) < 0.75
    effort = compare_polygons([square, shrunk], [nudged])
    assert (effort.kept, effort.deleted) == (1, 1)
    assert compare_polygons([shrunk], [square]).moved == 1


def test_choices_are_kept_or_changed():
    assert compare_choices(["rain"], ["rain"]).acceptance == 1.0
    changed = compare_choices(["rain"], ["fog"])
    assert (changed.kept, changed.relabelled, changed.touched) == (0, 1, 1)
    both = compare_choices(["rain"], ["rain", "fog"])
    assert (both.kept, both.added) == (1, 1)
    weather = parse_controls(MULTI)[1]
    predicted = [weather.to_result(["rain"], 0.8)]
    final = [{**predicted[0], "value": {"choices": ["fog"]}}]
    assert measure(weather, predicted, final).relabelled == 1
    assert measure(weather, [], final).touched == 0  # we predicted nothing for it: nothing to measure


def test_predicted_outlines_are_simplified_to_a_sensible_number_of_vertices():
    angles = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    circle = np.stack([100 + 80 * np.cos(angles), 100 + 80 * np.sin(angles)], axis=1)
    points = simplify(circle)
    assert 8 <= len(points) <= 64
    exact = Polygon("a", tuple(map(tuple, circle)))
    assert polygon_iou(exact, Polygon("a", tuple(map(tuple, points)))) > 0.97


def test_rotated_boxes_convert_both_ways():
    value = ls_rectangle(100.0, 60.0, 80.0, 20.0, math.radians(30))
    corners = rotated_corners({**value, "x": value["x"] / 2, "y": value["y"] / 1, "width": value["width"] / 2,
                               "height": value["height"]}, 200, 100)  # percent of a 200x100 image
    cx, cy = sum(x for x, _ in corners) / 4, sum(y for _, y in corners) / 4
    assert cx == pytest.approx(100.0) and cy == pytest.approx(60.0)
    assert math.dist(corners[0], corners[1]) == pytest.approx(80.0) and value["rotation"] == pytest.approx(30.0)


def test_keypoints_belong_to_the_smallest_rectangle_holding_them():
    face = parse_controls(MULTI)[3]
    point = lambda label, x, y: {"from_name": "face", "to_name": "img", "type": "keypointlabels",
                                 "original_width": 100, "original_height": 100,
                                 "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]}}
    rect = {"from_name": "box", "to_name": "img", "type": "rectanglelabels", "original_width": 100,
            "original_height": 100, "value": {"x": 10, "y": 10, "width": 30, "height": 30, "rotation": 0,
                                              "rectanglelabels": ["car"]}}
    result = [rect, point("eye", 20, 20), point("nose", 25, 30), point("eye", 80, 80)]
    rows, unknown, _ = label_rows({"result": result}, face, "pose", (100, 100))
    assert unknown == [] and len(rows) == 2
    inside = [float(v) for v in rows[0].split()]
    assert inside[1:5] == pytest.approx([0.25, 0.25, 0.3, 0.3]) and inside[5:] == pytest.approx([0.2, 0.2, 2, 0.25, 0.3, 2])
    alone = [float(v) for v in rows[1].split()]
    assert alone[5:8] == pytest.approx([0.8, 0.8, 2]) and alone[8:] == [0, 0, 0]  # the nose was not marked


@pytest.fixture(scope="module")
def potholes():
    items = read_seg(shared_file("datasets", "pothole-seg"))
    return [i for i in items if i.split == "train"], [i for i in items if i.split != "train"]


def send(client, events):
    answers = []
    for body in events:
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def test_polygons_and_choices_of_one_config_are_each_learned_and_served(make_client, media, potholes):
    """Ten annotated tasks train a segmentation and a classification model, each in its own folder; predictions carry
    both; a broken classifier leaves the polygons served; corrections are measured per control."""
    train, held = potholes
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, train_epochs=6, train_imgsz=96,
                         predict_conf=0.01)
    names = ["pothole"]
    events = []
    for task_id, item in enumerate(train[:10], start=1):
        ref = media.add("upload", f"k-{item.image.name}", item.image)
        events.append(event(1, task_id, ref, polygon_result(item, names) + choice_result([size_choice(item)]),
                            POLY_CHOICE_CONFIG))
    answers = send(client, events)
    assert [a["training"] for a in answers] == [None] * 9 + ["queued"]
    assert client.app.state.queue.idle(timeout=1500)
    status = client.get("/status/1").json()
    assert status["job"]["state"] == "finished", status["job"]
    assert status["versions"] == []  # no box control: the project's own folder holds no model
    outline, size = status["controls"]["outline"], status["controls"]["size"]
    assert outline[0]["task"] == "segment" and outline[0]["status"] == "current" and outline[0]["labels"] == names
    assert size[0]["task"] == "classify" and sorted(size[0]["labels"]) == ["one", "several"]
    assert 0.0 <= size[0]["metrics"]["fitness"] <= 1.0 and outline[0]["val_tasks"] == size[0]["val_tasks"]
    assert status["job"]["version"] == "outline-v1+size-v1"
    listed = client.get("/versions", params={"project": 1}).json()
    assert listed["versions"] == ["outline-v1", "size-v1"] and listed["details"][1]["task"] == "classify"
    setup = client.post("/setup", json={"project": "1.1", "schema": POLY_CHOICE_CONFIG, "hostname": media.url,
                                        "access_token": TOKEN})
    assert setup.status_code == 200 and setup.json()["model_version"] == "outline-v1+size-v1"

    tasks = [{"id": 100 + k, "data": {"image": media.add("upload", f"h-{item.image.name}", item.image)}}
             for k, item in enumerate(held[:3])]
    body = {"project": "1.1", "label_config": POLY_CHOICE_CONFIG, "tasks": tasks}
    predicted = client.post("/predict", json=body).json()
    assert predicted["model_version"] == "outline-v1+size-v1"
    for item in predicted["results"]:
        kinds = {r["type"] for r in item["result"]}
        assert "choices" in kinds and 0.0 <= item["score"] <= 1.0
        [choice] = [r for r in item["result"] if r["type"] == "choices"]
        assert len(choice["value"]["choices"]) == 1 and choice["value"]["choices"][0] in ("one", "several")
        for region in item["result"]:
            if region["type"] == "polygonlabels":
                assert 3 <= len(region["value"]["points"]) <= 64 and region["value"]["polygonlabels"] == names
                assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in region["value"]["points"])
    assert any(r["type"] == "polygonlabels" for item in predicted["results"] for r in item["result"])

    # The annotator corrects task 100: the effort of each control is recorded against the version it saw.
    store = client.app.state.backend.store("1")
    final = polygon_result(held[0], names) + choice_result([size_choice(held[0])])
    send(client, [event(1, 100, tasks[0]["data"]["image"], final, POLY_CHOICE_CONFIG)])
    [effort] = store.efforts()
    assert effort["version"] == "outline-v1+size-v1" and set(effort["controls"]) == {"outline", "size"}
    assert effort["controls"]["size"]["predicted"] == 1

    # One control's failure never empties the others: a classifier that cannot load still leaves the outlines.
    registry_root = client.app.state.backend.settings.model_dir / "1" / "controls" / "size" / "versions" / "v1"
    (registry_root / "weights.pt").write_bytes(b"not a checkpoint")
    again = client.post("/predict", json=body).json()
    assert all(r["type"] == "polygonlabels" for item in again["results"] for r in item["result"])
    assert any(item["result"] for item in again["results"])


def test_choices_alone_single_and_multiple_learn_from_box_crops(backend_env, tmp_path, backbone_weights):
    """A classifier trained on crops of the blood-cell boxes; choice="multiple" may answer several classes."""
    from model.kind_predictor import kind_label_map, predict_kind
    from model.kind_training import run_kind_training
    from model.predictor import LoadedModel
    from model.project_store import ProjectStore
    from model.registry import ProjectRegistry
    from model.trainer import TrainParams
    from tests.kind_annotations import crops
    from ultralytics import YOLO

    from model.images import read_image

    backend_env()
    names = ["RBC", "WBC", "Platelets"]
    samples = crops(shared_file("datasets", "bccd"), names, 5, tmp_path / "crops")
    config = ('<View><Image name="image" value="$image"/><Choices name="cell" toName="image" choice="{}">'
              + "".join(f'<Choice value="{n}"/>' for n in names) + "</Choices></View>")
    for multiple in (False, True):
        control = parse_controls(config.format("multiple" if multiple else "single"))[0]
        assert control.multiple == multiple
        store = ProjectStore(tmp_path / f"m{multiple}", 1)
        registry = ProjectRegistry(tmp_path / f"m{multiple}" / "1" / "controls", "cell")
        for task_id, (path, name) in enumerate(samples, start=1):
            store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(path)},
                       "result": choice_result([name], "cell"), "cancelled": False})
        outcome = run_kind_training(store, registry, control, "classify", lambda r: __import__("pathlib").Path(r["data"]["image"]),
                                    backbone_weights, TrainParams(epochs=4, imgsz=64, time_budget=0), 10, True, 3)
        assert outcome.accepted and registry.current().meta["task"] == "classify"
        assert sorted(registry.current().meta["labels"]) == sorted(names)
        model = LoadedModel(YOLO(str(registry.current().weights)))
        label_map = kind_label_map(control, "classify", model.names, aliases=False)
        assert sorted(label_map.values()) == sorted(names)
        images = [read_image(path) for path, _ in samples[:4]]
        for prediction in predict_kind(model, images, control, "classify", label_map, 64, 0.25, 4):
            [result] = prediction.regions
            assert result["type"] == "choices" and result["from_name"] == "cell"
            assert 1 <= len(result["value"]["choices"]) <= (3 if multiple else 1)
            assert 0.0 <= prediction.score <= 1.0
        second = run_kind_training(store, registry, control, "classify", lambda r: __import__("pathlib").Path(r["data"]["image"]),
                                   backbone_weights, TrainParams(epochs=2, imgsz=64, time_budget=0), 10, True, 3)
        assert second.version.meta["parent"] == "v1" and "held-out tasks" in second.reason
        shutil.rmtree(tmp_path / f"m{multiple}")


@pytest.mark.parametrize("kind", ["obb", "pose"])
def test_rotated_boxes_learn_oriented_boxes_and_keypoints_learn_a_pose_model(backend_env, tmp_path, potholes,
                                                                            backbone_weights, kind):
    """Rotated rectangles (each pothole outline's minimum-area rectangle) make the box control an OBB model;
    keypoints (each outline's two ends, inside its box) make a pose model; both predict their own regions."""
    from pathlib import Path

    from ls_backend.backend import Backend
    from ls_backend.controls import control_models
    from ls_backend.settings import get_settings
    from model.images import read_image
    from model.kind_predictor import kind_label_map, predict_kind
    from model.kind_training import run_kind_training
    from model.predictor import LoadedModel
    from model.project_store import ProjectStore
    from model.trainer import TrainParams
    from tests.kind_annotations import keypoint_result, rotated_box_result
    from ultralytics import YOLO

    backend_env(model_dir=str(tmp_path / "models"))
    train, held = potholes
    config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
              '<Label value="pothole"/></RectangleLabels></View>') if kind == "obb" else (
        '<View><Image name="image" value="$image"/><RectangleLabels name="object" toName="image">'
        '<Label value="pothole"/></RectangleLabels><KeyPointLabels name="ends" toName="image">'
        '<Label value="left"/><Label value="right"/></KeyPointLabels></View>')
    backend = Backend(get_settings())
    store = ProjectStore(backend.settings.model_dir, 1)
    for task_id, item in enumerate(train[:10], start=1):
        result = rotated_box_result(item) if kind == "obb" else keypoint_result(item)
        store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(item.image)},
                   "result": result, "cancelled": False})
    models = control_models(backend, "1", parse_controls(config), store.records())
    model = models[-1]
    assert model.task == kind and not model.primary
    if kind == "pose":
        assert models[0].primary and models[0].task == "detect"  # the rectangles are still boxes of their own
    outcome = run_kind_training(store, model.registry, model.control, kind, lambda r: Path(r["data"]["image"]),
                                backbone_weights, TrainParams(epochs=4, imgsz=128, time_budget=0), 10, True, 3)
    current = model.registry.current()
    assert outcome.accepted and current.meta["task"] == kind and current.meta["control"] == model.control.name
    served = control_models(backend, "1", parse_controls(config))  # without records: read from the registry
    assert served[-1].task == kind
    loaded = LoadedModel(YOLO(str(current.weights)))
    assert loaded.yolo.task == kind
    if kind == "pose":
        assert tuple(loaded.yolo.model.kpt_shape) == (2, 3)
    label_map = kind_label_map(model.control, kind, loaded.names, aliases=False)
    images = [read_image(item.image) for item in held[:2]]
    for prediction in predict_kind(loaded, images, model.control, kind, label_map, 128, 0.0, 2):
        assert 0.0 <= prediction.score <= 1.0
        for region in prediction.regions:
            assert region["from_name"] == model.control.name
            assert region["type"] == ("rectanglelabels" if kind == "obb" else "keypointlabels")
            if kind == "obb":
                assert 0 <= region["value"]["rotation"] < 360 and region["value"]["rectanglelabels"] == ["pothole"]
            else:
                assert region["value"]["keypointlabels"][0] in ("left", "right")


def test_a_control_name_from_the_config_never_reaches_outside_the_project(tmp_path):
    from ls_backend.controls import control_folder, control_registry

    assert control_folder("outline") == "outline"
    for hostile in ("../../etc", "..", "a/b", ".hidden", ""):
        folder = control_folder(hostile)
        assert "/" not in folder and not folder.startswith(".")
        assert control_registry(tmp_path, "1", hostile).root.parent == tmp_path / "1" / "controls"
