"""Self-training: which unlabeled tasks become pseudo-labels, and that they are trained on but never judged on."""
from __future__ import annotations

from pathlib import Path

from model.dataset import build_dataset, is_held_out
from model.label_config import parse_label_config
from model.policy import NEVER, PSEUDO_MIN_BOX_SCORE, pseudo_label_quota, usable_pseudo_label
from model.yolo_import import class_names, label_config, read_dataset, to_result
from tests.conftest import TOKEN, shared_file
from tests.test_autolabel import CONFIG, NAMES


def test_only_confident_predictions_with_boxes_become_pseudo_labels():
    sure, torn = {"score": PSEUDO_MIN_BOX_SCORE}, {"score": PSEUDO_MIN_BOX_SCORE - 0.01}
    assert usable_pseudo_label({"result": [sure, sure], "score": 0.1})
    assert not usable_pseudo_label({"result": [sure, torn], "score": 0.9})  # one box it was torn about
    assert not usable_pseudo_label({"result": [], "score": 1.0})  # nothing to learn from
    assert pseudo_label_quota(10) == 30 and pseudo_label_quota(1000) == 100


def test_unlabeled_tasks_are_pseudo_labeled_by_the_served_version(make_client, media, person_weights, assets):
    """Labeled tasks are skipped, a stored prediction of the served version is reused, the rest are predicted."""
    from ls_backend.jobs import pseudo_labels

    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, predict_batch=2)
    client.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": media.url, "access_token": TOKEN})
    backend = client.app.state.backend
    version = backend.registry("1").add(person_weights, {"labels": NAMES}, make_current=True).name
    for task_id in (1, 2):  # two human labels: a quota of six pseudo-labels
        backend.store("1").put({"task_id": task_id, "annotation_id": task_id, "data": {}, "result": [],
                                "cancelled": False})
    stored_box = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 810,
                   "original_height": 1080, "score": 0.9, "value": {"x": 1, "y": 1, "width": 9, "height": 9,
                                                                  "rotation": 0, "rectanglelabels": ["Normal"]}}]

    def task(i: int, asset: str, **extra) -> dict:
        return {"id": i, "data": {"image": media.add("upload", f"{i}-{asset}", assets / asset)},
                "annotations": [], "predictions": [], **extra}

    media.handler.tasks = [
        task(1, "bus.jpg", annotations=[{"id": 1, "result": []}]),  # labeled: never a pseudo-label
        task(3, "bus.jpg", predictions=[{"model_version": version, "score": 0.2, "result": stored_box}]),
        task(4, "zidane.jpg", predictions=[{"model_version": version, "score": 0.9,
                                            "result": [{**stored_box[0], "score": 0.3}]}]),
        task(5, "zidane.jpg", predictions=[{"model_version": "v0", "score": 0.9, "result": stored_box}]),
        task(6, "bus.jpg"),
    ]
    control = parse_label_config(CONFIG)
    chosen = {r["task_id"]: r for r in pseudo_labels(backend, "1", control)}
    assert chosen[3]["result"] == stored_box  # reused, not predicted again
    assert 1 not in chosen and 4 not in chosen  # labeled; ambiguous
    _, fresh, _ = backend.predict_tasks("1", control, [media.handler.tasks[3], media.handler.tasks[4]])
    for task_id, prediction in zip((5, 6), fresh):
        assert (task_id in chosen) == usable_pseudo_label(prediction)
        if task_id in chosen:
            assert chosen[task_id]["result"] == prediction["result"]
    assert 6 in chosen  # the person detector is sure of the people on bus.jpg
    # A version that withholds a label would teach its objects as background: no pseudo-labels from it.
    backend.registry("1").add(person_weights, {"labels": NAMES, "thresholds": {"default": 0.25, "per_label": {
        NAMES[-1]: NEVER}}}, make_current=True)
    assert pseudo_labels(backend, "1", control) == []


def test_pseudo_labeled_tasks_are_trained_on_but_never_held_out(backend_env, tmp_path, backbone_weights):
    from model.pipeline import run_training
    from model.project_store import ProjectStore
    from model.registry import ProjectRegistry
    from model.trainer import TrainParams

    backend_env()
    root = shared_file("datasets", "bccd")
    names = class_names(root)
    items = [i for i in read_dataset(root) if i.split == "train"][:16]
    control = parse_label_config(label_config(names))
    store, registry = ProjectStore(tmp_path / "m", 1), ProjectRegistry(tmp_path / "m", 1)
    for task_id, item in enumerate(items[:10], start=1):
        store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(item.image)},
                   "result": to_result(item, names), "cancelled": False})
    # Task ids of which several hash into the held-out share: pseudo-labels must stay in training all the same.
    pseudo_ids = [t for t in range(100, 400) if is_held_out(t)][:3] + [t for t in range(100, 400) if not is_held_out(t)][:3]
    pseudo = [{"task_id": t, "data": {"image": str(item.image)}, "result": to_result(item, names)}
              for t, item in zip(pseudo_ids, items[10:])]
    fetch = lambda record: Path(record["data"]["image"])
    info = build_dataset(store.records() + [{**p, "pseudo": True} for p in pseudo], control, fetch, tmp_path / "ds")
    assert sorted(info.pseudo) == sorted(pseudo_ids) and not set(info.val) & set(pseudo_ids)
    assert set(info.val) == {t for t in range(1, 11) if is_held_out(t)} or len(info.val) == 1
    # Task 1 was labeled by a human after its pseudo-label was made: the human label wins.
    stale = {"task_id": 1, "data": {"image": str(items[15].image)}, "result": []}
    outcome = run_training(store, registry, control, fetch, backbone_weights,
                           TrainParams(epochs=2, imgsz=64, time_budget=0), 10, True, 5, pseudo=pseudo + [stale])
    meta = outcome.version.meta
    assert meta["pseudo_labeled"] == 6 and meta["annotations"] == 10
    assert set(meta["train_tasks"]) >= set(pseudo_ids) and not set(meta["val_tasks"]) & set(pseudo_ids)
