"""The whole learning loop against a real Label Studio: annotate, train from webhooks, auto-label, press Train.

Ten BCCD training images are annotated through Label Studio's API from the dataset's own labels; six held-out
images (valid/test split) stay unlabeled and must end up with useful predictions of the trained version. Half of
the images are uploaded, half served from a Local Files storage. The loop runs once with the server's in-process
queue and once with Redis and a separate `python -m ls_backend.worker` process.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import pytest

from model.yolo_import import YoloItem, class_names, label_config, read_dataset, to_result

from .label_studio import REPO_ROOT, SHARED_DIR, Process
from .test_predict_e2e import iou, pixel_box

pytestmark = pytest.mark.e2e

DATASET = SHARED_DIR / "datasets" / "bccd"
REDIS_URL = os.environ.get("LS_E2E_REDIS_URL", "redis://127.0.0.1:6379/12")

# Tiny training so both modes fit in a few minutes on two CPU cores: ~20 s per run.
TINY_TRAINING = {
    "TRAIN_IMGSZ": "224",
    "TRAIN_EPOCHS": "120",
    "TRAIN_TIME_BUDGET": "0",
    "TRAIN_FREEZE": "10",  # the backbone stays frozen: faster, and better on ten images
    "REFINE_TIME_BUDGET": "0",
    "MIN_ANNOTATIONS": "10",
    "RETRAIN_EVERY": "5",
    "AUTOLABEL_AFTER_TRAIN": "true",
}
TRAIN_TIMEOUT = 300.0  # seconds for a training job to be served, from the webhook that asks for it
AUTOLABEL_TIMEOUT = 120.0

# Held-out quality, modest for ten images at 224 px but real: the boxes must lie on the cells. The held-out split
# follows Label Studio's task ids (3-5 of the ten tasks), so what the gate serves varies from run to run.
MATCH_IOU = 0.3
# The backend serves only boxes whose saving its own held-out tasks make sure of (model/thresholds.py), so it
# rather leaves an image empty than fills it with false boxes. At 160 px and 25 passes the halved learning rate
# (model/policy.py) left no confident saving and nothing was served; at 224 px and 80 passes, seen: boxes on all
# six images, 77-80% of them on a cell. Since a shared threshold on fewer than 10 held-out tasks needs two spreads,
# 80 passes left the RQ run's four held-out tasks (its task ids follow the other e2e tests') one box short of a
# confident saving (mAP50 0.53 there, nothing served): 120 passes.
MIN_IMAGES_MATCHED = 4  # of the six held-out images, at least this many get a box on a real cell
MIN_PRECISION = 0.7  # of all predicted boxes on the held-out images, at least this share lies on a real cell


@dataclass
class Dataset:
    names: list[str]
    annotated: list[YoloItem]  # annotated through the API, one at a time (webhooks)
    imported: YoloItem  # imported later together with its annotation: only TASKS_CREATED, no annotation event
    held_out: list[YoloItem]  # valid/test images left unlabeled


@pytest.fixture(scope="module")
def bccd() -> Dataset:
    if not (DATASET / "data.yaml").is_file():
        pytest.skip(f"E2E SKIPPED: the BCCD dataset is absent at {DATASET}")
    items = read_dataset(DATASET)
    train = [i for i in items if i.split == "train" and i.rows]
    valid = [i for i in items if i.split == "valid" and i.rows]
    test = [i for i in items if i.split == "test" and i.rows]
    return Dataset(class_names(DATASET), train[:10], train[10], valid[:3] + test[:3])


@pytest.fixture
def queue_mode(request):
    """'in-process' or 'redis'; the Redis database is flushed before and after (after every process stopped)."""
    mode = request.param
    if mode != "redis":
        yield mode, {}
        return
    import redis

    connection = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        connection.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not running at {REDIS_URL}: {exc}", pytrace=False)
    connection.flushdb()
    yield mode, {"REDIS_URL": REDIS_URL}
    connection.flushdb()
    connection.close()


@pytest.fixture
def loop_backend(queue_mode, start_backend, request):
    """Our backend with tiny training, plus an RQ worker process with the same environment in Redis mode."""
    mode, env = queue_mode
    backend = start_backend(**TINY_TRAINING, **env)
    processes = [backend.process]
    worker = None
    if mode == "redis":
        worker = Process("worker", [sys.executable, "-m", "ls_backend.worker"], backend.env,
                         backend.workdir / "worker.log", cwd=REPO_ROOT)
        processes.append(worker)
    yield backend, processes
    if worker is not None:
        worker.stop()
        if any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")):
            text = worker.log.read_text(errors="replace") if worker.log.is_file() else "<no log>"
            print(f"\n===== worker log {worker.log} (last 6000 chars) =====\n{text[-6000:]}", file=sys.stderr)


def poll(check, timeout: float, what: str, processes: list[Process], interval: float = 0.5):
    """Call check() until it returns (True, value); fail early if one of our processes dies.

    check() returns (done, observed); the last observation is shown when time runs out.
    """
    deadline = time.monotonic() + timeout
    observed = None
    while True:
        for process in processes:
            if not process.alive():
                raise process.fail(f"exited with code {process.popen.returncode} while waiting for {what}; "
                                   f"last seen: {observed}")
        done, observed = check()
        if done:
            return observed
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f}s; last seen: {observed}")
        time.sleep(interval)


def set_up_project(ls, data: Dataset, title: str) -> tuple[int, dict[int, YoloItem], str]:
    """Upload half of the images, serve the other half from a Local Files storage; task id -> dataset item."""
    project = ls.create_project(label_config(data.names), title=title)["id"]
    images = data.annotated + data.held_out
    uploaded = data.annotated[:5] + data.held_out[:3]
    local = [item for item in images if item not in uploaded]
    ls.import_files(project, [item.image for item in uploaded])
    folder = f"training{project}"
    urls = {ls.put_local_file(item.image, f"{folder}/{item.image.name}"): item for item in local}
    ls.add_local_storage(project, ls.document_root / folder)  # the folder must exist first
    ls.import_tasks(project, [{"image": url} for url in urls])
    by_task: dict[int, YoloItem] = {}
    for task in ls.tasks(project):
        image = task["data"]["image"]
        if image in urls:
            by_task[task["id"]] = urls[image]
            continue
        for item in uploaded:
            if image.startswith(f"/data/upload/{project}/") and image.endswith(f"-{item.image.name}"):
                by_task[task["id"]] = item
    assert sorted(i.image.name for i in by_task.values()) == sorted(i.image.name for i in images), \
        f"unexpected tasks after import: {[(t, i.image.name) for t, i in by_task.items()]}"
    return project, by_task, folder


def status_of(backend, project: int) -> dict:
    response = backend.get(f"/status/{project}")
    assert response.status_code == 200, f"/status/{project} answered {response.status_code}: {response.text[:300]}"
    return response.json()


def job_failure(status: dict) -> str | None:
    for kind in ("job", "autolabel"):
        job = status.get(kind) or {}
        if job.get("state") == "failed":
            return f"{kind} job failed: {job.get('error')}"
    return None


def not_errored(ls, ml_id: int, when: str) -> dict:
    state = ls.ml_backend(ml_id)
    assert state.get("state") != "ER", f"Label Studio marks the backend as errored {when}: {state.get('error_message')}"
    return state


def check_regions(prediction: dict, item: YoloItem, names: list[str]) -> list[tuple[float, float, float, float]]:
    boxes = []
    for region in prediction["result"]:
        assert region["type"] == "rectanglelabels" and region["from_name"] == "label" \
            and region["to_name"] == "image", f"{item.image.name}: region for the wrong control: {region}"
        assert len(region["value"]["rectanglelabels"]) == 1 and region["value"]["rectanglelabels"][0] in names, \
            f"{item.image.name}: not a BCCD label: {region}"
        assert (region["original_width"], region["original_height"]) == (item.width, item.height), \
            f"{item.image.name}: wrong image size in {region}"
        assert 0 < region.get("score", 0) <= 1, f"{item.image.name}: region without a score: {region}"
        boxes.append(pixel_box(region))
    return boxes


def held_out_quality(predictions: dict[int, dict], by_task: dict[int, YoloItem], names: list[str]) -> tuple[int, int, int, list[str]]:
    """Images with a box on a real cell, boxes on a real cell, all boxes, and a line per image for messages."""
    matched_images = good_boxes = all_boxes = 0
    lines = []
    for task, prediction in predictions.items():
        item = by_task[task]
        truth = [(x1 * item.width, y1 * item.height, x2 * item.width, y2 * item.height) for _, x1, y1, x2, y2 in item.rows]
        boxes = check_regions(prediction, item, names)
        best = [max(iou(box, cell) for cell in truth) for box in boxes]
        good = sum(b >= MATCH_IOU for b in best)
        matched_images += good > 0
        good_boxes += good
        all_boxes += len(boxes)
        lines.append(f"{item.image.name}: {len(boxes)} boxes, {good} on a cell, best IoU {max(best, default=0):.2f}, "
                     f"{len(truth)} cells")
    return matched_images, good_boxes, all_boxes, lines


@pytest.mark.parametrize("queue_mode", ["in-process", "redis"], indirect=True)
def test_learning_loop(label_studio, queue_mode, loop_backend, bccd):
    ls, data = label_studio, bccd
    mode, _ = queue_mode
    backend, processes = loop_backend
    timings: dict[str, float] = {}
    started = time.monotonic()

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    # 1. A project with ten images to annotate and six held-out ones, uploaded and local files mixed.
    project, by_task, folder = set_up_project(ls, data, f"e2e training {mode}")
    annotated = {t: i for t, i in by_task.items() if i in data.annotated}
    held_out = {t: i for t, i in by_task.items() if i in data.held_out}

    # 2. Connect the backend; it serves the base model until a version is trained.
    ml = ls.connect_ml(project, backend.url)
    ml_id = ml["id"]
    state = not_errored(ls, ml_id, "on connect")
    assert state.get("state") == "CO", f"backend not connected: {state.get('state')} {state.get('error_message')}"
    base = status_of(backend, project)["model_version"]
    assert base.startswith("base-"), f"a fresh project is not served by the base model: {base}"
    queue_kind = backend.get("/health").json().get("queue")
    assert queue_kind == ("rq" if mode == "redis" else "in-process"), f"{mode} backend reports queue {queue_kind}"
    lap("setup")

    # 3. Ten annotations through the API: their webhooks store them and the tenth one starts training.
    for task, item in annotated.items():
        ls.create_annotation(task, to_result(item, data.names))
    status = status_of(backend, project)
    assert status["annotated_tasks"] == 10, f"the webhooks did not deliver ten annotations: {status}"

    def trained():
        s = status_of(backend, project)
        if job_failure(s):
            raise AssertionError(f"{job_failure(s)}; status {s}")
        # The new version is served a moment before its job records "finished": wait for both.
        done = s["model_version"] != base and (s.get("job") or {}).get("state") == "finished"
        return done, {k: s.get(k) for k in ("model_version", "job", "versions")}

    poll(trained, TRAIN_TIMEOUT, "trained version served", processes)
    status = status_of(backend, project)
    version = status["model_version"]
    first_job = status["job"]
    assert first_job.get("state") == "finished" and first_job.get("version") == version, \
        f"the training job does not record the served version {version}: {first_job}"
    if mode == "redis":  # the worker process ran it, not the server
        assert first_job.get("queue") == "rq" and first_job.get("job_id"), f"not run by an RQ worker: {first_job}"
    else:
        assert first_job.get("queue") == "in-process", f"not run by the server's own queue: {first_job}"
    [meta] = [v for v in status["versions"] if v["version"] == version]
    assert meta["status"] == "current" and meta["annotations"] == 10, f"unexpected version record: {meta}"
    ours = backend.get("/versions").json()
    assert version in ours["versions"], f"our /versions does not list {version}: {ours}"
    listed = ls.api("GET", f"/api/ml/{ml_id}/versions").json()
    assert version in listed.get("versions", []), f"Label Studio does not list {version}: {listed}"
    lap("train")

    # 4. The backend auto-labels every unlabeled task with the new version, by itself.
    def autolabeled():
        s = status_of(backend, project)
        if job_failure(s):
            raise AssertionError(f"{job_failure(s)}; status {s}")
        done = {p["task"] for p in ls.predictions(project) if p.get("model_version") == version}
        missing = sorted(set(held_out) - done)
        return not missing, {"missing": missing, "autolabel": s.get("autolabel")}

    poll(autolabeled, AUTOLABEL_TIMEOUT, f"{version} prediction on every unlabeled task", processes)
    lap("autolabel")

    # "Retrieve predictions" asks only for tasks lacking a prediction of the current version: the annotated ones.
    answer = ls.retrieve_predictions(project)
    predictions = [p for p in ls.predictions(project) if p.get("model_version") == version]
    per_task: dict[int, list[dict]] = {}
    for prediction in predictions:
        per_task.setdefault(prediction["task"], []).append(prediction)
    assert set(per_task) == set(by_task), \
        f"tasks without a {version} prediction after Retrieve predictions ({answer}): " \
        f"{sorted(set(by_task) - set(per_task))}"
    for task in held_out:
        assert len(per_task[task]) == 1, \
            f"task {task} has {len(per_task[task])} {version} predictions: Retrieve re-predicted an auto-labeled task"
    for prediction in predictions:
        score = prediction.get("score")
        assert score is not None and 0 <= score <= 1, f"{version} prediction without a score: {prediction}"
    state = not_errored(ls, ml_id, "after Retrieve predictions")
    if state.get("model_version"):
        assert state["model_version"] == version, \
            f"Label Studio lists the backend at {state['model_version']}, predictions carry {version}"

    matched, good, total, lines = held_out_quality({t: per_task[t][0] for t in held_out}, by_task, data.names)
    report = "\n  ".join(lines) + f"\n({version} was trained at imgsz {(meta.get('plan') or {}).get('imgsz')})"
    assert matched >= MIN_IMAGES_MATCHED, \
        f"{version} puts a box on a real cell (IoU >= {MATCH_IOU}) on only {matched} of 6 held-out images " \
        f"({good} of {total} boxes on a cell):\n  {report}"
    assert total and good / total >= MIN_PRECISION, \
        f"only {good} of {total} boxes of {version} on the held-out images lie on a real cell (IoU >= {MATCH_IOU}):" \
        f"\n  {report}"
    lap("retrieve")

    # 5. An annotation the webhooks never announce (imported with its task), then the Train button: the full
    # resync from Label Studio's export must find it, and a new training job must finish.
    url = ls.put_local_file(data.imported.image, f"{folder}/{data.imported.image.name}")
    ls.import_tasks(project, [{"data": {"image": url}, "annotations": [{"result": to_result(data.imported, data.names)}]}])
    assert status_of(backend, project)["annotated_tasks"] == 10, "an imported annotation reached the backend by webhook"
    before = status_of(backend, project)
    versions_before = len(before["versions"])
    finished_before = before["job"]["finished"]

    ls.train(ml_id)
    not_errored(ls, ml_id, "after Train")

    def retrained():
        s = status_of(backend, project)
        job = s.get("job") or {}
        if job.get("state") in ("failed", "skipped") and job.get("finished", 0) > finished_before:
            raise AssertionError(f"the Train button's job ended {job.get('state')}: {job}")
        if job_failure(s):
            raise AssertionError(f"{job_failure(s)}; status {s}")
        done = job.get("state") == "finished" and job.get("finished", 0) > finished_before \
            and len(s["versions"]) > versions_before
        return done, {k: s.get(k) for k in ("model_version", "job", "annotated_tasks")}

    poll(retrained, TRAIN_TIMEOUT, "training job after the Train button", processes)
    status = status_of(backend, project)
    newest = status["versions"][-1]
    assert newest["version"] == status["job"]["version"], f"the job and the version list disagree: {status}"
    assert newest["annotations"] == 11 and status["annotated_tasks"] == 11, \
        f"the Train button's job did not resync the imported annotation from Label Studio: " \
        f"{newest['annotations']} annotations in {newest['version']}, {status['annotated_tasks']} stored"
    assert not (backend.model_dir / str(project) / "resync_requested").exists(), "the resync request was not consumed"
    not_errored(ls, ml_id, "after the Train button's job")
    lap("press train")
    job = status["job"]
    print(f"\n[e2e] learning loop ({mode}): {timings}; held-out: {matched}/6 images, {good}/{total} boxes on a "
          f"cell; Train button: {job['version']} {'served' if job.get('accepted') else 'rejected'} ({job.get('reason')})",
          file=sys.stderr)
