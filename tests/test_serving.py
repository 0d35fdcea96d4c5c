"""Serving under load and against bad files: concurrent requests and a job share models safely; files that are not
images, or that would decode to too many pixels, empty only their own task; Ultralytics never installs anything."""
from __future__ import annotations

import contextlib
import logging
import os
import struct
import subprocess
import sys
import threading
import zlib

import pytest
import requests

from tests.conftest import REDIS_TEST_URL, REPO, TOKEN, recorded
from tests.test_exif import CONFIG, NAMES, phone_photo


def predict_body(refs: list[str], first_id: int = 1) -> dict:
    body = recorded("predict")
    body["label_config"] = CONFIG
    body["tasks"] = [{**body["tasks"][0], "id": first_id + i, "data": {"image": ref}} for i, ref in enumerate(refs)]
    return body


@contextlib.contextmanager
def live_server(app):
    """The app under uvicorn on a free port of 127.0.0.1, in a thread, stopped on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    started = threading.Event()
    while not started.wait(0.05):
        if server.started:
            started.set()
        assert thread.is_alive(), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def served_project(backend_env, media, assets, person_weights, tmp_path):
    """A project served by a real Normal/Fall person detector, with unlabeled tasks in a (fake) Label Studio."""
    from ls_backend.app import create_app

    backend_env(label_studio_url=media.url, label_studio_api_key=TOKEN, predict_batch=2)
    app = create_app()
    backend = app.state.backend
    backend.store("1").update_info(label_config=CONFIG)
    backend.registry("1").add(person_weights, {"labels": NAMES}, make_current=True)
    sideways, _ = phone_photo(assets / "bus.jpg", 6, tmp_path)
    sources = [assets / "bus.jpg", assets / "zidane.jpg", sideways] * 2
    refs = [media.add("upload", f"{i}-{path.name}", path) for i, path in enumerate(sources)]
    media.handler.tasks = [{"id": i + 1, "data": {"image": ref}, "annotations": [], "predictions": []}
                           for i, ref in enumerate(refs)]
    yield app, refs
    app.state.scheduler.close()


def test_concurrent_predicts_and_an_autolabel_job_give_the_results_of_a_sequential_run(served_project, media):
    """Six /predict calls and an auto-labeling job of the same project at once, on a cold model, then the same
    work one call after another: every answer and every stored prediction is the same, and nothing fails."""
    app, refs = served_project
    bodies = {"A": predict_body(refs[:3]), "B": predict_body(refs[3:], first_id=4)}

    def autolabel_predictions() -> dict[int, tuple]:
        assert app.state.queue.idle(timeout=300)
        job = requests.get(f"{url}/status/1", timeout=30).json()["autolabel"]
        assert job["state"] == "finished" and job["done"] == len(refs) and job["failed"] == 0, job
        stored = {p["task"]: (p["result"], p["score"], p["model_version"]) for p in media.handler.predictions}
        assert len(stored) == len(media.handler.predictions) == len(refs)  # each task once
        media.handler.predictions.clear()
        for task in media.handler.tasks:
            task["predictions"] = []
        return stored

    with live_server(app) as url:
        start = threading.Barrier(7)
        answers: dict[str, list] = {"A": [], "B": []}

        def call(name: str) -> None:
            start.wait()
            response = requests.post(f"{url}/predict", json=bodies[name], timeout=300)
            answers[name].append((response.status_code, response.json()))

        def autolabel() -> None:
            start.wait()
            assert requests.post(f"{url}/autolabel/1", timeout=60).json()["autolabel"] == "queued"

        threads = [threading.Thread(target=call, args=(name,)) for name in "ABABAB"]
        threads.append(threading.Thread(target=autolabel))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        concurrent = autolabel_predictions()

        sequential = {name: requests.post(f"{url}/predict", json=body, timeout=300) for name, body in bodies.items()}
        assert requests.post(f"{url}/autolabel/1", timeout=60).json()["autolabel"] == "queued"
        assert autolabel_predictions() == concurrent

    for name, response in sequential.items():
        assert response.status_code == 200
        expected = response.json()
        assert all(len(item["result"]) >= 2 for item in expected["results"]), "every picture shows people"
        assert len(answers[name]) == 3
        assert all(answer == (200, expected) for answer in answers[name]), name


def png(width: int, height: int, rows: int | None = None) -> bytes:
    """A black greyscale PNG; with fewer rows than its header claims, a truncated one (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte, then the pixels
    data = b"".join(squeeze.compress(row) for _ in range(height if rows is None else rows)) + squeeze.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_files_that_are_not_images_or_too_large_empty_only_their_own_task(make_client, media, assets, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ls_backend")  # whatever level an earlier test left the loggers at
    client = make_client(label_studio_url=media.url, label_studio_api_key=TOKEN, max_image_pixels=40_000_000)
    good = media.add("upload", "bus.jpg", assets / "bus.jpg")
    huge = png(8000, 8000)  # 64 MP that compress to a few kB: decoded, over 250 MB
    assert len(huge) < 200_000
    refs = [good,
            media.add("upload", "notes.jpg", b"this is a text file, not a photo\n"),
            media.add("upload", "huge.png", huge),
            media.add("upload", "bomb.png", png(100_000, 100_000, rows=2)),  # ten billion pixels claimed
            good]
    results = client.post("/predict", json=predict_body(refs)).json()["results"]
    assert [bool(r["result"]) for r in results] == [True, False, False, False, True]
    assert results[0] == results[4]
    said = {m.split(": image skipped: ")[0].split()[-1]: m for m in (r.getMessage() for r in caplog.records)
            if "image skipped" in m}
    assert sorted(said) == ["2", "3", "4"]
    assert said["2"].endswith("is not a readable image")
    assert said["3"].endswith("is 8000x8000, more pixels than MAX_IMAGE_PIXELS=40000000")
    assert said["4"].endswith("has more pixels than MAX_IMAGE_PIXELS=40000000")

    # The cap holds before any pixel is decoded: refusing both costs no memory.
    (tmp_path / "huge.png").write_bytes(huge)
    code = ("import resource, sys\nfrom model.images import ImageError, read_image, set_max_pixels\n"
            "set_max_pixels(40_000_000)\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for path in sys.argv[1:]:\n    try:\n        read_image(path)\n        print('decoded', path)\n"
            "    except ImageError as exc:\n        print('refused', exc)\n"
            "print('grew MiB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    (tmp_path / "bomb.png").write_bytes(png(100_000, 100_000, rows=2))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "huge.png"), str(tmp_path / "bomb.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["refused", "refused"], done.stdout + done.stderr
    assert int(lines[2].split()[-1]) < 32, lines[2]


def autoinstall_in_this_process() -> tuple[bool, str | None]:
    """Run by an RQ worker's job: whether Ultralytics there may pip-install what it misses."""
    import ultralytics.utils.checks

    return ultralytics.utils.checks.AUTOINSTALL, os.environ.get("YOLO_AUTOINSTALL")


def test_no_process_lets_ultralytics_install_packages(backend_env, tmp_path, redis_db):
    """Server, worker and CLI set YOLO_AUTOINSTALL=false before Ultralytics is first imported, so a file that is
    not an image (Ultralytics then looks for a HEIF plugin) is refused instead of triggering a pip install."""
    env = {k: v for k, v in {**os.environ, **backend_env(redis_url=REDIS_TEST_URL)}.items() if k != "YOLO_AUTOINSTALL"}
    env["PYTHONPATH"] = str(REPO)
    notes = tmp_path / "notes.jpg"
    notes.write_text("this is a text file, not a photo\n")
    code = ("import os, sys\nimport ls_backend.app, ls_backend.worker, ls_backend.__main__\n"
            "assert 'ultralytics' not in sys.modules, 'Ultralytics imported before its environment is set'\n"
            "from ls_backend.jobs import get_backend\nget_backend()\n"
            "import ultralytics.utils.checks\nfrom model.images import ImageError, probe\n"
            "try:\n    probe(sys.argv[1])\nexcept ImageError as exc:\n    print('refused:', exc)\n"
            "print('AUTOINSTALL', ultralytics.utils.checks.AUTOINSTALL, os.environ['YOLO_AUTOINSTALL'])\n")
    done = subprocess.run([sys.executable, "-c", code, str(notes)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["refused: notes.jpg is not a readable image", "AUTOINSTALL False false"]

    from rq import Queue

    job = Queue("ls-yolo-train", connection=redis_db).enqueue(f"{__name__}.autoinstall_in_this_process")
    worker = subprocess.run([sys.executable, "-m", "ls_backend.worker", "--burst"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert job.latest_result().return_value == (False, "false")
