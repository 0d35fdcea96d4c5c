"""Speed and memory of the backend on this machine: webhook acknowledgement, batch prediction, peak RSS.

    python bench/speed.py [--events 200] [--batch 64] [--redis-url redis://127.0.0.1:6379/11] [--sections ...]

1. Webhook acknowledgement latency of ANNOTATION_CREATED events, sent one after another over a keep-alive
   session: in-process queue with MIN_ANNOTATIONS so high that nothing trains, then with RQ (MIN_ANNOTATIONS=10,
   no worker) so every event from the tenth on goes through Redis (the first one enqueues, the rest are folded).
2. One /predict request of --batch tasks (bus.jpg and zidane.jpg alternating, read through the Label Studio
   media path) against the same number of direct single-image Ultralytics calls.
3. Peak RSS (VmHWM) of the server after those predictions against a plain Python process that imports
   Ultralytics, loads the same weights and predicts the two images once (target: server <= plain + 100 MiB).
4. Peak memory of an RQ worker (`--burst`) and its forked work-horse during one training job on 10 bccd images.
5. Runtimes (`--sections plain runtimes` alone): the person detector exported to OpenVINO as a training job
   exports a promoted version, then per image, interleaved call by call on the same weights, image and size: a
   direct Ultralytics PyTorch call, /predict served by PyTorch (PREDICT_RUNTIME=pytorch) and /predict served by the
   export; each server's peak RSS after a --batch-task /predict; and the held-out mAP50 of a version trained on
   bccd by the product's own training run, predicted by PyTorch and by the export.

The Redis database (--redis-url) is flushed before and after. Results: bench/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from common import (SHARED, LabelStudioStandIn, Process, annotation_event, backend_env, print_table, start_server,
                    write_results)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.policy import NMS_IOU  # noqa: E402
from model.yolo_import import class_names, label_config, read_dataset, to_result  # noqa: E402

PERSON_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                 '<Label value="person" predicted_values="Normal,Fall"/></RectangleLabels></View>')
IMAGES = ("bus.jpg", "zidane.jpg")
IMGSZ, CONF = 640, 0.05
MIB = 1024.0  # /proc reports KiB
PLAIN = """
import json, sys
from ultralytics import YOLO
model = YOLO(sys.argv[1])
for image in sys.argv[2:]:
    model.predict(image, imgsz={imgsz}, conf={conf}, verbose=False)
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({{k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}}))
""".format(imgsz=IMGSZ, conf=CONF)


def proc_kib(pid: int, *names: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status in KiB (VmHWM, VmRSS); empty when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {n: int(fields[n].split()[0]) for n in names if n in fields}


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them, so sums do not double count."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: p99 of 200 samples is the second largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} missing)"


def wait_loaded(url: str, timeout: float = 180) -> None:
    """start_server waits for /health; this also waits for the base model, so loading does not skew timings."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = requests.get(f"{url}/health", timeout=5).json()
        if health.get("base_model_error"):
            raise RuntimeError(f"the server cannot load its model: {health['base_model_error']}")
        if health.get("models_loaded"):
            return
        time.sleep(0.25)
    raise RuntimeError(f"base model not loaded after {timeout:.0f} s")


def flush(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def person_box() -> list[dict]:
    return [{"id": "r0", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "original_width": 810, "original_height": 1080, "image_rotation": 0,
             "value": {"x": 5.0, "y": 20.0, "width": 25.0, "height": 60.0, "rotation": 0,
                       "rectanglelabels": ["person"]}}]


def send_events(url: str, image_ref: str, events: int, warmup: int, deadline_s: float) -> dict:
    """Sequential ANNOTATION_CREATED events on one keep-alive session; warm-up events go to another project."""
    http = requests.Session()
    for task_id in range(1, warmup + 1):  # first-request costs (threadpool, project folders) off the books
        event = annotation_event(2, task_id, image_ref, person_box(), PERSON_CONFIG)
        http.post(f"{url}/webhook", json=event, timeout=10).raise_for_status()
    acks, outcomes = [], {}
    deadline = time.monotonic() + deadline_s
    for task_id in range(1, events + 1):
        if time.monotonic() > deadline:
            break
        event = annotation_event(1, task_id, image_ref, person_box(), PERSON_CONFIG)
        started = time.perf_counter()
        response = http.post(f"{url}/webhook", json=event, timeout=10)
        acks.append(1000 * (time.perf_counter() - started))
        response.raise_for_status()
        outcome = str(response.json().get("training"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    http.close()
    return {"events": len(acks), "p50_ms": percentile(acks, 50), "p99_ms": percentile(acks, 99),
            "max_ms": max(acks), "mean_ms": sum(acks) / len(acks), "training_outcomes": outcomes,
            "all_ms": [round(a, 2) for a in acks]}


def ack_rq(work: Path, ls: LabelStudioStandIn, args) -> dict:
    """Acknowledgement with RQ: from the tenth annotation on, each event asks Redis for a training job."""
    image_ref = ls.upload(1, Path(__import__("ultralytics").ASSETS) / IMAGES[0])
    flush(args.redis_url)
    env = backend_env(work / "models", ls.url, redis_url=args.redis_url, min_annotations=10)
    server = None
    try:
        server, url = start_server(env, work / "server.log")
        wait_loaded(url)
        assert requests.get(f"{url}/health", timeout=5).json()["queue"] == "rq"
        return send_events(url, image_ref, args.events, args.warmup, args.deadline)
    except Exception:
        print(tail(work / "server.log"), file=sys.stderr)
        raise
    finally:
        if server:
            server.stop()
        flush(args.redis_url)


def in_process(work: Path, ls: LabelStudioStandIn, args) -> tuple[dict, dict, dict]:
    """Webhook acks (no training), then batch throughput and the server's peak RSS, on one in-process server."""
    assets = Path(__import__("ultralytics").ASSETS)
    refs = {name: ls.upload(3, assets / name) for name in IMAGES}
    env = backend_env(work / "models", ls.url, min_annotations=100_000, predict_imgsz=IMGSZ, predict_conf=CONF)
    server = None
    try:
        server, url = start_server(env, work / "server.log")
        pid = server.proc.pid
        wait_loaded(url)
        hwm = {"model loaded": proc_kib(pid, "VmHWM")["VmHWM"] / MIB}
        ack = send_events(url, ls.upload(1, assets / IMAGES[0]), args.events, args.warmup, args.deadline)
        assert set(ack["training_outcomes"]) == {"None"}, ack["training_outcomes"]
        hwm["after webhooks"] = proc_kib(pid, "VmHWM")["VmHWM"] / MIB

        http = requests.Session()
        http.post(f"{url}/setup", json={"project": 3, "schema": PERSON_CONFIG}, timeout=30).raise_for_status()
        tasks = [{"id": 1000 + i, "data": {"image": refs[IMAGES[i % 2]]}} for i in range(args.batch)]
        body = {"tasks": tasks, "project": 3, "label_config": PERSON_CONFIG}

        def server_batch() -> tuple[float, list[dict]]:
            started = time.perf_counter()
            response = http.post(f"{url}/predict", json=body, timeout=600)
            seconds = time.perf_counter() - started
            response.raise_for_status()
            results = response.json()["results"]
            assert len(results) == len(tasks), response.text[:300]
            return seconds, results

        server_batch()  # warm-up: media cache, batch shapes
        hwm["after warm-up /predict"] = proc_kib(pid, "VmHWM")["VmHWM"] / MIB
        server_runs = [server_batch() for _ in range(args.repeats)]
        hwm["after timed /predict"] = proc_kib(pid, "VmHWM")["VmHWM"] / MIB
        server_boxes = [len(r["result"]) for r in server_runs[-1][1][:2]]

        from ultralytics import YOLO

        model = YOLO(env["BASE_MODEL"])
        files = [str(assets / IMAGES[i % 2]) for i in range(args.batch)]
        for name in IMAGES:  # warm-up as for the server
            model.predict(str(assets / name), imgsz=IMGSZ, conf=CONF, verbose=False)
        direct_runs = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            found = [model.predict(f, imgsz=IMGSZ, conf=CONF, verbose=False)[0] for f in files]
            direct_runs.append(time.perf_counter() - started)
        direct_boxes = [len(r.boxes) for r in found[:2]]
        final = proc_kib(pid, "VmHWM", "VmRSS")
    except Exception:
        print(tail(work / "server.log"), file=sys.stderr)
        raise
    finally:
        if server:
            server.stop()
    server_s = sorted(s for s, _ in server_runs)[len(server_runs) // 2]
    direct_s = sorted(direct_runs)[len(direct_runs) // 2]
    throughput = {"images": args.batch, "server_request_s": server_s, "server_images_per_s": args.batch / server_s,
                  "direct_calls_s": direct_s, "direct_images_per_s": args.batch / direct_s,
                  "ratio": server_s / direct_s, "server_all_s": [round(s, 3) for s, _ in server_runs],
                  "direct_all_s": [round(s, 3) for s in direct_runs],
                  "boxes_server_vs_direct": {name: [s, d] for name, s, d in zip(IMAGES, server_boxes, direct_boxes)}}
    memory = {"server_vmhwm_mib": final["VmHWM"] / MIB, "server_vmrss_mib": final["VmRSS"] / MIB,
              "server_vmhwm_steps_mib": hwm, "predict_batch": int(env.get("PREDICT_BATCH") or 16)}
    return ack, throughput, memory


def plain_memory(work: Path) -> dict:
    """VmHWM of a bare Python process: import Ultralytics, load the weights, predict both images once."""
    from model.yolo_env import prepare_ultralytics

    prepare_ultralytics(work / "ultralytics", allow_downloads=False)  # offline, fonts in place, as the server
    assets = Path(__import__("ultralytics").ASSETS)
    env = {**os.environ, "YOLO_CONFIG_DIR": str(work / "ultralytics"), "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    weights = str(SHARED / "weights" / "person-fall-yolov8s.pt")
    out = subprocess.run([sys.executable, "-c", PLAIN, weights, *(str(assets / n) for n in IMAGES)], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"plain process failed:\n{out.stderr[-3000:]}")
    fields = json.loads(out.stdout.strip().splitlines()[-1])
    return {"vmhwm_mib": fields["VmHWM"] / MIB, "vmrss_mib": fields["VmRSS"] / MIB}


def training_memory(work: Path, ls: LabelStudioStandIn, args) -> dict:
    """Peak memory of `python -m ls_backend.worker --burst` and every process it forks, during one training job."""
    import psutil

    dataset = args.dataset.resolve()
    names = class_names(dataset)
    train = [i for i in read_dataset(dataset) if i.split == "train"][:10]
    config = label_config(names)
    events = [annotation_event(1, task_id, ls.upload(1, item.image), to_result(item, names), config)
              for task_id, item in enumerate(train, start=1)]
    # The worker resyncs from Label Studio's export the first time it sees a project: give it the same tasks.
    ls.api["/api/projects/1"] = {"id": 1, "label_config": config}
    ls.api["/api/projects/1/export"] = [{**e["task"], "annotations": [e["annotation"]]} for e in events]
    flush(args.redis_url)
    env = backend_env(work / "models", ls.url, redis_url=args.redis_url, min_annotations=10, train_time_budget=20,
                      refine_time_budget=0, autolabel_after_train="false")
    server = worker = None
    try:
        server, url = start_server(env, work / "server.log")
        http = requests.Session()
        http.post(f"{url}/setup", json={"project": 1, "schema": config}, timeout=30).raise_for_status()
        outcomes = [http.post(f"{url}/webhook", json=e, timeout=10).json().get("training") for e in events]
        if outcomes[-1] != "queued":
            raise RuntimeError(f"the tenth annotation did not queue a training job: {outcomes}")
        started = time.monotonic()
        worker = Process([sys.executable, "-m", "ls_backend.worker", "--burst"], env, work / "worker.log")
        root = psutil.Process(worker.proc.pid)
        peak_hwm: dict[int, tuple[str, float]] = {}
        peak_rss_sum = peak_pss_sum = 0.0
        samples = 0
        while worker.proc.poll() is None:
            if time.monotonic() - started > args.train_deadline:
                raise RuntimeError(f"the worker still runs after {args.train_deadline:.0f} s")
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss_sum = pss_sum = 0.0
            for proc in tree:
                try:
                    role = "worker" if proc == root else ("work-horse" if proc.ppid() == root.pid else "grandchild")
                except psutil.NoSuchProcess:
                    continue
                fields = proc_kib(proc.pid, "VmHWM", "VmRSS")
                if not fields:
                    continue
                if fields["VmHWM"] / MIB > peak_hwm.get(proc.pid, ("", 0.0))[1]:
                    peak_hwm[proc.pid] = (role, fields["VmHWM"] / MIB)
                rss_sum += fields["VmRSS"] / MIB
                pss_sum += pss_kib(proc.pid) / MIB
            peak_rss_sum, peak_pss_sum = max(peak_rss_sum, rss_sum), max(peak_pss_sum, pss_sum)
            samples += 1
            time.sleep(0.2)
        seconds = time.monotonic() - started
        job = http.get(f"{url}/status/1", timeout=10).json()
    except Exception:
        print(tail(work / "server.log"), tail(work / "worker.log"), sep="\n", file=sys.stderr)
        raise
    finally:
        if worker:
            worker.stop()
        if server:
            server.stop()
        flush(args.redis_url)
    by_role: dict[str, float] = {}
    for role, mib in peak_hwm.values():
        by_role[role] = max(by_role.get(role, 0.0), mib)
    state = job.get("job") or {}
    return {"worker_exit": worker.proc.returncode, "worker_seconds": round(seconds, 1), "samples": samples,
            "processes_seen": len(peak_hwm), "peak_vmhwm_mib": max(m for _, m in peak_hwm.values()),
            "peak_vmhwm_by_role_mib": by_role, "peak_tree_rss_sum_mib": peak_rss_sum,
            "peak_tree_pss_sum_mib": peak_pss_sum, "job_state": state.get("state"), "job_run": state.get("run"),
            "job_seconds": state.get("seconds"), "version": state.get("version"), "accepted": state.get("accepted"),
            "job_error": state.get("error") or state.get("reason")}


def exported_copy(work: Path, weights: Path, imgsz: int, check: list[Path]) -> Path:
    """A copy of the weights with its OpenVINO export beside it, as a training job leaves a promoted version."""
    from model.export import export_openvino
    from model.images import read_image

    folder = work / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / weights.name
    shutil.copyfile(weights, copy)
    export_openvino(copy, imgsz, [read_image(p) for p in check])
    return copy


def matched(gt: np.ndarray, pred: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each predicted row, whether it is a true positive at each IoU threshold (Ultralytics' greedy matching)."""
    correct = np.zeros((len(pred), len(thresholds)), dtype=bool)
    if not len(gt) or not len(pred):
        return correct
    lt = np.maximum(gt[:, None, 1:3], pred[None, :, :2])
    rb = np.minimum(gt[:, None, 3:5], pred[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_gt = np.prod(gt[:, 3:5] - gt[:, 1:3], axis=1)
    area_pred = np.prod(pred[:, 2:4] - pred[:, :2], axis=1)
    iou = inter / (area_gt[:, None] + area_pred[None, :] - inter + 1e-9)
    iou *= gt[:, None, 0] == pred[None, :, 5]
    for k, t in enumerate(thresholds):
        pairs = np.array(np.nonzero(iou >= t)).T
        if len(pairs):
            pairs = pairs[iou[pairs[:, 0], pairs[:, 1]].argsort()[::-1]]
            pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]
            pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]
            correct[pairs[:, 1], k] = True
    return correct


def held_out_map(predict, items, names: list[str]) -> dict:
    """mAP50 and mAP50-95 of predict(image) -> rows (x1, y1, x2, y2, score, class), with Ultralytics' AP code."""
    from ultralytics.utils.metrics import ap_per_class

    from model.images import read_image

    thresholds = np.linspace(0.5, 0.95, 10)
    tps, confs, classes, targets = [], [], [], []
    for item in items:
        image = read_image(item.image)
        h, w = image.shape[:2]
        gt = np.array([[c, x1 * w, y1 * h, x2 * w, y2 * h] for c, x1, y1, x2, y2 in item.rows]).reshape(-1, 5)
        rows = predict(image)
        tps.append(matched(gt, rows, thresholds))
        confs.append(rows[:, 4])
        classes.append(rows[:, 5])
        targets.append(gt[:, 0])
    result = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(classes),
                          np.concatenate(targets), names=dict(enumerate(names)))
    ap = result[5]
    return {"map50": float(ap[:, 0].mean()), "map50_95": float(ap.mean()), "images": len(items)}


def trained_version(work: Path, args) -> tuple[Path, int, list, list[str]]:
    """A version trained on bccd by the product's own training run (export on), and the held-out items."""
    from model.label_config import parse_label_config
    from model.pipeline import run_training
    from model.project_store import ProjectStore
    from model.registry import ProjectRegistry
    from model.trainer import TrainParams

    dataset = args.dataset.resolve()
    names = class_names(dataset)
    items = read_dataset(dataset)
    train = [i for i in items if i.split == "train"][:args.map_train]
    held_out = [i for i in items if i.split != "train"][:args.map_held_out]
    store, registry = ProjectStore(work / "models", 1), ProjectRegistry(work / "models", 1)
    for task_id, item in enumerate(train, start=1):
        store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(item.image)},
                   "result": to_result(item, names), "cancelled": False})
    outcome = run_training(store, registry, parse_label_config(label_config(names)),
                           lambda record: Path(record["data"]["image"]), SHARED / "weights" / "yolov5nu-coco-backbone.pt",
                           TrainParams(time_budget=args.map_train_budget), 2, True, 5, export=True)
    export = outcome.version.meta.get("export") or {}
    if "error" in export or not outcome.accepted:
        raise RuntimeError(f"the bench version was not exported: {outcome.reason} {export}")
    return outcome.version.weights, outcome.version.meta["plan"]["imgsz"], held_out, names


def runtimes(work: Path, ls: LabelStudioStandIn, args) -> dict:
    """Direct Ultralytics PyTorch calls, /predict with PyTorch and /predict with the OpenVINO export, interleaved
    image by image on the same weights and size; then each server's peak RSS after a batch; then held-out mAP50."""
    from ultralytics import YOLO

    from model.predictor import CANDIDATE_CONF
    from model.runtime import ExportedDetector, export_folder

    assets = Path(__import__("ultralytics").ASSETS)
    weights = exported_copy(work, SHARED / "weights" / "person-fall-yolov8s.pt", IMGSZ,
                            [assets / n for n in IMAGES])
    refs = {name: ls.upload(3, assets / name) for name in IMAGES}
    servers, urls, pids = {}, {}, {}
    out: dict = {"imgsz": IMGSZ, "weights": weights.name}
    try:
        for runtime in ("pytorch", "openvino"):
            env = backend_env(work / f"models-{runtime}", ls.url, min_annotations=100_000, predict_imgsz=IMGSZ,
                              predict_conf=CONF, base_model=str(weights), predict_runtime=runtime,
                              openvino_precision=args.openvino_precision)
            servers[runtime], urls[runtime] = start_server(env, work / f"server-{runtime}.log")
            pids[runtime] = servers[runtime].proc.pid
            wait_loaded(urls[runtime])
            health = requests.get(f"{urls[runtime]}/health", timeout=5).json()
            assert health["model_runtimes"] == {str(weights): runtime}, health
            out[f"{runtime}_vmhwm_loaded_mib"] = proc_kib(pids[runtime], "VmHWM")["VmHWM"] / MIB
        http = requests.Session()
        for url in urls.values():
            http.post(f"{url}/setup", json={"project": 3, "schema": PERSON_CONFIG}, timeout=30).raise_for_status()

        def one(runtime: str, name: str) -> tuple[float, list]:
            body = {"tasks": [{"id": 1, "data": {"image": refs[name]}}], "project": 3, "label_config": PERSON_CONFIG}
            started = time.perf_counter()
            response = http.post(f"{urls[runtime]}/predict", json=body, timeout=600)
            seconds = time.perf_counter() - started
            response.raise_for_status()
            return seconds, response.json()["results"][0]["result"]

        model = YOLO(str(weights))
        images = {name: str(assets / name) for name in IMAGES}

        def direct(name: str) -> tuple[float, list]:
            started = time.perf_counter()
            found = model.predict(images[name], imgsz=IMGSZ, conf=CONF, iou=NMS_IOU, verbose=False)[0]
            return time.perf_counter() - started, found.boxes.data.cpu().numpy()

        paths = {"direct": direct, "pytorch": lambda n: one("pytorch", n), "openvino": lambda n: one("openvino", n)}
        for _ in range(2):  # warm-up: first-call allocations, media cache, compiled shapes
            for name in IMAGES:
                for fn in paths.values():
                    fn(name)
        times: dict[str, list[float]] = {k: [] for k in paths}
        boxes: dict[str, dict] = {k: {} for k in paths}
        for _ in range(args.runtime_runs):  # interleaved, so contention from other processes hits all three alike
            for name in IMAGES:
                for key, fn in paths.items():
                    seconds, found = fn(name)
                    times[key].append(seconds)
                    boxes[key][name] = len(found)
        tasks = [{"id": 1000 + i, "data": {"image": refs[IMAGES[i % 2]]}} for i in range(args.batch)]
        for runtime, url in urls.items():
            started = time.perf_counter()
            response = http.post(f"{url}/predict", json={"tasks": tasks, "project": 3, "label_config": PERSON_CONFIG},
                                 timeout=900)
            response.raise_for_status()
            out[f"{runtime}_batch_s"] = time.perf_counter() - started
            fields = proc_kib(pids[runtime], "VmHWM", "VmRSS")
            out[f"{runtime}_vmhwm_mib"], out[f"{runtime}_vmrss_mib"] = fields["VmHWM"] / MIB, fields["VmRSS"] / MIB
            out[f"{runtime}_torch_imported"] = "torch" in Path(f"/proc/{pids[runtime]}/maps").read_text()
    except Exception:
        for runtime in servers:
            print(tail(work / f"server-{runtime}.log"), file=sys.stderr)
        raise
    finally:
        for server in servers.values():
            server.stop()
    for key, values in times.items():
        out[f"{key}_ms"] = 1000 * statistics.median(values)
        out[f"{key}_all_ms"] = [round(1000 * v, 1) for v in values]
        out[f"{key}_boxes"] = boxes[key]
    for key in ("pytorch", "openvino"):
        out[f"{key}_ratio"] = out[f"{key}_ms"] / out["direct_ms"]
        # the same ratio per interleaved round: robust to a neighbour's load that comes and goes
        pairs = [a / b for a, b in zip(times[key], times["direct"])]
        out[f"{key}_ratio_median_of_pairs"] = statistics.median(pairs)

    print(f"[{time.strftime('%H:%M:%S')}] held-out mAP50 ...", flush=True)
    print("partial results in", write_results("speed-runtimes-partial", out), flush=True)
    version, imgsz, held_out, names = trained_version(work / "map", args)
    torch_model = YOLO(str(version), task="detect")
    exported = ExportedDetector(export_folder(version), args.openvino_precision)
    conf = 0.001  # as a validation run: the whole precision-recall curve
    out["map"] = {
        "dataset": args.dataset.name, "imgsz": imgsz, "precision": exported.precision,
        "pytorch": held_out_map(lambda im: torch_model.predict(im, imgsz=imgsz, conf=conf, iou=NMS_IOU,
                                                               verbose=False)[0].boxes.data.cpu().numpy(),
                                held_out, names),
        "openvino": held_out_map(lambda im: exported.predict([im], imgsz, conf)[0], held_out, names),
        "candidate_conf_served": CANDIDATE_CONF}
    out["map"]["map50_difference"] = out["map"]["openvino"]["map50"] - out["map"]["pytorch"]["map50"]
    if out["map"]["pytorch"]["map50"] < 0.1:
        print(f"NOTE: the bench version scores mAP50 {out['map']['pytorch']['map50']:.3f}: too weak for the "
              "comparison to mean much; give it more --map-train-budget", flush=True)
    out["openvino_precision"] = exported.precision
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200, help="timed webhook events per queue mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed webhook events first, to another project")
    parser.add_argument("--deadline", type=float, default=300, help="seconds the event loop may take at most")
    parser.add_argument("--batch", type=int, default=64, help="tasks in the /predict request")
    parser.add_argument("--repeats", type=int, default=1, help="timed /predict requests (median is reported)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "bccd")
    parser.add_argument("--train-deadline", type=float, default=900)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                        help="what to measure (all by default); 'plain' is the memory reference of every section")
    parser.add_argument("--runtime-runs", type=int, default=10,
                        help="interleaved rounds of single-image calls per path in 'runtimes' (two images each)")
    parser.add_argument("--openvino-precision", default="", choices=["", "f32", "bf16"],
                        help="OPENVINO_PRECISION of the exported server ('' = OpenVINO's default for the CPU)")
    parser.add_argument("--map-train", type=int, default=20, help="bccd training images of the mAP50 version")
    parser.add_argument("--map-held-out", type=int, default=60, help="held-out bccd images the mAP50 is taken on")
    parser.add_argument("--map-train-budget", type=float, default=60, help="training seconds of the mAP50 version")
    args = parser.parse_args()
    sections = [name for name in SECTIONS if name in set(args.sections) | {"plain"}]

    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        from model.yolo_env import prepare_ultralytics

        # Offline Ultralytics for the direct calls in this process; each backend run prepares its own config dir.
        prepare_ultralytics(work / "ultralytics", allow_downloads=False)
        results = {}
        for name in sections:
            sub = work / name
            sub.mkdir()
            ls = LabelStudioStandIn(sub / "ls")
            try:
                print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
                results[name] = SECTIONS[name](sub, ls, args)
            finally:
                ls.close()

    plain = results["plain"]
    target = plain["vmhwm_mib"] + 100
    payload: dict = {"memory": {"plain": plain, "target_mib": target}}
    memory_rows = []
    if "in-process" in results:
        ack_in, throughput, server_memory = results["in-process"]
        payload["webhook_ack"] = {"in_process": ack_in}
        payload["throughput"] = throughput
        payload["memory"].update(server=server_memory, target_met=server_memory["server_vmhwm_mib"] <= target)
        memory_rows.append(["server VmHWM after predictions", server_memory["server_vmhwm_mib"],
                            "target <= plain + 100 = %.0f: %s" % (target, "met" if server_memory["server_vmhwm_mib"]
                                                                   <= target else "NOT met")])
        print()
        print_table([f"{args.batch} images", "seconds", "images/s"],
                    [["one /predict request (LS media path)", throughput["server_request_s"],
                      throughput["server_images_per_s"]],
                     [f"{args.batch} direct single-image Ultralytics calls", throughput["direct_calls_s"],
                      throughput["direct_images_per_s"]]])
    if "in-process" in results and "rq" in results:
        ack_rq_ = results["rq"]
        payload["webhook_ack"]["rq"] = ack_rq_
        print()
        print_table(["webhook ack", "queue", "events", "p50 ms", "p99 ms", "max ms", "training field"],
                    [["in-process, MIN_ANNOTATIONS=100000", "in-process", ack_in["events"], ack_in["p50_ms"],
                      ack_in["p99_ms"], ack_in["max_ms"], json.dumps(ack_in["training_outcomes"])],
                     ["RQ, MIN_ANNOTATIONS=10, no worker", "rq", ack_rq_["events"], ack_rq_["p50_ms"],
                      ack_rq_["p99_ms"], ack_rq_["max_ms"], json.dumps(ack_rq_["training_outcomes"])]])
    memory_rows.append(["plain Python: import, load, predict 2 images", plain["vmhwm_mib"], ""])
    if "training" in results:
        training = results["training"]
        payload["memory"]["training"] = training
        memory_rows += [["RQ worker + forks, max VmHWM of one process", training["peak_vmhwm_mib"],
                         json.dumps({k: round(v) for k, v in training["peak_vmhwm_by_role_mib"].items()})],
                        ["RQ worker + forks, max summed RSS", training["peak_tree_rss_sum_mib"],
                         "shared pages counted twice"],
                        ["RQ worker + forks, max summed PSS", training["peak_tree_pss_sum_mib"],
                         f"job {training['job_state']} {training['job_run']} {training['version']} "
                         f"in {training['worker_seconds']} s"]]
    if "runtimes" in results:
        rt = payload["runtimes"] = results["runtimes"]
        for key in ("pytorch", "openvino"):
            rt[f"{key}_target_met"] = rt[f"{key}_vmhwm_mib"] <= target
            memory_rows.append([f"server VmHWM, {key} serving, after a {args.batch}-task /predict",
                                rt[f"{key}_vmhwm_mib"], "target <= %.0f: %s; torch loaded: %s" % (
                                    target, "met" if rt[f"{key}_target_met"] else "NOT met",
                                    rt[f"{key}_torch_imported"])])
        print()
        print(f"per image, median of {2 * args.runtime_runs} interleaved calls, imgsz {rt['imgsz']}, "
              f"{rt['weights']}; OpenVINO precision {rt['openvino_precision']}")
        print_table(["path", "ms/image", "ratio to direct", "ratio, median of pairs", "boxes bus/zidane",
                     f"{args.batch}-task /predict s", "peak RSS MiB"],
                    [["direct Ultralytics PyTorch call", rt["direct_ms"], 1.0, 1.0,
                      "/".join(str(rt["direct_boxes"][n]) for n in IMAGES), "", ""]]
                    + [[f"/predict, {key}", rt[f"{key}_ms"], rt[f"{key}_ratio"], rt[f"{key}_ratio_median_of_pairs"],
                        "/".join(str(rt[f"{key}_boxes"][n]) for n in IMAGES), rt[f"{key}_batch_s"],
                        rt[f"{key}_vmhwm_mib"]] for key in ("pytorch", "openvino")])
        m = rt["map"]
        print()
        print_table([f"held-out mAP ({m['pytorch']['images']} {m['dataset']} images, imgsz {m['imgsz']})", "mAP50",
                     "mAP50-95"],
                    [[key, m[key]["map50"], m[key]["map50_95"]] for key in ("pytorch", "openvino")]
                    + [["openvino - pytorch", m["map50_difference"],
                        m["openvino"]["map50_95"] - m["pytorch"]["map50_95"]]])
    print()
    print_table(["peak memory", "MiB", "note"], memory_rows)
    import torch
    import ultralytics

    payload["settings"] = {"imgsz": IMGSZ, "conf": CONF, "batch": args.batch, "events": args.events,
                           "warmup_events": args.warmup, "repeats": args.repeats, "redis_url": args.redis_url,
                           "base_model": "person-fall-yolov8s.pt", "train_base_model": "yolov5nu-coco-backbone.pt",
                           "dataset": str(args.dataset), "sections": sections, "runtime_runs": args.runtime_runs,
                           "load_average_at_end": os.getloadavg()}
    payload["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "ultralytics": ultralytics.__version__, "cuda": torch.cuda.is_available(),
                      "cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        import openvino

        payload["env"]["openvino"] = openvino.__version__
    except ImportError:
        payload["env"]["openvino"] = None
    print("wrote", write_results("speed" if set(sections) == set(SECTIONS) else "speed-" + "-".join(sections),
                                 payload))


SECTIONS = {"in-process": lambda w, ls, args: in_process(w, ls, args),
            "rq": lambda w, ls, args: ack_rq(w, ls, args),
            "plain": lambda w, ls, args: plain_memory(w),
            "training": lambda w, ls, args: training_memory(w, ls, args),
            "runtimes": lambda w, ls, args: runtimes(w, ls, args)}


if __name__ == "__main__":
    main()
