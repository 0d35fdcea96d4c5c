"""Webhooks to trained, versioned, served models: in-process and on RQ, with real Ultralytics training."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.yolo_import import class_names, label_config, read_dataset
from tests.annotations import annotation_event, dataset_events, export_tasks
from tests.conftest import REDIS_TEST_URL, REPO, TOKEN, recorded, shared_file


@pytest.fixture(scope="module")
def bccd():
    root = shared_file("datasets", "bccd")
    items = read_dataset(root)
    return class_names(root), [i for i in items if i.split == "train"], [i for i in items if i.split != "train"]


@pytest.fixture(scope="module")
def potholes():
    root = shared_file("datasets", "pothole-seg")
    items = read_dataset(root)
    return class_names(root), [i for i in items if i.split == "train"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def send(client, events: list[dict]) -> list[dict]:
    answers = []
    for event in events:
        response = client.post("/webhook", json=event)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def test_recorded_events_are_all_understood(make_client):
    client = make_client()
    for name in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "PROJECT_UPDATED",
                 "TASKS_CREATED"):
        response = client.post("/webhook", json=recorded(f"webhook_{name}"))
        assert response.status_code == 200, (name, response.text)
        assert response.json()["action"] == name
    store = client.app.state.backend.store("1")
    [record] = store.records()  # annotation 1, created then updated from dog to cat; the deletion named id 2
    assert record["annotation_id"] == 1 and record["result"][0]["value"]["rectanglelabels"] == ["cat"]
    deleted = recorded("webhook_ANNOTATIONS_DELETED")
    deleted["annotations"] = [{"id": 1}]
    assert client.post("/webhook", json=deleted).status_code == 200
    assert store.records() == []


def test_cancelled_and_empty_annotations(make_client):
    client = make_client()
    names = ["cat", "dog"]
    send(client, [annotation_event(1, 7, "/data/upload/1/a.png", [], names),
                  annotation_event(1, 8, "/data/upload/1/b.png", [], names, cancelled=True)])
    store = client.app.state.backend.store("1")
    assert [(r["task_id"], r["result"]) for r in store.records()] == [(7, [])]  # empty = a real "nothing here"


def test_ten_annotations_train_a_served_version_in_process(make_client, media, bccd, potholes):
    """Two projects with different labels at once; each gets its own model; /setup reports the new version."""
    names, train, _ = bccd
    pothole_names, pothole_train = potholes
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN)
    answers = send(client, dataset_events(media, train[:10], names, project=1))
    answers += send(client, dataset_events(media, pothole_train[:10], pothole_names, project=2, first_task=101))
    assert [a["training"] for a in answers[:9]] == [None] * 9
    assert answers[9]["training"] == "queued" and answers[19]["training"] == "queued"
    assert client.app.state.queue.idle(timeout=300)
    for project, labels in (("1", names), ("2", pothole_names)):
        status = client.get(f"/status/{project}").json()
        assert status["job"]["state"] == "finished", status
        assert status["model_version"] == "v1"
        meta = status["versions"][0]
        assert meta["labels"] == labels and meta["status"] == "current" and meta["parent"] is None
        assert meta["annotations"] == 10 and meta["val_tasks"] and meta["metrics"]["images"] == len(meta["val_tasks"])
        for key in ("seconds", "created", "trained_upto", "plan"):
            assert key in meta
        setup = client.post("/setup", json={**recorded("setup"), "project": f"{project}.1795494870",
                                            "schema": label_config(labels)})
        assert setup.json()["model_version"] == "v1"
    assert sorted(client.get("/versions").json()["versions"]) == ["v1", "v1"]
    # the served model of project 2 knows only 'pothole'; project 1's only the blood cells
    backend = client.app.state.backend
    assert list(backend.models.get(backend.registry("2").current().weights).names.values()) == pothole_names
    body = recorded("predict")
    body["label_config"] = label_config(names)
    body["tasks"][0]["data"]["image"] = media.add("upload", "x.jpg", bccd[2][0].image)
    body["tasks"] = body["tasks"][:1]
    predicted = client.post("/predict", json=body).json()["results"][0]
    assert predicted["model_version"] == "v1"
    assert all(r["value"]["rectanglelabels"][0] in names for r in predicted["result"])

    # A label added to the config changes the class list; the next version follows it by name.
    wider = names + ["Bacteria"]
    updated = recorded("webhook_PROJECT_UPDATED")
    updated["project"]["label_config"] = label_config(wider)
    send(client, [updated])
    more = dataset_events(media, train[10:15], wider, project=1, first_task=11)
    answers = send(client, more)
    assert answers[-1]["training"] == "queued"
    assert client.app.state.queue.idle(timeout=300)
    current = backend.registry("1").current()
    assert current.name == "v2" and current.meta["labels"] == wider and current.meta["parent"] == "v1"
    assert "label set changed" in current.meta["reason"]
    assert "lsyolo_served_map50" in client.get("/metrics").text


def test_start_training_resyncs_everything_from_label_studio(make_client, media, bccd):
    """Annotations made while the backend was down reach training through the export API."""
    names, train, _ = bccd
    events = dataset_events(media, train[:10], names, project=1)
    media.handler.api["/api/projects/1/export"] = export_tasks(events)
    media.handler.api["/api/projects/1"] = {"id": 1, "label_config": label_config(names)}
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN)
    response = client.post("/webhook", json=recorded("webhook_START_TRAINING"))
    assert response.status_code == 200 and response.json()["training"] == "queued"
    assert client.app.state.queue.idle(timeout=300)
    assert client.app.state.backend.registry("1").current_name() == "v1"
    assert len(client.app.state.backend.store("1").records()) == 10


def worker_env(env: dict) -> dict:
    return {**os.environ, **env, "PYTHONPATH": str(REPO)}


def kill_worker(worker: subprocess.Popen) -> None:
    """SIGKILL an RQ worker and its work-horse (which RQ puts in a process group of its own), as a dying machine would."""
    import psutil

    for process in [*psutil.Process(worker.pid).children(recursive=True), psutil.Process(worker.pid)]:
        process.kill()
    worker.wait(30)


def run_burst_worker(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ls_backend.worker", "--burst"], env=worker_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_rq_worker_trains_queued_jobs_and_folds_events(make_client, backend_env, media, bccd, redis_db):
    names, train, _ = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, redis_url=REDIS_TEST_URL,
                         min_annotations=10, retrain_every=1)
    answers = send(client, dataset_events(media, train[:12], names, project=1))
    assert [a["training"] for a in answers[9:]] == ["queued", "folded", "folded"]
    assert client.get("/status/1").json()["job"]["state"] == "queued"
    from rq import Queue

    assert len(Queue("ls-yolo-train", connection=redis_db)) == 1
    done = run_burst_worker(backend_env())
    assert done.returncode == 0, done.stderr[-2000:]
    status = client.get("/status/1").json()
    assert status["job"]["state"] == "finished" and status["job"]["queue"] == "rq"
    assert status["model_version"] == "v1" and status["versions"][0]["annotations"] == 12
    assert client.post("/setup", json={**recorded("setup"), "schema": label_config(names)}).json()["model_version"] == "v1"


def test_redis_down_keeps_annotations_and_training_resumes(make_client, backend_env, media, bccd, private_redis):
    """Stop Redis mid-flow: webhooks still answer, the annotation waits on disk, the job is queued once Redis is back."""
    names, train, _ = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, redis_url=private_redis.url)
    events = dataset_events(media, train[:10], names, project=1)
    send(client, events[:9])
    private_redis.stop()
    started = time.perf_counter()
    answer = send(client, events[9:])[0]
    assert time.perf_counter() - started < 1.0
    assert answer["training"] == "pending"
    assert len(client.app.state.backend.store("1").records()) == 10
    assert client.get("/health").json()["waiting_for_queue"] == ["train:1"]
    private_redis.start()
    wait_for(lambda: client.get("/status/1").json()["job"].get("state") == "queued", 20, "retried enqueue")
    assert client.get("/health").json()["waiting_for_queue"] == []
    done = run_burst_worker(backend_env(redis_url=private_redis.url))
    assert done.returncode == 0, done.stderr[-2000:]
    assert client.get("/status/1").json()["model_version"] == "v1"


def test_killed_worker_leaves_served_model_untouched(make_client, backend_env, media, bccd, redis_db):
    names, train, _ = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, redis_url=REDIS_TEST_URL,
                         train_epochs=200)
    send(client, dataset_events(media, train[:10], names, project=1))
    worker = subprocess.Popen([sys.executable, "-m", "ls_backend.worker"], env=worker_env(backend_env()), cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (client.get("/status/1").json()["job"].get("progress") or {}).get("epoch", 0) >= 1, 240,
                 "training to make progress")
    finally:
        kill_worker(worker)
    registry = client.app.state.backend.registry("1")
    assert registry.current_name() is None and registry.versions() == []
    assert client.post("/setup", json={**recorded("setup"), "schema": label_config(names)}).json()["model_version"] \
        == "base-person-fall-yolov8s"
    from rq import Queue
    from rq.registry import StartedJobRegistry

    # What any RQ worker does on its periodic maintenance once the dead worker's heartbeat has expired.
    StartedJobRegistry(queue=Queue("ls-yolo-train", connection=redis_db)).cleanup(time.time() + 3600)
    job = client.get("/status/1").json()["job"]  # interrupted, and queued again for the next worker
    assert job["state"] == "queued" and job["resumes"] == job["previous"]["job_id"]
    assert job["previous"]["state"] == "interrupted" and "worker" in job["previous"]["error"]


def test_a_worse_version_is_kept_as_rejected_and_the_served_one_stays(backend_env, tmp_path, bccd, backbone_weights):
    """v2 learns swapped class names; judged on the same held-out tasks it loses to v1 and is not served."""
    from model.label_config import parse_label_config
    from model.pipeline import run_training
    from model.project_store import ProjectStore
    from model.registry import ProjectRegistry
    from model.trainer import TrainParams
    from model.yolo_import import to_result

    names, train, _ = bccd
    backend_env()
    store, registry = ProjectStore(tmp_path / "m", 1), ProjectRegistry(tmp_path / "m", 1)
    control = parse_label_config(label_config(names))
    params = TrainParams(epochs=25, imgsz=256, time_budget=0, freeze=0)
    fetch = lambda record: Path(record["data"]["image"])

    def annotate(swap: bool) -> None:
        for task_id, item in enumerate(train[:12], start=1):
            result = to_result(item, names)
            if swap and not is_held_out(task_id):
                for region in result:
                    label = region["value"]["rectanglelabels"][0]
                    region["value"]["rectanglelabels"] = [names[(names.index(label) + 1) % len(names)]]
            store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(item.image)},
                       "result": result, "cancelled": False})

    from model.dataset import is_held_out

    annotate(swap=False)
    first = run_training(store, registry, control, fetch, backbone_weights, params, 10, True, 5)
    assert first.accepted and registry.current_name() == "v1"
    annotate(swap=True)
    second = run_training(store, registry, control, fetch, backbone_weights, params, 10, True, 5)
    assert not second.accepted and "worse" in second.reason
    assert registry.current_name() == "v1"
    rejected = registry.get("v2")
    assert rejected.meta["status"] == "rejected" and rejected.weights.is_file()
    assert rejected.meta["metrics"]["fitness"] < rejected.meta["parent_metrics"]["fitness"]
    assert rejected.meta["val_tasks"] == registry.get("v1").meta["val_tasks"]


def test_a_served_quick_version_is_followed_by_idle_refinement_rounds_until_one_stops_gaining(make_client, media, bccd):
    from model.policy import REFINE_MIN_GAIN

    names, train, _ = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, refine_time_budget=6,
                         refine_rounds=3)
    send(client, dataset_events(media, train[:10], names, project=1))
    assert client.app.state.queue.idle(timeout=600)
    versions = client.app.state.backend.registry("1").versions()
    assert [(v.meta["refined"], v.meta["refine_round"]) for v in versions] == [
        (False, 0), *((True, n) for n in range(1, len(versions)))]
    assert all(v.meta["plan"]["time_budget"] == 6 and v.meta["parent"] for v in versions[1:])
    last = versions[-1].meta
    # The rounds ended for a reason: the last one was worse, gained too little, or was the last allowed.
    assert last["status"] == "rejected" or last["gain"] < REFINE_MIN_GAIN or last["refine_round"] == 3
    # Every round that led to another was served and gained; from the second round on none is served without a gain.
    assert all(v.meta["status"] != "rejected" and v.meta["gain"] >= REFINE_MIN_GAIN for v in versions[1:-1])
    assert all(v.meta["status"] == "rejected" or v.meta["gain"] >= REFINE_MIN_GAIN
               for v in versions if v.meta["refine_round"] >= 2)
    job = client.get("/status/1").json()["job"]
    assert job["run"] == "refine" and job["version"] == versions[-1].name
    # Nothing new since: a further request finds nothing to learn instead of training again.
    assert client.app.state.scheduler.request("1") == "queued"
    assert client.app.state.queue.idle(timeout=60)
    assert client.get("/status/1").json()["job"]["state"] == "skipped"
