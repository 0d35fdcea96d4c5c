"""How short may a cross-check fold train before the thresholds it lends the served version get worse?

    python bench/crosscheck_budget.py --datasets ../shared/datasets/bccd --imgsz 416 --epochs 100 --fractions 1 0.25

The first k training images are split into groups the way model/crosscheck.folds splits a version's tasks. For
every group and every fraction of --epochs, the product's trainer trains on the other groups and predicts that group
(a fold); the full-length model of each group also predicts the held-out images and plays the served version. For
each group in turn as the served version's held-out tasks, thresholds are learned as model/crosscheck pools them (its
own group's predictions and the other groups' at one fraction, z of its own few tasks) and scored by the boxes a
reviewer would touch per ground-truth box on the held-out images. Passes are fixed, not timed, so the same passes can
be run on a faster machine than the one they stand for (the product's folds run --epochs passes in
REFINE_TIME_BUDGET on 2 cores). With --grow, each served version is instead trained on --grow more labeled images
than its folds: whether a finished cross-check's folds still lend the next version better thresholds than its own
few held-out tasks, and whether fusing its boxes with those folds' models leaves fewer to touch.
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
from model.policy import FUSE_IOU, serve_z  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import class_names, read_dataset  # noqa: E402


def fold_models(train, extra, held, names: list[str], groups: list[list[int]], fractions: list[float], args,
                work: Path):
    """(group, fraction) -> that fold's predictions of its group; and per group, as the served version, its
    predictions of its group and of the held-out images: the group's full-length fold, and (with `extra` images) a
    model trained on those too."""
    network = trainer.checkpoint_model(TRAIN_BASE)
    test_yaml = held_out_dataset(held, names, work / "test")

    def trained(items, run: Path, passes: int) -> Path:
        plan = trainer.TrainPlan(max(1, passes), args.imgsz, trainer.backbone_layers(network), 4, 0)
        return trainer.train(held_out_dataset(items, names, run / "train"), TRAIN_BASE, run / "run", plan,
                             seed=args.seed)[0]

    def predicted(weights: Path, group: list[int], run: Path):
        return thresholds.held_out_predictions(
            weights, held_out_dataset([train[i] for i in group], names, run / "group"), args.imgsz)

    own, served, grown = {}, {}, {}
    for fraction in fractions:
        for g, group in enumerate(groups):
            run = work / f"g{g}-{fraction}"
            weights = trained([item for i, item in enumerate(train) if i not in group], run,
                              round(args.epochs * fraction))
            own[g, fraction] = predicted(weights, group, run)
            if fraction == fractions[0]:
                served[g] = own[g, fraction], thresholds.held_out_predictions(weights, test_yaml, args.imgsz)
    for g, group in enumerate(groups[:args.rotations or None] if extra else []):
        run = work / f"g{g}-grown"
        weights = trained([item for i, item in enumerate(train) if i not in group] + extra, run, args.epochs)
        grown[g] = predicted(weights, group, run), thresholds.held_out_predictions(weights, test_yaml, args.imgsz)
    return own, served, grown


def pooled_thresholds(g: int, group: list, own: dict, fraction: float, names: list[str], z: float):
    """Thresholds of the version that held out group g, learned on its group and the other groups' folds at this
    fraction, as model/crosscheck pools them."""
    lent = [image for h in {h for h, _ in own} if h != g for image in own[h, fraction]]
    return thresholds.learn(group + lent, names, 0.25, z=z)[0]


def scored(versions: dict, own: dict, fraction: float, names: list[str], z: float) -> tuple[float, float]:
    """Touched per box of each served version with thresholds of its own group alone, and pooled with the other
    groups' folds at this fraction, means over the versions."""
    alone, pooled = [], []
    for g, (group, test) in versions.items():
        alone.append(touched(test, thresholds.learn(group, names, 0.25)[0]))
        pooled.append(touched(test, pooled_thresholds(g, group, own, fraction, names, z)))
    return round(statistics.mean(alone), 3), round(statistics.mean(pooled), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--imgsz", type=int, default=416, help="the served version's size, which its folds keep")
    parser.add_argument("--epochs", type=int, default=100, help="passes of a full-length fold")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                        help="fold lengths to compare; the first also trains the served versions")
    parser.add_argument("--grow", type=int, default=0,
                        help="the served version has this many more labeled images than its folds saw (the next "
                             "version after a cross-check, lent that cross-check's folds)")
    parser.add_argument("--rotations", type=int, default=0,
                        help="with --grow, train this many served versions (the first groups'), to save time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="crosscheck_budget", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    prepare_ultralytics(Path(tempfile.gettempdir()) / "crosscheck-budget-ultralytics", allow_downloads=False)
    results = []
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        train = [i for i in items if i.split == "train"][:args.k + args.grow]
        train, extra = train[:args.k], train[args.k:]
        held = [i for i in items if i.split != "train"][:args.holdout]
        groups = folds(list(range(len(train))), 0)
        with tempfile.TemporaryDirectory(prefix="crosscheck-budget-") as tmp:
            own, served, grown = fold_models(train, extra, held, names, groups, args.fractions, args, Path(tmp))
        z = serve_z(len(groups[0]))
        scores = {fraction: scored(served, own, fraction, names, z) for fraction in args.fractions}
        row = {"dataset": dataset.name, "groups": len(groups), "own_tasks_only": scores[args.fractions[0]][0],
               "oracle": round(statistics.mean(oracle(test) for _, test in served.values()), 3),
               **{f"pooled x{fraction:g}": pooled for fraction, (_, pooled) in scores.items()}}
        if grown:
            row[f"+{args.grow} own tasks only"], row[f"+{args.grow} lent folds"] = scored(
                grown, own, args.fractions[0], names, z)
            row[f"+{args.grow} oracle"] = round(statistics.mean(oracle(test) for _, test in grown.values()), 3)
            # The grown version's boxes fused with the lent folds' models' (the other groups' full-length folds).
            fused = {g: fuse([test] + [served[h][1] for h in served if h != g], names, FUSE_IOU)
                     for g, (_, test) in grown.items()}
            row[f"+{args.grow} lent, fused"] = round(statistics.mean(
                touched(fused[g], pooled_thresholds(g, group, own, args.fractions[0], names, z))
                for g, (group, _) in grown.items()), 3)
            row[f"+{args.grow} fused oracle"] = round(statistics.mean(oracle(f) for f in fused.values()), 3)
        results.append(row)
        print_rows(results)
    print("wrote", write_run(args.name, args, results))


if __name__ == "__main__":
    main()
