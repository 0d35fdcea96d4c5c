"""Cross-checked thresholds: folds of the served version's recipe, trained for real, lend its thresholds evidence."""
from __future__ import annotations

from pathlib import Path

from tests.annotations import dataset_events
from tests.conftest import TOKEN
from tests.test_training import bccd, send  # noqa: F401 - bccd is a fixture


def annotate(store, items, names: list[str], first: int) -> None:
    from model.yolo_import import to_result

    for task_id, item in enumerate(items, start=first):
        store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(item.image)},
                   "result": to_result(item, names), "cancelled": False})


def image_of(record: dict) -> Path:
    return Path(record["data"]["image"])


def test_folds_are_groups_of_the_held_out_size_until_the_evidence_is_enough():
    from model.crosscheck import folds
    from model.policy import CROSSCHECK_IMAGES

    groups = folds(list(range(8)), 2)  # ten labeled tasks, two held out: every training task is held out once
    assert [len(g) for g in groups] == [2, 2, 2, 2] and sorted(t for g in groups for t in g) == list(range(8))
    assert [len(g) for g in folds(list(range(20)), 5)] == [5]  # 5 + 5 tasks reach CROSSCHECK_IMAGES
    assert [len(g) for g in folds(list(range(3)), 1)] == [2, 1]  # too few tasks: every one, and no more
    assert folds(list(range(40)), CROSSCHECK_IMAGES) == []  # enough held-out tasks of its own
    assert folds(list(range(8)), 2) == folds(list(reversed(range(8))), 2)  # the groups follow the tasks, not their order


def test_pooled_map50_counts_every_label_of_every_pooled_task():
    """Two folds' tasks pooled: a label one fold never saw still counts, so a fold that is right on its own two tasks
    does not make the figure read perfect."""
    from model.label_config import Box
    from model.thresholds import HeldOutImage
    from model.validator import pooled_map50

    cell, other = Box("cell", 0, 0, 10, 10), Box("other", 20, 20, 40, 40)
    right = HeldOutImage([Box("cell", 0, 0, 10, 10, 0.9)], [cell])
    missed = HeldOutImage([Box("cell", 50, 50, 60, 60, 0.8)], [other])  # a false cell, the other label never found
    assert pooled_map50([right]) > 0.99  # Ultralytics interpolates a perfect curve to 0.995
    assert pooled_map50([right, missed]) < 0.51  # 'cell' still finds its one box first; 'other' scores nothing
    assert pooled_map50([HeldOutImage([], [cell])]) == 0.0 and pooled_map50([]) == 0.0


def test_the_status_page_counts_only_folds_that_trained_a_model():
    """A fold whose images were all broken held nothing out and trained nothing: it is not one of the models."""
    from ls_backend.report import serving_note

    evidence = {"images": 8, "touched": 30, "touched_if_none_served": 40, "withheld_labels": []}
    folds = [{"tasks": [3, 4], "trained_on": [1, 2], "seconds": 1.0}, {"tasks": []}]
    note = serving_note({"labels": ["cell"], "threshold_evidence": evidence, "crosscheck": {"folds": folds}})
    assert "cross-checked: 1 more model held out" in note


def test_the_served_weights_come_back_with_thresholds_learned_on_every_fold(make_client, media, bccd):
    """Ten annotations, a quick version and a refinement round; then, while nobody labels, one fold model per group
    of training tasks, each trained without its group, and the same weights served with the pooled thresholds."""
    from ls_backend.report import serving_note
    from model.crosscheck import folds, pending
    from model.registry import read_json
    from model.yolo_import import label_config

    names, train, _ = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, refine_time_budget=4,
                         refine_rounds=1, crosscheck=True, autolabel_after_train=False)
    send(client, dataset_events(media, train[:10], names, project=1))
    assert client.app.state.queue.idle(timeout=600)
    registry = client.app.state.backend.registry("1")
    checked = registry.current()
    meta = checked.meta
    assert meta.get("crosscheck"), [(v.name, v.meta.get("reason")) for v in registry.versions()]
    source = registry.get(meta["parent"])
    assert checked.weights.read_bytes() == source.weights.read_bytes()  # the same model, other thresholds
    held, trained = source.meta["val_tasks"], source.meta["train_tasks"]
    groups = folds(trained, len(held))
    state = read_json(registry.crosscheck_dir / f"{source.name}.json")
    assert [sorted(f["tasks"]) for f in state["folds"]] == [sorted(g) for g in groups]
    for fold in state["folds"]:  # each fold model learned everything the version did except its own group
        assert sorted(fold["trained_on"]) == sorted(set(trained) - set(fold["tasks"]) | set(held))
    assert meta["crosscheck"]["tasks"] == meta["threshold_evidence"]["images"] == 10
    assert 0.0 <= meta["crosscheck"]["map50"] <= 1.0
    assert meta["threshold_evidence"]["images"] > source.meta["threshold_evidence"]["images"] == len(held)
    assert meta["val_tasks"] == held and meta["trained_upto"] == source.meta["trained_upto"]
    assert "cross-checked on 10 tasks" in meta["reason"] and "cross-checked" in serving_note(meta)
    # The fold models now serve beside the version's weights, their boxes fused with its own.
    assert len(checked.members) == meta["fused_models"] == len(groups) and "fused" in serving_note(meta)
    assert not (registry.crosscheck_dir / source.name).exists()
    task = {"id": 99, "data": {"image": media.add("upload", "unlabeled.jpg", train[10].image)}}
    body = {"project": "1.1", "tasks": [task], "label_config": label_config(names)}
    predicted = client.post("/predict", json=body).json()
    assert predicted["results"][0]["model_version"] == checked.name
    assert {str(m) for m in checked.members} <= set(client.app.state.backend.models.loaded())
    assert pending(registry) is None
    job = client.get("/status/1").json()["job"]
    assert job["run"] == "crosscheck" and job["accepted"] and job["version"] == checked.name
    listed = {v["version"]: v for v in client.get("/versions", params={"project": "1"}).json()["details"]}
    assert listed[checked.name]["crosscheck"]["tasks"] == 10  # every figure says on how many tasks it rests
    assert "<td>10</td>" in client.get("/projects/1/").text
    # Nothing new since: the cross-checked version is not checked again, and nothing else trains.
    assert client.app.state.scheduler.request("1") == "queued"
    assert client.app.state.queue.idle(timeout=60)
    assert client.get("/status/1").json()["job"]["state"] == "skipped"
    assert registry.current_name() == checked.name


def test_new_annotations_come_before_the_next_fold(backend_env, tmp_path, bccd, backbone_weights):
    """A fold is idle work: once annotations change, the next run is an update, and the folds of the old version
    are not resumed for the new one."""
    from ls_backend.backend import Backend
    from ls_backend.jobs import next_run
    from ls_backend.settings import get_settings
    from model.crosscheck import pending
    from model.label_config import parse_label_config
    from model.pipeline import run_training
    from model.trainer import TrainParams
    from model.yolo_import import label_config

    names, train, _ = bccd
    backend_env(refine_time_budget=4, refine_rounds=0, crosscheck=True)
    backend = Backend(get_settings())
    store, registry = backend.store("1"), backend.registry("1")
    store.update_info(label_config=label_config(names))

    annotate(store, train[:10], names, 1)
    run_training(store, registry, parse_label_config(label_config(names)), image_of,
                 backbone_weights, TrainParams(epochs=2, imgsz=64, time_budget=0, freeze=0), 10, True, 5,
                 refined=True, refine_round=1)
    assert next_run(backend, "1", False, cross_check=True) == ("crosscheck", 4, 0)
    assert next_run(backend, "1", False) is None  # a project of several controls is not cross-checked
    annotate(store, train[10:11], names, 11)
    assert next_run(backend, "1", False, cross_check=True)[0] == "update"
    assert pending(registry) is not None  # still owed to v1, but an update comes first


def test_the_next_version_learns_its_thresholds_with_the_last_cross_checks_folds(backend_env, bccd, backbone_weights):
    """Labeling goes on after a cross-check: the next version holds out as few tasks as before, so the finished
    folds' predictions of tasks it trains on join its own held-out ones, and its own held-out file stays its own."""
    from ls_backend.backend import Backend
    from ls_backend.report import serving_note
    from ls_backend.settings import get_settings
    from model.crosscheck import lent_folds, pending, run_crosscheck
    from model.label_config import parse_label_config
    from model.pipeline import run_training
    from model.thresholds import load_held_out
    from model.trainer import TrainParams
    from model.yolo_import import label_config

    names, train, _ = bccd
    backend_env(crosscheck=True)
    backend = Backend(get_settings())
    store, registry = backend.store("1"), backend.registry("1")
    store.update_info(label_config=label_config(names))
    control = parse_label_config(label_config(names))
    params = TrainParams(epochs=2, imgsz=64, time_budget=0, freeze=0)
    annotate(store, train[:10], names, 1)
    first = run_training(store, registry, control, image_of, backbone_weights, params, 10, True, 5).version
    assert first.meta["lent_folds"] is None  # no cross-check has run yet
    while pending(registry):
        run_crosscheck(store, registry, control, image_of, backbone_weights, params)
    checked = registry.current()
    assert checked.meta["crosscheck"]
    annotate(store, train[10:12], names, 11)
    version = run_training(store, registry, control, image_of, backbone_weights, params, 10, False, 5).version
    lent = version.meta["lent_folds"]
    lent_tasks = {task for fold in lent["folds"] for task in fold["tasks"]}
    assert lent["from"] == checked.name and len(lent["folds"]) == len(checked.meta["crosscheck"]["folds"])
    assert lent_tasks <= set(version.meta["train_tasks"]) and not lent_tasks & set(version.meta["val_tasks"])
    assert version.meta["threshold_evidence"]["images"] == len(version.meta["val_tasks"]) + lent["tasks"]
    assert lent["tasks"] == len(lent_tasks)
    assert len(load_held_out(version.held_out)) == len(version.meta["val_tasks"])  # its own cross-check pools this
    assert f"predicted by the fold models of {checked.name}'s cross-check" in serving_note(version.meta)
    assert lent_folds(registry, set(range(1, 100)), names) == ([], None)  # folds far behind a version lend nothing
    assert lent_folds(registry, lent_tasks, names + ["other"]) == ([], None)  # nor folds of another label set
