"""Job state is kept per job: queuing never hides the running job, and a job that died with its process (a server
restart, a killed RQ worker) is marked interrupted and queued again, in-process and on RQ."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from tests.annotations import dataset_events
from tests.conftest import REDIS_TEST_URL, REPO, TOKEN, shared_file
from tests.test_exif import CONFIG, NAMES
from tests.test_training import kill_worker, wait_for

WAIT = 300


def unlabeled_tasks(media, assets, n: int) -> list[dict]:
    return [{"id": i, "data": {"image": media.add("upload", f"{i}.jpg", assets / ("bus.jpg", "zidane.jpg")[i % 2])},
             "annotations": [], "predictions": []} for i in range(1, n + 1)]


def hold_predictions(media) -> tuple[threading.Event, threading.Event]:
    """Label Studio keeps the first stored prediction's answer until released: the job is caught mid-run."""
    reached, release = threading.Event(), threading.Event()

    def hook(count: int) -> None:
        reached.set()
        release.wait(WAIT)

    media.handler.on_prediction = hook
    return reached, release


def test_queuing_a_job_while_one_runs_shows_both(make_client, media, assets, person_weights):
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, predict_batch=2)
    client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    client.app.state.backend.registry("1").add(person_weights, {"labels": NAMES}, make_current=True)
    media.handler.tasks = unlabeled_tasks(media, assets, 4)
    reached, release = hold_predictions(media)
    try:
        assert client.post("/autolabel/1").json()["autolabel"] == "queued"
        assert reached.wait(WAIT)
        assert client.post("/autolabel/1").json()["autolabel"] == "queued"
        assert client.post("/autolabel/1").json()["autolabel"] == "folded"
        job = client.get("/status/1").json()["autolabel"]
        assert job["state"] == "running" and job["version"] == "v1" and job["queue"] == "in-process"
        assert job["waiting"]["state"] == "queued" and job["waiting"]["job_id"] != job["job_id"]
        assert "another job is waiting" in client.get("/projects/1/").text
    finally:
        release.set()
    assert client.app.state.queue.idle(timeout=WAIT)
    job = client.get("/status/1").json()["autolabel"]
    assert job["state"] == "finished" and job["done"] == 0 and job["waiting"] is None  # the first did all four
    assert job["previous"]["state"] == "finished" and job["previous"]["done"] == 4


def unrefined_bccd_project(backend_env, tmp_path, backbone_weights):
    """Ten bccd annotations on disk and a served first version not yet refined: the next job is a long refinement."""
    from model.project_store import ProjectStore, annotation_record
    from model.registry import ProjectRegistry
    from model.yolo_import import class_names, label_config, read_dataset
    from tests.conftest import MediaServer

    root = shared_file("datasets", "bccd")
    names, items = class_names(root), [i for i in read_dataset(root) if i.split == "train"][:10]
    media = MediaServer(tmp_path / "media")
    backend_env(label_studio_url=media.url, label_studio_api_key=TOKEN, refine_time_budget=120,
                train_epochs=200, autolabel_after_train="false", accept_only_if_not_worse="false",
                refine_rounds=1)
    model_dir = tmp_path / "models"
    store = ProjectStore(model_dir, "1")
    store.update_info(label_config=label_config(names))
    for event in dataset_events(media, items, names):
        store.put(annotation_record(event["task"], event["annotation"]))
    ProjectRegistry(model_dir, "1").add(backbone_weights, {"labels": names, "trained_upto": time.time() + 1,
                                                           "plan": {"imgsz": 96}, "refined": False}, make_current=True)
    return media, model_dir


def assert_resumed_refinement(client) -> None:
    assert client.app.state.queue.idle(timeout=WAIT)
    job = client.get("/status/1").json()["job"]
    assert job["state"] == "finished" and job["run"] == "refine" and job["version"] == "v2", job
    assert job["previous"]["state"] == "interrupted" and job["resumes"] == job["previous"]["job_id"]
    assert job["previous"]["error"] == "the server stopped while it ran; queued again"
    assert client.app.state.backend.registry("1").get("v2").meta["refined"]
    assert "interrupted: the server stopped while it ran" in client.get("/projects/1/").text


def test_a_refinement_killed_with_its_server_runs_after_the_restart(backend_env, make_client, tmp_path,
                                                                    backbone_weights):
    """A server process dies (SIGKILL) while refining; the next server marks that job interrupted, queues it again,
    and the refinement runs; the status page says what happened."""
    from ls_backend.job_status import job_view

    media, model_dir = unrefined_bccd_project(backend_env, tmp_path, backbone_weights)
    code = ("import time\nfrom ls_backend.app import create_app\napp = create_app()\n"
            "print(app.state.scheduler.request('1'), flush=True)\ntime.sleep(600)\n")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert server.stdout.readline().strip() == "queued", (tmp_path / "server.log").read_text()[-2000:]
        wait_for(lambda: (job_view(model_dir, "1").get("progress") or {}).get("epoch", 0) >= 1, WAIT, "refinement to run")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
        server.stdout.close()
        log.close()
    assert job_view(model_dir, "1")["state"] == "running"  # what the dead process left behind

    assert_resumed_refinement(make_client(train_epochs=2))
    media.close()


def test_a_refinement_stops_with_its_server_and_runs_after_the_restart(backend_env, make_client, tmp_path,
                                                                       backbone_weights):
    """A server shut down while refining in-process stops the training at its next batch (the process must not exit
    under a torch thread), and the next server runs the job again."""
    from fastapi.testclient import TestClient

    from ls_backend.app import create_app
    from ls_backend.job_status import job_view

    media, model_dir = unrefined_bccd_project(backend_env, tmp_path, backbone_weights)
    with TestClient(create_app()) as client:
        assert client.app.state.scheduler.request("1") == "queued"
        wait_for(lambda: (job_view(model_dir, "1").get("progress") or {}).get("epoch", 0) >= 1, WAIT, "refinement to run")
    # the shutdown waited for the stopped job's thread: nothing runs, and the job is left as its process died
    assert client.app.state.queue.idle(timeout=0)
    assert job_view(model_dir, "1")["state"] == "running"
    assert client.app.state.backend.registry("1").current_name() == "v1"

    assert_resumed_refinement(make_client(train_epochs=2))
    media.close()


def test_a_job_whose_rq_worker_was_killed_is_resumed_by_the_next_worker(make_client, backend_env, media, assets,
                                                                       person_weights, redis_db):
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, redis_url=REDIS_TEST_URL,
                         predict_batch=2)
    client.post("/setup", json={"project": "1.1", "schema": CONFIG})
    client.app.state.backend.registry("1").add(person_weights, {"labels": NAMES}, make_current=True)
    media.handler.tasks = unlabeled_tasks(media, assets, 4)
    assert client.post("/autolabel/1").json()["autolabel"] == "queued"
    reached, release = hold_predictions(media)
    env = {**os.environ, **backend_env(), "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, "-m", "ls_backend.worker"], env=env, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert reached.wait(WAIT), "the worker never stored a prediction"
        assert client.get("/status/1").json()["autolabel"]["state"] == "running"
    finally:
        kill_worker(worker)
        release.set()
    from rq import Queue
    from rq.registry import StartedJobRegistry

    # What any RQ worker does on its periodic maintenance once the dead worker's heartbeat has expired.
    StartedJobRegistry(queue=Queue("ls-yolo-train", connection=redis_db)).cleanup(time.time() + 3600)
    job = client.get("/status/1").json()["autolabel"]
    assert job["state"] == "queued" and job["resumes"] == job["previous"]["job_id"]
    assert job["previous"]["state"] == "interrupted"
    assert job["previous"]["error"] == "the worker running it was lost (RQ: AbandonedJobError); queued again"
    media.handler.on_prediction = None
    done = subprocess.run([sys.executable, "-m", "ls_backend.worker", "--burst"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr[-2000:]
    job = client.get("/status/1").json()["autolabel"]
    assert job["state"] == "finished" and job["previous"]["state"] == "interrupted"
    assert sorted(p["task"] for p in media.handler.predictions) == [1, 2, 3, 4]  # each task once, none lost
