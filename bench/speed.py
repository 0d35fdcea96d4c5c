"""Speed and memory of the backend on this machine: webhook acknowledgement, batch prediction, peak RSS.

    python bench/speed.py [--events 200] [--batch 64] [--redis-url redis://127.0.0.1:6379/11]

1. Webhook acknowledgement latency of ANNOTATION_CREATED events, sent one after another over a keep-alive
   session: in-process queue with MIN_ANNOTATIONS so high that nothing trains, then with RQ (MIN_ANNOTATIONS=10,
   no worker) so every event from the tenth on goes through Redis (the first one enqueues, the rest are folded).
2. One /predict request of --batch tasks (bus.jpg and zidane.jpg alternating, read through the Label Studio
   media path) against the same number of direct single-image Ultralytics calls.
3. Peak RSS (VmHWM) of the server after those predictions against a plain Python process that imports
   Ultralytics, loads the same weights and predicts the two images once (target: server <= plain + 100 MiB).
4. Peak memory of an RQ worker (`--burst`) and its forked work-horse during one training job on 10 bccd images.

The Redis database (--redis-url) is flushed before and after. Results: bench/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import (SHARED, LabelStudioStandIn, Process, annotation_event, backend_env, print_table, start_server,
                    write_results)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        work = Path(tmp)
        from model.yolo_env import prepare_ultralytics

        # Offline Ultralytics for the direct calls in this process; each backend run prepares its own config dir.
        prepare_ultralytics(work / "ultralytics", allow_downloads=False)
        results = {}
        for name, run in (("in-process", lambda w, ls: in_process(w, ls, args)),
                          ("rq", lambda w, ls: ack_rq(w, ls, args)),
                          ("plain", lambda w, ls: plain_memory(w)),
                          ("training", lambda w, ls: training_memory(w, ls, args))):
            sub = work / name
            sub.mkdir()
            ls = LabelStudioStandIn(sub / "ls")
            try:
                print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
                results[name] = run(sub, ls)
            finally:
                ls.close()

    ack_in, throughput, server_memory = results["in-process"]
    ack_rq_, plain, training = results["rq"], results["plain"], results["training"]
    print()
    print_table(["webhook ack", "queue", "events", "p50 ms", "p99 ms", "max ms", "training field"],
                [["in-process, MIN_ANNOTATIONS=100000", "in-process", ack_in["events"], ack_in["p50_ms"],
                  ack_in["p99_ms"], ack_in["max_ms"], json.dumps(ack_in["training_outcomes"])],
                 ["RQ db 11, MIN_ANNOTATIONS=10, no worker", "rq", ack_rq_["events"], ack_rq_["p50_ms"],
                  ack_rq_["p99_ms"], ack_rq_["max_ms"], json.dumps(ack_rq_["training_outcomes"])]])
    print()
    print_table([f"{args.batch} images", "seconds", "images/s"],
                [["one /predict request (LS media path)", throughput["server_request_s"],
                  throughput["server_images_per_s"]],
                 [f"{args.batch} direct single-image Ultralytics calls", throughput["direct_calls_s"],
                  throughput["direct_images_per_s"]]])
    print()
    target = plain["vmhwm_mib"] + 100
    print_table(["peak memory", "MiB", "note"],
                [["server VmHWM after predictions", server_memory["server_vmhwm_mib"],
                  "target <= plain + 100 = %.0f: %s" % (target, "met" if server_memory["server_vmhwm_mib"] <= target
                                                         else "NOT met")],
                 ["plain Python: import, load, predict 2 images", plain["vmhwm_mib"], ""],
                 ["RQ worker + forks, max VmHWM of one process", training["peak_vmhwm_mib"],
                  json.dumps({k: round(v) for k, v in training["peak_vmhwm_by_role_mib"].items()})],
                 ["RQ worker + forks, max summed RSS", training["peak_tree_rss_sum_mib"], "shared pages counted twice"],
                 ["RQ worker + forks, max summed PSS", training["peak_tree_pss_sum_mib"],
                  f"job {training['job_state']} {training['job_run']} {training['version']} "
                  f"in {training['worker_seconds']} s"]])
    import torch
    import ultralytics

    payload = {"webhook_ack": {"in_process": ack_in, "rq": ack_rq_}, "throughput": throughput,
               "memory": {"server": server_memory, "plain": plain, "target_mib": target,
                          "target_met": server_memory["server_vmhwm_mib"] <= target, "training": training},
               "settings": {"imgsz": IMGSZ, "conf": CONF, "batch": args.batch, "events": args.events,
                            "warmup_events": args.warmup, "repeats": args.repeats, "redis_url": args.redis_url,
                            "base_model": "person-fall-yolov8s.pt", "train_base_model": "yolov5nu-coco-backbone.pt",
                            "dataset": str(args.dataset)},
               "env": {"python": platform.python_version(), "torch": torch.__version__,
                       "ultralytics": ultralytics.__version__, "cuda": torch.cuda.is_available(),
                       "cpus": os.cpu_count(), "machine": platform.machine()}}
    print("wrote", write_results("speed", payload))


if __name__ == "__main__":
    main()
