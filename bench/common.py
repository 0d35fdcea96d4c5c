"""Pieces every benchmark shares: a stand-in Label Studio media host, backend processes, held-out scoring."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared")).resolve()
TOKEN = "0123456789abcdef0123456789abcdef01234567"
RESULTS = REPO / "bench" / "results"
# The base few-shot training starts from: the complete YOLOv8s detector, measured better than the YOLOv5n COCO
# backbone at the same wall clock (README, "Which base to train from"); --set TRAIN_BASE_MODEL=... compares others.
TRAIN_BASE = SHARED / "weights" / "person-fall-yolov8s.pt"
V5N_BACKBONE = SHARED / "weights" / "yolov5nu-coco-backbone.pt"
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LabelStudioStandIn:
    """Serves /data/upload/ files behind a token and the JSON export, the two things the backend reads."""

    def __init__(self, root: Path):
        self.root = root
        self.api: dict[str, object] = {}  # path -> JSON answer, or a function returning it
        self.calls: list[str] = []  # the API paths requested, in order (media downloads are not API calls)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                if self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, b"{}")
                if path.startswith("/api/"):
                    owner.calls.append(path)
                if path in owner.api:
                    answer = owner.api[path]
                    return self._send(200, json.dumps(answer() if callable(answer) else answer).encode())
                file = owner.root / path.lstrip("/")
                return self._send(200, file.read_bytes()) if file.is_file() else self._send(404, b"")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def upload(self, project: int, source: Path) -> str:
        folder = self.root / "data" / "upload" / str(project)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / source.name)
        return f"/data/upload/{project}/{source.name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def backend_env(model_dir: Path, ls_url: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmark backend: offline, real shared weights, its own MODEL_DIR."""
    env = {**os.environ, "HOST": "127.0.0.1", "MODEL_DIR": str(model_dir), "ALLOW_DOWNLOADS": "false",
           "BASE_MODEL": str(SHARED / "weights" / "person-fall-yolov8s.pt"), "TRAIN_BASE_MODEL": str(TRAIN_BASE),
           "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "REDIS_URL": "", "LOG_LEVEL": "WARNING",
           "YOLO_CONFIG_DIR": str(model_dir.parent / "ultralytics"), "PYTHONPATH": str(REPO)}
    env.update({k.upper(): str(v) for k, v in extra.items()})
    return env


class Process:
    """A child process in its own process group, stopped with everything it started."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


def start_server(env: dict[str, str], log: Path, timeout: float = 60) -> tuple[Process, str]:
    port = free_port()
    server = Process([sys.executable, "-m", "ls_backend"], {**env, "PORT": str(port)}, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except requests.RequestException:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the backend did not start; see {log}")


def annotation_event(project: int, task_id: int, image_ref: str, result: list[dict], config: str) -> dict:
    """The fields of Label Studio's ANNOTATION_CREATED webhook that the backend reads."""
    return {"action": "ANNOTATION_CREATED",
            "project": {"id": project, "label_config": config},
            "task": {"id": task_id, "project": project, "data": {"image": image_ref}},
            "annotation": {"id": 10_000 + task_id, "task": task_id, "project": project, "result": result,
                           "was_cancelled": False, "ground_truth": False}}


def held_out_dataset(items, names: list[str], out: Path) -> Path:
    """A YOLO dataset folder of the held-out images, for Ultralytics' own mAP code."""
    for sub in ("images/val", "labels/val"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for item in items:
        link = out / "images" / "val" / item.image.name
        if not link.exists():
            link.symlink_to(item.image)
        rows = [f"{c} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}" for c, x1, y1, x2, y2 in item.rows]
        (out / "labels" / "val" / f"{item.image.stem}.txt").write_text("\n".join(rows) + "\n")
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(out), "train": "images/val", "val": "images/val",
                                    "names": dict(enumerate(names))}))
    return data


def train_as_planned(train, names: list[str], base: Path, params, work: Path, progress=None):
    """The product's trainer on these items, size and passes planned as the backend plans them (model/trainer.plan)."""
    from model import trainer

    network = trainer.checkpoint_model(base)
    run_plan = trainer.plan(params, len(train), [max(i.width, i.height) for i in train],
                            [min((x2 - x1) * i.width, (y2 - y1) * i.height) for i in train for _, x1, y1, x2, y2 in i.rows],
                            cost=trainer.model_cost(network), backbone=trainer.backbone_layers(network))
    weights, seconds = trainer.train(held_out_dataset(train, names, work / "train"), base, work / "run", run_plan,
                                     params.device, params.seed, progress)
    return weights, seconds, run_plan


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`name:key=value,...` as the A/B benchmarks take their variants."""
    name, _, rest = spec.partition(":")
    return name, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def write_run(name: str, args, results: list[dict]) -> Path:
    """A benchmark's command-line arguments and its result rows, as bench/results/NAME.json."""
    return write_results(name, {"args": {**vars(args), "datasets": [str(d) for d in args.datasets]},
                                "results": results})


def print_rows(results: list[dict]) -> None:
    """Result rows that share their keys, as one table."""
    print_table(list(results[0].keys()), [list(row.values()) for row in results])


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
