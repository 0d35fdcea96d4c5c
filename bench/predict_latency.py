"""Benchmark: what the server adds on top of Ultralytics per image, and what batching 16 tasks buys.

Run from the repository root:  python bench/predict_latency.py [--weights PATH] [--runs 20]
Results are printed and written to bench/results/predict_latency.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABEL_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                '<Label value="person" predicted_values="Normal,Fall"/></RectangleLabels></View>')
PROJECT = "1.1"
CONF = 0.05
IMAGES = ("bus.jpg", "zidane.jpg")


def free_port() -> int:
    """A port nobody listens on now, so parallel runs do not collide with 9090."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves the image folder without logging every request over the results."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_images(folder: Path) -> ThreadingHTTPServer:
    """Images over HTTP on 127.0.0.1, as Label Studio or a bucket would serve them."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, name="images", daemon=True).start()
    return httpd


def start_server(port: int, weights: Path, tmp: Path, imgsz: int, log_path: Path) -> subprocess.Popen:
    """The backend as deployed (`python -m ls_backend`), offline, in-process training, no Label Studio."""
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "MODEL_DIR": str(tmp / "models"),
           "BASE_MODEL": str(weights), "ALLOW_DOWNLOADS": "false", "ALLOWED_MEDIA_HOSTS": "127.0.0.1",
           "YOLO_CONFIG_DIR": str(tmp / "ultralytics"), "PREDICT_IMGSZ": str(imgsz), "PREDICT_CONF": str(CONF),
           "REDIS_URL": "", "LABEL_STUDIO_URL": "", "LOG_LEVEL": "WARNING"}
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", "ls_backend"], cwd=ROOT, env=env, stdout=log, stderr=log)


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 180.0) -> None:
    """Block until /health answers and the base model is loaded, or fail with the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            health = requests.get(f"{url}/health", timeout=2).json()
            if health.get("base_model_error"):
                raise RuntimeError(f"server cannot load its model: {health['base_model_error']}")
            if health.get("models_loaded"):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server, killing it if it does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT.parent / "shared/weights/person-fall-yolov8s.pt")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per image and path")
    parser.add_argument("--batch", type=int, default=16, help="tasks in the throughput request")
    parser.add_argument("--batch-runs", type=int, default=3, help="timed repetitions of the throughput comparison")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/predict_latency.json")
    args = parser.parse_args()
    weights = args.weights.resolve()
    if not weights.is_file():
        parser.error(f"weights not found: {weights}")

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp_name:
        tmp = Path(tmp_name)
        from model.yolo_env import prepare_ultralytics

        prepare_ultralytics(tmp / "ultralytics", allow_downloads=False)
        import torch
        import ultralytics
        from ultralytics import YOLO

        assets = Path(ultralytics.ASSETS)
        httpd = serve_images(assets)
        image_url = f"http://127.0.0.1:{httpd.server_address[1]}/{{}}"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp / "server.log"
        proc = start_server(port, weights, tmp, args.imgsz, log_path)
        try:
            model = YOLO(str(weights))
            wait_ready(proc, url, log_path)
            http = requests.Session()
            setup = http.post(f"{url}/setup", json={"project": PROJECT, "schema": LABEL_CONFIG}, timeout=30)
            setup.raise_for_status()

            def server_predict(names: list[str]) -> list[dict]:
                tasks = [{"id": i + 1, "data": {"image": image_url.format(n)}} for i, n in enumerate(names)]
                r = http.post(f"{url}/predict", json={"tasks": tasks, "project": PROJECT, "label_config": LABEL_CONFIG},
                              timeout=300)
                r.raise_for_status()
                results = r.json()["results"]
                assert len(results) == len(names), r.text[:500]
                return results

            def direct_predict(name: str):
                return model.predict(str(assets / name), imgsz=args.imgsz, conf=CONF, verbose=False)

            def direct_batch(names: list[str]):
                return model.predict([str(assets / n) for n in names], imgsz=args.imgsz, conf=CONF, verbose=False,
                                     batch=len(names))

            batch_names = [IMAGES[i % len(IMAGES)] for i in range(args.batch)]
            for _ in range(3):  # warm-up: model load, first-call allocations, media cache, batch shapes
                for name in IMAGES:
                    server_predict([name])
                    direct_predict(name)
            server_predict(batch_names)
            direct_batch(batch_names)

            per_image = {}
            for name in IMAGES:
                server_boxes = len(server_predict([name])[0]["result"])
                direct_boxes = len(direct_predict(name)[0].boxes)
                server_s = [timed(lambda: server_predict([name])) for _ in range(args.runs)]
                direct_s = [timed(lambda: direct_predict(name)) for _ in range(args.runs)]
                per_image[name] = {"server_ms": 1000 * statistics.median(server_s),
                                   "direct_ms": 1000 * statistics.median(direct_s),
                                   "server_boxes": server_boxes, "direct_boxes": direct_boxes,
                                   "server_all_ms": [round(1000 * t, 1) for t in server_s],
                                   "direct_all_ms": [round(1000 * t, 1) for t in direct_s]}
                per_image[name]["ratio"] = per_image[name]["server_ms"] / per_image[name]["direct_ms"]

            batch_server = [timed(lambda: server_predict(batch_names)) for _ in range(args.batch_runs)]
            batch_direct = [timed(lambda: [direct_predict(n) for n in batch_names]) for _ in range(args.batch_runs)]
            # One Ultralytics call on the same images, as the server makes: separates batching from server overhead.
            batch_one_call = [timed(lambda: direct_batch(batch_names)) for _ in range(args.batch_runs)]
        finally:
            stop(proc)
            httpd.shutdown()

    throughput = {"tasks": args.batch, "server_request_s": statistics.median(batch_server),
                  "direct_calls_s": statistics.median(batch_direct),
                  "direct_one_call_s": statistics.median(batch_one_call),
                  "server_all_s": [round(t, 3) for t in batch_server],
                  "direct_all_s": [round(t, 3) for t in batch_direct],
                  "direct_one_call_all_s": [round(t, 3) for t in batch_one_call]}
    throughput["ratio"] = throughput["server_request_s"] / throughput["direct_calls_s"]

    print(f"\nper image, median of {args.runs} runs (imgsz {args.imgsz}, conf {CONF}, {weights.name})")
    print(f"{'image':12} {'server ms':>10} {'direct ms':>10} {'ratio':>6} {'boxes s/d':>10}")
    for name, r in per_image.items():
        print(f"{name:12} {r['server_ms']:10.1f} {r['direct_ms']:10.1f} {r['ratio']:6.2f} "
              f"{r['server_boxes']:>5}/{r['direct_boxes']:<4}")
    print(f"\n{args.batch} images, median of {args.batch_runs}: one /predict request "
          f"{throughput['server_request_s']:.2f} s vs {args.batch} direct calls {throughput['direct_calls_s']:.2f} s "
          f"(ratio {throughput['ratio']:.2f}); one direct {args.batch}-image call "
          f"{throughput['direct_one_call_s']:.2f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"weights": str(weights), "imgsz": args.imgsz, "conf": CONF, "runs": args.runs,
              "per_image": per_image, "throughput": throughput,
              "env": {"python": platform.python_version(), "torch": torch.__version__,
                      "ultralytics": ultralytics.__version__, "cuda": torch.cuda.is_available(),
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "machine": platform.machine()}}
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
