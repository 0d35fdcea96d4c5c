"""Work per job grows with what is new: the project is exported from Label Studio once (and after the Train button),
even across RQ work-horses; in-process, projects train side by side; a follow-up job whose enqueue met a stopped
Redis is queued once Redis is back."""
from __future__ import annotations

import socket
import threading

import pytest

from model.yolo_import import class_names, label_config, read_dataset
from tests.annotations import dataset_events, export_tasks
from tests.conftest import REDIS_TEST_URL, TOKEN, recorded, shared_file
from tests.test_job_state import unlabeled_tasks
from tests.test_training import run_burst_worker, send, wait_for

WAIT = 300


@pytest.fixture(scope="module")
def bccd():
    root = shared_file("datasets", "bccd")
    return class_names(root), [i for i in read_dataset(root) if i.split == "train"]


def api_calls(media, since: int) -> list[str]:
    """Label Studio API requests (not media downloads) made after the first `since` requests."""
    return [path.split("?")[0] for path, _ in media.handler.seen[since:] if path.startswith("/api/")]


def test_rq_jobs_export_the_project_once_and_again_only_after_the_train_button(make_client, backend_env, media,
                                                                              bccd, redis_db):
    """Three jobs, each in a fresh RQ worker's forked work-horse: only the first and the one after the Train
    button call Label Studio; the one between trains on what the webhooks stored."""
    names, train = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, redis_url=REDIS_TEST_URL,
                         autolabel_after_train="false")
    events = dataset_events(media, train[:16], names, project=1)
    media.handler.api["/api/projects/1"] = {"id": 1, "label_config": label_config(names)}
    media.handler.api["/api/projects/1/export"] = export_tasks(events[:10])

    def job(expected_calls: list[str]) -> dict:
        seen = len(media.handler.seen)
        done = run_burst_worker(backend_env())
        assert done.returncode == 0, done.stderr[-2000:]
        assert api_calls(media, seen) == expected_calls
        return client.get("/status/1").json()["job"]

    export = ["/api/projects/1", "/api/projects/1/export"]
    assert send(client, events[:10])[-1]["training"] == "queued"
    first = job(export)
    assert first["state"] == "finished" and first["version"] == "v1" and first["run"] == "update"
    state = redis_db.hgetall("lsyolo:sync:1")
    assert float(state[b"synced"]) == 0 and b"synced_at" in state

    assert send(client, events[10:15])[-1]["training"] == "queued"
    second = job([])  # nothing from Label Studio: the five new annotations came by webhook
    assert second["state"] == "finished" and second["version"] == "v2" and second["run"] == "update"
    assert client.app.state.backend.registry("1").get("v2").meta["annotations"] == 15

    # An annotation whose webhook never arrived: the Train button exports again, and trains on everything.
    media.handler.api["/api/projects/1/export"] = export_tasks(events)
    assert client.post("/webhook", json=recorded("webhook_START_TRAINING")).json()["training"] == "queued"
    third = job(export)
    assert third["state"] == "finished" and third["run"] == "full"
    assert client.app.state.backend.registry("1").get("v3").meta["annotations"] == 16
    assert float(redis_db.hget("lsyolo:sync:1", "synced")) == 1

    assert client.app.state.scheduler.request("1") == "queued"
    fourth = job([])  # the press was answered once: no export, and nothing new to learn
    assert fourth["state"] == "skipped"


def test_in_process_projects_train_side_by_side_and_a_project_keeps_one_running_one_waiting(make_client, media,
                                                                                          bccd):
    """Each project's training holds its first image download until the other project's training has asked for
    one too: that meets only if both run at once. Meanwhile project 1's extra requests fold into one waiting job,
    which starts only after its running one."""
    names, train = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, job_concurrency=2,
                         autolabel_after_train="false", media_timeout=WAIT)
    meeting = threading.Barrier(2, timeout=WAIT)
    met: dict[str, str] = {}
    lock = threading.Lock()

    def hold_first_download(path: str) -> None:
        for prefix in ("/p1-", "/p2-"):
            with lock:
                first = prefix in path and prefix not in met
                if first:
                    met[prefix] = "waiting"
            if first:
                try:
                    meeting.wait()
                    met[prefix] = "met"
                except threading.BrokenBarrierError:
                    met[prefix] = "alone"

    media.handler.on_get = hold_first_download
    assert send(client, dataset_events(media, train[:10], names, project=1))[-1]["training"] == "queued"
    wait_for(lambda: met.get("/p1-") == "waiting", WAIT, "project 1's training to fetch its first image")
    scheduler = client.app.state.scheduler
    assert [scheduler.request("1") for _ in range(3)] == ["queued", "folded", "folded"]
    assert send(client, dataset_events(media, train[10:20], names, project=2, first_task=101))[-1]["training"] \
        == "queued"
    assert client.app.state.queue.idle(timeout=WAIT)
    assert met == {"/p1-": "met", "/p2-": "met"}
    one, two = (client.get(f"/status/{p}").json()["job"] for p in ("1", "2"))
    assert two["state"] == "finished" and two["version"] == "v1"
    # project 1's waiting job ran after its first one, and found nothing new to learn
    assert one["state"] == "skipped" and one["previous"]["state"] == "finished" and one["previous"]["version"] == "v1"
    assert one["started"] >= one["previous"]["finished"]
    assert one["previous"]["started"] < two["finished"] and two["started"] < one["previous"]["finished"]


def test_concurrent_trainings_in_one_process_share_the_cores():
    from model import compute

    alone = compute.training_threads()
    with compute.training(), compute.training():
        assert compute.training_threads() == max(1, compute.cores() // 2)
    assert compute.training_threads() == alone == compute.cores()


def test_rq_workers_on_one_machine_split_its_cores_between_their_jobs(redis_db):
    from rq import Queue, Worker

    from ls_backend.worker import busy_neighbours
    from model import compute

    queue = Queue("training", connection=redis_db)
    me, neighbour, idle = (Worker([queue], connection=redis_db, name=n) for n in ("me", "neighbour", "idle"))
    for worker in (me, neighbour, idle):
        worker.register_birth()
    me.set_state("busy")
    neighbour.set_state("busy")
    idle.set_state("idle")
    count = busy_neighbours(redis_db, "me", every=0.0)
    assert count() == 1  # the busy neighbour, not this worker itself nor the idle one
    try:
        compute.share_with(count)
        assert compute.training_threads() == max(1, compute.cores() // 2)
        neighbour.set_state("idle")
        assert compute.training_threads() == compute.cores()
    finally:
        compute.share_with(lambda: 0)


def test_a_follow_up_job_that_met_a_stopped_redis_is_queued_when_it_is_back(make_client, backend_env, media, bccd,
                                                                           assets, private_redis):
    """A training job (as an RQ work-horse runs it: its context rebuilt from settings) ends while Redis is stopped:
    its auto-labeling follow-up waits on disk like a webhook's request, the job ends, and the server queues the
    follow-up once Redis answers again; a worker then runs it."""
    from rq import Queue

    from ls_backend.job_context import context_from_settings
    from ls_backend.jobs import train_project
    from model.project_store import annotation_record

    names, train = bccd
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, redis_url=private_redis.url,
                         predict_batch=2)
    store = client.app.state.backend.store("1")
    store.update_info(label_config=label_config(names))
    for event in dataset_events(media, train[:10], names, project=1):
        store.put(annotation_record(event["task"], event["annotation"]))
    media.handler.tasks = unlabeled_tasks(media, assets, 2)
    private_redis.stop()

    context = context_from_settings()  # what _run_rq builds in the work-horse
    result = train_project("1", context=context)
    context.scheduler.close()  # the work-horse exits, and with it anything it kept in memory
    assert result["state"] == "finished" and result["accepted"]
    waiting = client.get("/status/1").json()["autolabel"]
    assert waiting["state"] == "pending" and "queue unreachable" in waiting["error"]

    private_redis.start()
    wait_for(lambda: client.get("/status/1").json()["autolabel"].get("state") == "queued", 30,
             "the server to queue the follow-up")
    assert [job.func_name for job in Queue("ls-yolo-train", connection=private_redis.connection).jobs] == [
        "ls_backend.jobs.run_queued_autolabel"]
    done = run_burst_worker(backend_env(redis_url=private_redis.url))
    assert done.returncode == 0, done.stderr[-2000:]
    job = client.get("/status/1").json()["autolabel"]
    assert job["state"] == "finished" and job["version"] == "v1"
    assert sorted(p["task"] for p in media.handler.predictions) == [1, 2]


def test_a_train_button_press_while_redis_is_unreachable_is_kept(tmp_path, redis_db):
    from ls_backend.sync_state import RedisSyncState, full_run_requested, needs_export

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the probe is closed
    up, down = RedisSyncState(tmp_path, REDIS_TEST_URL), RedisSyncState(tmp_path, f"redis://127.0.0.1:{closed}/0")
    assert needs_export(up.read("1")) and not full_run_requested(up.read("1"))  # never exported
    up.mark("1", synced=0, synced_at=1.0)
    assert not needs_export(up.read("1"))
    down.request_resync("1")  # the webhook still answers; the press is noted on disk
    assert needs_export(down.read("1"))  # a job that cannot read the state exports rather than miss anything
    state = up.read("1")
    assert needs_export(state) and full_run_requested(state)
    up.mark("1", full=state["requested"])
    up.mark("1", synced=state["requested"])
    state = up.read("1")
    assert not needs_export(state) and not full_run_requested(state)
    up.request_resync("1")  # a later press counts on from there
    assert needs_export(up.read("1")) and full_run_requested(up.read("1"))
