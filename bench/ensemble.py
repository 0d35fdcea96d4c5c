"""Do several models trained on the same k images leave fewer boxes to touch than one, once their boxes are fused?

    python bench/ensemble.py --datasets ../shared/datasets/bccd --budget 120 --seeds 0 1 2

Every seed trains the product's trainer on the same first k training images (size and passes planned as the
backend plans them, or --imgsz/--epochs with no time limit) and predicts the held-out images once at the lowest
threshold. The members' boxes are fused by weighted boxes fusion as the product fuses a cross-checked version with
its fold models (model/fusion.py: boxes of one label overlapping by --iou averaged by score, a box's score its
members' mean). Reported: held-out mAP50 (model.validator.pooled_map50)
and boxes touched per ground-truth box at the one threshold best on those images (bench/serve_rules.oracle), for
each member alone (mean) and for the first 2, 3, ... members fused.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import TRAIN_BASE, held_out_dataset, print_rows, train_as_planned, write_run
from serve_rules import oracle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import fusion, thresholds, trainer  # noqa: E402
from model.label_config import Box  # noqa: E402
from model.validator import pooled_map50  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import class_names, read_dataset  # noqa: E402


def fuse(members: list[list[thresholds.HeldOutImage]], names: list[str], iou: float) -> list[thresholds.HeldOutImage]:
    """Each image's boxes of all members, fused into one set by weighted boxes fusion (model/fusion.py)."""
    fused = []
    for index, image in enumerate(members[0]):
        found = [np.array([[b.x1, b.y1, b.x2, b.y2, b.score, names.index(b.label)] for b in member[index].predicted]
                          ).reshape(-1, 6) for member in members]
        fused.append(thresholds.HeldOutImage(
            [Box(names[int(c)], x1, y1, x2, y2, s) for x1, y1, x2, y2, s, c in fusion.fuse(found, iou).tolist()],
            image.truth))
    return fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per member (0: no limit)")
    parser.add_argument("--imgsz", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iou", type=float, default=0.55, help="weighted boxes fusion's overlap")
    parser.add_argument("--name", default="ensemble", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    prepare_ultralytics(Path(tempfile.gettempdir()) / "ensemble-ultralytics", allow_downloads=False)
    results = []
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        train = [i for i in items if i.split == "train"][:args.k]
        held = [i for i in items if i.split != "train"][:args.holdout]
        members = []
        with tempfile.TemporaryDirectory(prefix="ensemble-") as tmp:
            held_yaml = held_out_dataset(held, names, Path(tmp) / "held")
            for seed in args.seeds:
                params = trainer.TrainParams(time_budget=args.budget, imgsz=args.imgsz, epochs=args.epochs, seed=seed)
                weights, _, run_plan = train_as_planned(train, names, TRAIN_BASE, params, Path(tmp) / f"seed{seed}")
                members.append(thresholds.held_out_predictions(weights, held_yaml, run_plan.imgsz))
        row = {"dataset": dataset.name, "imgsz": run_plan.imgsz,
               "one mAP50": round(statistics.mean(pooled_map50(m) for m in members), 3),
               "one touched": round(statistics.mean(oracle(m) for m in members), 3)}
        for n in range(2, len(members) + 1):
            fused = fuse(members[:n], names, args.iou)
            row[f"{n} mAP50"], row[f"{n} touched"] = round(pooled_map50(fused), 3), round(oracle(fused), 3)
        results.append(row)
        print_rows(results)
    print("wrote", write_run(args.name, args, results))


if __name__ == "__main__":
    main()
