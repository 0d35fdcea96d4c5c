"""Do a cross-check's fold models, averaged into one (a soup) or their boxes fused, leave fewer boxes to touch?

    python bench/soup.py --datasets ../shared/datasets/bccd --imgsz 288 --epochs 100

The first k training images are split into groups as model/crosscheck.folds splits a version's tasks; per group the
product's trainer trains on the other groups (a fold, all from one base with one seed) and predicts its group and
the held-out images. The soup is the folds' weights averaged: it has seen every group and predicts as fast as one
model. The fused column is the folds' boxes fused by weighted boxes fusion (model/fusion.py), at one prediction
per fold, as the product serves a cross-checked version with its fold models. Reported on the held-out images: mAP50 and touched per ground-truth box at the best threshold
(bench/serve_rules.oracle), for the fold models (mean), the soup and the fused folds, and touched per box at the
thresholds the product learns on the folds' pooled group predictions (z of one group's tasks), as model/crosscheck
serves them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import TRAIN_BASE, held_out_dataset, print_rows, write_run
from ensemble import fuse
from serve_rules import oracle, touched

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import thresholds, trainer  # noqa: E402
from model.crosscheck import folds  # noqa: E402
from model.policy import serve_z  # noqa: E402
from model.validator import pooled_map50  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import class_names, read_dataset  # noqa: E402


def average_checkpoints(paths: list[Path], out: Path) -> Path:
    """One Ultralytics checkpoint whose weights (and batch-norm statistics) are the mean of `paths`' models.

    The models must share the architecture and the class order (one label set, one base); the first checkpoint's
    other fields (names, training arguments) are kept.
    """
    import torch

    checkpoints = [torch.load(path, map_location="cpu", weights_only=False) for path in paths]
    first = checkpoints[0]
    model = first.get("ema") or first["model"]
    states = [(c.get("ema") or c["model"]).state_dict() for c in checkpoints]
    averaged = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            averaged[key] = (sum(state[key].float() for state in states) / len(states)).to(value.dtype)
        else:
            averaged[key] = value
    model.load_state_dict(averaged)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**first, "model": model, "ema": None, "optimizer": None}, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--imgsz", type=int, default=288)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iou", type=float, default=0.55, help="weighted boxes fusion's overlap")
    parser.add_argument("--name", default="soup", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    prepare_ultralytics(Path(tempfile.gettempdir()) / "soup-ultralytics", allow_downloads=False)
    network = trainer.checkpoint_model(TRAIN_BASE)
    results = []
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        train = [i for i in items if i.split == "train"][:args.k]
        held = [i for i in items if i.split != "train"][:args.holdout]
        groups = folds(list(range(len(train))), 0)
        plan = trainer.TrainPlan(args.epochs, args.imgsz, trainer.backbone_layers(network), 4, 0)
        own, tests, weights = [], [], []
        with tempfile.TemporaryDirectory(prefix="soup-") as tmp:
            work = Path(tmp)
            test_yaml = held_out_dataset(held, names, work / "test")
            for g, group in enumerate(groups):
                run = work / f"g{g}"
                data = held_out_dataset([item for i, item in enumerate(train) if i not in group], names, run / "train")
                weights.append(trainer.train(data, TRAIN_BASE, run / "run", plan, seed=args.seed)[0])
                group_yaml = held_out_dataset([train[i] for i in group], names, run / "group")
                own += thresholds.held_out_predictions(weights[-1], group_yaml, args.imgsz)
                tests.append(thresholds.held_out_predictions(weights[-1], test_yaml, args.imgsz))
            soup = thresholds.held_out_predictions(average_checkpoints(weights, work / "soup.pt"), test_yaml,
                                                   args.imgsz)
        fused = fuse(tests, names, args.iou)
        served = thresholds.learn(own, names, 0.25, z=serve_z(len(groups[0])))[0]
        results.append({
            "dataset": dataset.name, "folds": len(groups),
            "fold mAP50": round(statistics.mean(pooled_map50(t) for t in tests), 3),
            "soup mAP50": round(pooled_map50(soup), 3), "fused mAP50": round(pooled_map50(fused), 3),
            "fold oracle": round(statistics.mean(oracle(t) for t in tests), 3), "soup oracle": round(oracle(soup), 3),
            "fused oracle": round(oracle(fused), 3),
            "fold pooled": round(statistics.mean(touched(t, served) for t in tests), 3),
            "soup pooled": round(touched(soup, served), 3), "fused pooled": round(touched(fused, served), 3)})
        print_rows(results)
    print("wrote", write_run(args.name, args, results))


if __name__ == "__main__":
    main()
