"""Polygons and choices in a real Label Studio: annotate ten tasks, find the rest pre-annotated without Retrieve.

Thirteen pothole photos (pothole-seg, human polygons) in a project whose config has PolygonLabels and Choices on
the same image; ten are annotated through the API (outline plus 'one' or 'several' potholes). The tenth webhook
trains a segmentation and a classification model, each in its own folder, and auto-labeling stores predictions
carrying both controls on the three unlabeled tasks; Retrieve predictions is never pressed.
"""
from __future__ import annotations

import os
import sys

import pytest

from tests.kind_annotations import POLY_CHOICE_CONFIG, choice_result, polygon_result, read_seg, size_choice

from .label_studio import REPO_ROOT, SHARED_DIR, Process
from .test_training_e2e import job_failure, not_errored, poll, status_of

pytestmark = pytest.mark.e2e

DATASET = SHARED_DIR / "datasets" / "pothole-seg"
REDIS_URL = os.environ.get("LS_E2E_REDIS_URL", "redis://127.0.0.1:6379/12")
# Ten passes, not four: after four, about one run in five had no polygon above the candidate confidence on any of the
# three unlabeled tasks (2 of 11 runs failed, before and after one-checkpoint-per-run; 0 of 14 at ten passes).
TINY_TRAINING = {"TRAIN_IMGSZ": "96", "TRAIN_EPOCHS": "10", "TRAIN_TIME_BUDGET": "0", "REFINE_TIME_BUDGET": "0",
                 "MIN_ANNOTATIONS": "10", "RETRAIN_EVERY": "5", "AUTOLABEL_AFTER_TRAIN": "true",
                 "PREDICT_CONF": "0.01"}


@pytest.fixture(scope="module")
def potholes():
    if not (DATASET / "data.yaml").is_file():
        pytest.skip(f"E2E SKIPPED: the pothole-seg dataset is absent at {DATASET}")
    items = read_seg(DATASET)
    return [i for i in items if i.split == "train"][:10], [i for i in items if i.split != "train"][:3]


@pytest.mark.parametrize("mode", ["in-process", "redis"])
def test_polygons_and_choices_learned_and_pre_annotated(label_studio, start_backend, potholes, mode):
    ls = label_studio
    annotated, held_out = potholes
    env = dict(TINY_TRAINING)
    processes = []
    if mode == "redis":
        import redis

        connection = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        connection.flushdb()
        env["REDIS_URL"] = REDIS_URL
    backend = start_backend(**env)
    processes.append(backend.process)
    worker = None
    if mode == "redis":
        worker = Process("worker", [sys.executable, "-m", "ls_backend.worker"], backend.env,
                         backend.workdir / "worker.log", cwd=REPO_ROOT)
        processes.append(worker)
    try:
        project = ls.create_project(POLY_CHOICE_CONFIG, title=f"e2e polygons and choices {mode}")["id"]
        ls.import_files(project, [item.image for item in annotated + held_out])
        by_task = {}
        for task in ls.tasks(project):
            for item in annotated + held_out:
                if task["data"]["image"].endswith(f"-{item.image.name}"):
                    by_task[task["id"]] = item
        assert len(by_task) == 13, f"unexpected tasks after import: {len(by_task)}"
        ml_id = ls.connect_ml(project, backend.url)["id"]
        assert not_errored(ls, ml_id, "on connect").get("state") == "CO"

        for task, item in by_task.items():
            if item in annotated:
                ls.create_annotation(task, polygon_result(item, ["pothole"]) + choice_result([size_choice(item)]))
        assert status_of(backend, project)["annotated_tasks"] == 10

        def trained():
            s = status_of(backend, project)
            if job_failure(s):
                raise AssertionError(f"{job_failure(s)}; status {s}")
            job = s.get("job") or {}
            return job.get("state") == "finished" and job.get("accepted"), job

        job = poll(trained, 1500, "polygon and choices versions", processes)
        version = job["version"]
        assert version == "outline-v1+size-v1", job
        status = status_of(backend, project)
        assert status["controls"]["outline"][0]["task"] == "segment"
        assert status["controls"]["size"][0]["task"] == "classify"

        unlabeled = {t for t, item in by_task.items() if item in held_out}

        def pre_annotated():
            s = status_of(backend, project)
            if job_failure(s):
                raise AssertionError(f"{job_failure(s)}; status {s}")
            done = {p["task"] for p in ls.predictions(project) if p.get("model_version") == version}
            return unlabeled <= done, {"missing": sorted(unlabeled - done), "autolabel": s.get("autolabel")}

        poll(pre_annotated, 600, f"{version} predictions on every unlabeled task", processes)
        predictions = [p for p in ls.predictions(project) if p.get("model_version") == version and p["task"] in unlabeled]
        assert len(predictions) == len(unlabeled)
        for prediction in predictions:
            types = [r["type"] for r in prediction["result"]]
            assert types.count("choices") == 1, prediction
            [choice] = [r for r in prediction["result"] if r["type"] == "choices"]
            assert choice["from_name"] == "size" and choice["value"]["choices"][0] in ("one", "several")
            assert 0 <= prediction["score"] <= 1
            for region in prediction["result"]:
                if region["type"] == "polygonlabels":
                    assert region["from_name"] == "outline" and 3 <= len(region["value"]["points"]) <= 64
        assert any(r["type"] == "polygonlabels" for p in predictions for r in p["result"]), predictions
        not_errored(ls, ml_id, "after auto-labeling")
    finally:
        if worker is not None:
            worker.stop()
