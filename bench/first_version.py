"""Seconds from the tenth annotation webhook to a new served version, in-process and with RQ, and its quality.

    python bench/first_version.py [--dataset ../shared/datasets/bccd] [--modes in-process,rq] [--k 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import (SHARED, LabelStudioStandIn, Process, annotation_event, backend_env, held_out_dataset,
                    print_table, start_server, write_results)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.yolo_import import class_names, label_config, read_dataset, to_result  # noqa: E402


def score(weights: Path, data: Path, imgsz: int, out: Path) -> dict:
    from model.validator import evaluate

    scores = evaluate(weights, data, imgsz, out)
    return {"map50": scores.map50, "map50_95": scores.map50_95}


def run_mode(mode: str, dataset: Path, k: int, holdout: int, work: Path, redis_url: str, extra: dict) -> dict:
    names = class_names(dataset)
    items = read_dataset(dataset)
    train = [i for i in items if i.split == "train"][:k]
    held = [i for i in items if i.split != "train"][:holdout]
    config = label_config(names)
    ls = LabelStudioStandIn(work / "ls")
    env = backend_env(work / "models", ls.url, **extra)
    worker = None
    if mode == "rq":
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        env["REDIS_URL"] = redis_url
        worker = Process([sys.executable, "-m", "ls_backend.worker"], env, work / "worker.log")
    server, url = start_server(env, work / "server.log")
    try:
        setup = {"project": "1.1", "schema": config, "hostname": ls.url, "access_token": ""}
        base_version = requests.post(f"{url}/setup", json=setup, timeout=3).json()["model_version"]
        acks = []
        for task_id, item in enumerate(train, start=1):
            event = annotation_event(1, task_id, ls.upload(1, item.image), to_result(item, names), config)
            started = time.perf_counter()
            assert requests.post(f"{url}/webhook", json=event, timeout=1).status_code == 200
            acks.append(time.perf_counter() - started)
        tenth = time.perf_counter()
        version = base_version
        while version == base_version:
            if time.perf_counter() - tenth > 900:
                raise RuntimeError(f"no new version after 900 s; see {work}/server.log")
            time.sleep(0.25)
            version = requests.post(f"{url}/setup", json=setup, timeout=3).json()["model_version"]
        seconds = time.perf_counter() - tenth
        status = requests.get(f"{url}/status/1", timeout=5).json()
    finally:
        server.stop()
        if worker:
            worker.stop()
        ls.close()
    meta = status["versions"][-1]
    data = held_out_dataset(held, names, work / "held-out")
    imgsz = meta["plan"]["imgsz"]
    trained = score(work / "models" / "1" / "versions" / version / "weights.pt", data, imgsz, work)
    # The base model knows none of a new project's labels unless they map onto its classes: it finds nothing.
    from model.label_config import parse_label_config
    from ultralytics import YOLO

    base_names = YOLO(env["BASE_MODEL"]).names
    base_knows = bool(parse_label_config(config).model_label_map(base_names))
    base = score(Path(env["BASE_MODEL"]), data, imgsz, work) if base_knows else {"map50": 0.0, "map50_95": 0.0}
    return {"mode": mode, "dataset": dataset.name, "k": k, "held_out": len(held), "version": version,
            "seconds_to_served": round(seconds, 1), "train_seconds": meta.get("train_seconds"),
            "plan": meta["plan"], "ack_ms_max": round(1000 * max(acks), 1), "trained": trained, "base": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=SHARED / "datasets" / "bccd")
    parser.add_argument("--modes", default="in-process,rq")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--set", nargs="*", default=[], help="extra backend settings, KEY=VALUE")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    rows, results = [], []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result = run_mode(mode, args.dataset.resolve(), args.k, args.holdout, Path(tmp), args.redis_url, extra)
        results.append(result)
        rows.append([mode, result["dataset"], result["k"], result["seconds_to_served"], result["version"],
                     result["trained"]["map50"], result["base"]["map50"], result["ack_ms_max"]])
    print_table(["mode", "dataset", "k", "s to served", "version", "mAP50 new", "mAP50 base", "max ack ms"], rows)
    print("wrote", write_results("first_version", {"settings": extra, "runs": results}))


if __name__ == "__main__":
    main()
