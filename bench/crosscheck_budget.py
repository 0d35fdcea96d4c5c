"""How short may a cross-check fold train before the thresholds it lends the served version get worse?

    python bench/crosscheck_budget.py --datasets ../shared/datasets/bccd --imgsz 416 --epochs 100 --fractions 1 0.25

The first k training images are split into groups the way model/crosscheck.folds splits a version's tasks. For
every group and every fraction of --epochs, the product's trainer trains on the other groups and predicts that group
(a fold); the full-length model of each group also predicts the held-out images and plays the served version. For
each group in turn as the served version's held-out tasks, thresholds are learned as model/crosscheck pools them (its
own group's predictions and the other groups' at one fraction, z of its own few tasks) and scored by the boxes a
reviewer would touch per ground-truth box on the held-out images. Passes are fixed, not timed, so the same passes can
be run on a faster machine than the one they stand for (the product's folds run --epochs passes in
REFINE_TIME_BUDGET on 2 cores).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import TRAIN_BASE, held_out_dataset, print_table, write_results
from serve_rules import oracle, touched

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import thresholds, trainer  # noqa: E402
from model.crosscheck import folds  # noqa: E402
from model.policy import serve_z  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import class_names, read_dataset  # noqa: E402


def fold_models(train, held, names: list[str], groups: list[list[int]], fractions: list[float], args, work: Path):
    """(group, fraction) -> its group's predictions, and group -> the full-length model's held-out predictions."""
    network = trainer.checkpoint_model(TRAIN_BASE)
    test_yaml = held_out_dataset(held, names, work / "test")
    own, served = {}, {}
    for fraction in fractions:
        for g, group in enumerate(groups):
            run = work / f"g{g}-{fraction}"
            plan = trainer.TrainPlan(max(1, round(args.epochs * fraction)), args.imgsz,
                                     trainer.backbone_layers(network), 4, 0)
            rest = [item for i, item in enumerate(train) if i not in group]
            weights, _ = trainer.train(held_out_dataset(rest, names, run / "train"), TRAIN_BASE, run / "run", plan,
                                       seed=args.seed)
            own[g, fraction] = thresholds.held_out_predictions(
                weights, held_out_dataset([train[i] for i in group], names, run / "group"), args.imgsz)
            if fraction == fractions[0]:
                served[g] = thresholds.held_out_predictions(weights, test_yaml, args.imgsz)
    return own, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--imgsz", type=int, default=416, help="the served version's size, which its folds keep")
    parser.add_argument("--epochs", type=int, default=100, help="passes of a full-length fold")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                        help="fold lengths to compare; the first also trains the served versions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="crosscheck_budget", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    prepare_ultralytics(Path(tempfile.gettempdir()) / "crosscheck-budget-ultralytics", allow_downloads=False)
    rows, results = [], []
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        train = [i for i in items if i.split == "train"][:args.k]
        held = [i for i in items if i.split != "train"][:args.holdout]
        groups = folds(list(range(len(train))), 0)
        with tempfile.TemporaryDirectory(prefix="crosscheck-budget-") as tmp:
            own, served = fold_models(train, held, names, groups, args.fractions, args, Path(tmp))
        z = serve_z(len(groups[0]))
        alone = [touched(served[g], thresholds.learn(own[g, args.fractions[0]], names, 0.25)[0]) for g in served]
        row = {"dataset": dataset.name, "groups": len(groups), "own_tasks_only": round(statistics.mean(alone), 3),
               "oracle": round(statistics.mean(oracle(served[g]) for g in served), 3)}
        for fraction in args.fractions:
            scores = []
            for g in served:
                pooled = own[g, args.fractions[0]] + [image for h in served if h != g for image in own[h, fraction]]
                scores.append(touched(served[g], thresholds.learn(pooled, names, 0.25, z=z)[0]))
            row[f"pooled x{fraction:g}"] = round(statistics.mean(scores), 3)
        results.append(row)
        rows.append(list(row.values()))
        print_table(list(row.keys()), rows)
    print("wrote", write_results(args.name, {"args": {**vars(args), "datasets": [str(d) for d in args.datasets]},
                                             "results": results}))


if __name__ == "__main__":
    main()
