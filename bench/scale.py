"""P projects annotated at a steady rate, trained by W RQ workers (or in-process jobs) on this machine: versions per
hour, seconds from an annotation to the first served version that learned it (p50/p95), Label Studio API calls
per training job.

    nice -n 19 python bench/scale.py [--projects 4] [--configs rq:1,rq:2] [--per-project 8] [--rate 1]

Each config gets a fresh MODEL_DIR, Redis database, server and workers. Every annotation goes through the server's
webhook route; the stand-in Label Studio serves the images, each project's details and its JSON export (of what was
annotated so far), and counts the API calls. Budgets are tiny (TRAIN_IMGSZ=64, 2 epochs), refinement and
auto-labeling are off and every version is served, so the figures are about the job machinery, not the models.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import (SHARED, V5N_BACKBONE, LabelStudioStandIn, Process, annotation_event, backend_env, print_table,
                    start_server, write_results)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.registry import ProjectRegistry, read_json  # noqa: E402
from model.yolo_import import class_names, label_config, read_dataset, to_result  # noqa: E402

# The quick-training YOLOv5n backbone: these figures are about the job machinery, as they were measured first.
SETTINGS = {"TRAIN_BASE_MODEL": str(V5N_BACKBONE), "TRAIN_IMGSZ": "64", "TRAIN_EPOCHS": "2", "TRAIN_TIME_BUDGET": "0",
            "REFINE_TIME_BUDGET": "0",
            "MIN_ANNOTATIONS": "4", "RETRAIN_EVERY": "4", "AUTOLABEL_AFTER_TRAIN": "false",
            "ACCEPT_ONLY_IF_NOT_WORSE": "false", "SELF_TRAINING": "false"}
ACTIVE = ("queued", "running", "pending")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_config(kind: str, count: int, projects: int, per_project: int, rate: float, dataset: Path, work: Path,
               redis_url: str, extra: dict) -> dict:
    names = class_names(dataset)
    items = [i for i in read_dataset(dataset) if i.split == "train"][:per_project]
    config = label_config(names)
    ls = LabelStudioStandIn(work / "ls")
    annotated: dict[int, list[dict]] = {p: [] for p in range(1, projects + 1)}
    for project in annotated:
        ls.api[f"/api/projects/{project}"] = {"id": project, "label_config": config}
        ls.api[f"/api/projects/{project}/export"] = (lambda p=project: [
            {**e["task"], "annotations": [e["annotation"]]} for e in annotated[p]])
    env = backend_env(work / "models", ls.url, **{**SETTINGS, **extra})
    workers: list[Process] = []
    if kind == "rq":
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        env["REDIS_URL"] = redis_url
        workers = [Process([sys.executable, "-m", "ls_backend.worker"], env, work / f"worker{n}.log")
                   for n in range(count)]
    else:
        env["JOB_CONCURRENCY"] = str(count)
    sent: dict[tuple[int, int], float] = {}
    server = None
    try:
        server, url = start_server(env, work / "server.log", timeout=300)  # a loaded machine imports torch slowly
        events = [(project, task_id, item) for task_id, item in enumerate(items, start=1)
                  for project in annotated]  # round robin: every project annotated at the same steady rate
        begun = time.time()
        for n, (project, task_id, item) in enumerate(events):
            time.sleep(max(0.0, begun + n / rate - time.time()))
            event = annotation_event(project, task_id, ls.upload(project, item.image), to_result(item, names), config)
            annotated[project].append(event)
            sent[(project, task_id)] = time.time()
            assert requests.post(f"{url}/webhook", json=event, timeout=5).status_code == 200
        arrivals_done = time.time()
        deadline = arrivals_done + 900
        while time.time() < deadline:  # until no job waits or runs anywhere
            states = [requests.get(f"{url}/status/{p}", timeout=5).json()["job"] for p in annotated]
            if all(j.get("state") not in ACTIVE and not j.get("waiting") for j in states):
                break
            time.sleep(1)
        ended = time.time()
    finally:
        if server is not None:
            server.stop()
        for worker in workers:
            worker.stop()
        ls.close()
    versions, latencies, jobs = 0, [], []
    for project in annotated:
        served = [v.meta for v in ProjectRegistry(work / "models", project).versions()
                  if v.meta.get("status") != "rejected"]
        versions += len(served)
        for task in range(1, len(items) + 1):
            received = read_json(work / "models" / str(project) / "annotations" / f"{task}.json", {}).get("received")
            first = next((m for m in served if received and m.get("trained_upto", 0) >= received), None)
            if first is not None:
                latencies.append(first["created"] - sent[(project, task)])
        jobs += [read_json(p, {}) for p in (work / "models" / str(project) / "jobs").glob("train-*.json")]
    ran = [j for j in jobs if j.get("state") in ("finished", "skipped", "failed")]
    job_seconds = [j["finished"] - j["started"] for j in ran if j.get("started") and j.get("finished")]
    hours = (ended - begun) / 3600
    return {"queue": f"{kind}:{count}", "projects": projects, "annotations": len(sent), "rate_per_s": rate,
            "seconds": round(ended - begun, 1), "drain_seconds": round(ended - arrivals_done, 1),
            "versions": versions, "versions_per_hour": round(versions / hours, 1), "jobs": len(ran),
            "job_seconds_mean": round(statistics.fmean(job_seconds), 1) if job_seconds else None,
            "jobs_failed": sum(j.get("state") == "failed" for j in ran),
            "latency_p50": percentile(latencies, 0.5), "latency_p95": percentile(latencies, 0.95),
            "latency_mean": statistics.fmean(latencies) if latencies else None, "learned": len(latencies),
            "ls_api_calls": len(ls.calls), "ls_api_calls_per_job": round(len(ls.calls) / max(1, len(ran)), 2),
            "ls_exports": sum(c.endswith("/export") for c in ls.calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "bccd")
    parser.add_argument("--projects", type=int, default=4)
    parser.add_argument("--configs", default="rq:1,rq:2", help="rq:W (W workers) or local:N (JOB_CONCURRENCY=N)")
    parser.add_argument("--per-project", type=int, default=8, help="annotations per project")
    parser.add_argument("--rate", type=float, default=1.0, help="annotations per second, all projects together")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--keep", type=Path, help="keep each config's MODEL_DIR and logs under this folder")
    parser.add_argument("--set", nargs="*", default=[], help="extra backend settings, KEY=VALUE")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    results = []
    for config in args.configs.split(","):
        kind, count = config.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            work = args.keep / config.replace(":", "-") if args.keep else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            results.append(run_config(kind, int(count), args.projects, args.per_project, args.rate,
                                      args.dataset.resolve(), work, args.redis_url, extra))
        print(results[-1], flush=True)
    print_table(["queue", "projects", "annotations", "seconds", "versions", "versions/h", "jobs", "s/job",
                 "p50 s", "p95 s", "LS calls/job", "exports"],
                [[r["queue"], r["projects"], r["annotations"], r["seconds"], r["versions"], r["versions_per_hour"],
                  r["jobs"], r["job_seconds_mean"], r["latency_p50"], r["latency_p95"], r["ls_api_calls_per_job"],
                  r["ls_exports"]]
                 for r in results])
    print("wrote", write_results("scale", {"settings": {**SETTINGS, **extra}, "dataset": args.dataset.name,
                                           "runs": results}))


if __name__ == "__main__":
    main()
