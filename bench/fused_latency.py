"""What fusing a version's boxes with its fold models' costs per image, on the product's own prediction path.

    python bench/fused_latency.py --datasets ../shared/datasets/bccd --imgsz 288 --members 4

The base weights stand in for the version and for each fold model (same network, so the same cost); each held-out
image is predicted by model.predictor.predict alone and fused with --members more models (model/fusion.py).
Reported: milliseconds per image, median of --runs passes over the images, and the fusion's own share.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import TRAIN_BASE, print_rows, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import fusion  # noqa: E402
from model.images import read_image  # noqa: E402
from model.policy import Thresholds  # noqa: E402
from model.predictor import LoadedModel, predict  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import read_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--imgsz", type=int, default=288)
    parser.add_argument("--members", type=int, default=4, help="fold models fused with the version")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--name", default="fused_latency", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    prepare_ultralytics(Path(tempfile.gettempdir()) / "fused-latency-ultralytics", allow_downloads=False)
    from ultralytics import YOLO

    models = [LoadedModel(YOLO(str(TRAIN_BASE), task="detect")) for _ in range(args.members + 1)]
    label_map, served = dict(models[0].yolo.names), Thresholds(0.25, {})
    results = []
    for dataset in args.datasets:
        items = [i for i in read_dataset(dataset.resolve()) if i.split != "train"][:args.images]
        images = [read_image(item.image) for item in items]
        row = {"dataset": dataset.name, "imgsz": args.imgsz, "images": len(images)}
        for name, members in (("one model ms", []), (f"{args.members + 1} fused ms", models[1:])):
            predict(models[0], images[:2], label_map, args.imgsz, served, 1, members=members)  # warm-up
            passes = []
            for _ in range(args.runs):
                started = time.perf_counter()
                predict(models[0], images, label_map, args.imgsz, served, 1, members=members)
                passes.append((time.perf_counter() - started) * 1000 / len(images))
            row[name] = round(statistics.median(passes), 1)
        fuse_seconds = 0.0
        for image in images:  # the fusion alone, on the members' own candidates
            found = [m.yolo.predict(image, imgsz=args.imgsz, conf=0.05, verbose=False)[0].boxes.data.numpy()
                     for m in models]
            started = time.perf_counter()
            fusion.fuse(found)
            fuse_seconds += time.perf_counter() - started
        row["fusion ms"] = round(fuse_seconds * 1000 / len(images), 2)
        results.append(row)
        print_rows(results)
    print("wrote", write_run(args.name, args, results))


if __name__ == "__main__":
    main()
