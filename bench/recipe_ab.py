"""One training lever at a time: the product's trainer on the same k images and wall-clock budget, per variant.

    python bench/recipe_ab.py --k 10 --budget 200 --datasets ../shared/datasets/bccd /work/datasets-extra/aquarium \
        --variants v5n:base=../shared/weights/yolov5nu-coco-backbone.pt v8s:base=../shared/weights/person-fall-yolov8s.pt

A variant is `name:key=value,...` with keys `base` (weights; the benchmarks' training base if left out), `freeze`
(TRAIN_FREEZE), `imgsz`, `epochs` (passes wanted; the budget still stops a run), `budget` (seconds, instead of
--budget), `batch`, `seed`, `lr_scale` (a multiple of the product's learning rate); any other key is
an Ultralytics train argument (`scale=0.25`, `mixup=0.1`, `cos_lr=true`) laid over the product's. Each run plans its
size and passes as the backend would (model/trainer.plan: objects, budget, model cost), trains with
model/trainer.train and is scored on the held-out (valid/test) images with Ultralytics' mAP code, and by the boxes
a reviewer would touch per ground-truth box at the one threshold best on those images (bench/serve_rules.oracle).
Quicker than bench/fewshot.py (no server, no thresholds, no refinement), so a lever can be judged on several datasets
first.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import yaml

from common import TRAIN_BASE, held_out_dataset, parse_variant, print_table, train_as_planned, write_run
from serve_rules import oracle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import thresholds, trainer  # noqa: E402
from model.validator import evaluate  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import class_names, read_dataset  # noqa: E402


PLAN_KEYS = ("base", "freeze", "imgsz", "epochs", "budget", "batch", "seed", "lr_scale")


@contextlib.contextmanager
def overridden(options: dict[str, str]):
    """The product's train arguments with a variant's Ultralytics arguments laid over them, for one run."""
    extra = {key: yaml.safe_load(value) for key, value in options.items() if key not in PLAN_KEYS}
    lr_scale = float(options.get("lr_scale", 1))
    product = trainer.run_arguments

    def arguments(*args, **kwargs) -> dict:
        planned = product(*args, **kwargs)
        return {**planned, "lr0": planned["lr0"] * lr_scale, **extra}
    trainer.run_arguments = arguments
    try:
        yield
    finally:
        trainer.run_arguments = product


def run(train, held_yaml: Path, names: list[str], options: dict[str, str], budget: float, work: Path) -> dict:
    base = Path(options.get("base", TRAIN_BASE)).resolve()
    params = trainer.TrainParams(time_budget=float(options.get("budget", budget)),
                                 freeze=int(options.get("freeze", -1)), imgsz=int(options.get("imgsz", 0)),
                                 epochs=int(options.get("epochs", 0)), batch=int(options.get("batch", 4)),
                                 seed=int(options.get("seed", 0)))
    passes = [0]
    with overridden(options):
        weights, seconds, run_plan = train_as_planned(train, names, base, params, work,
                                                      lambda epoch, epochs: passes.__setitem__(0, epoch))
    scores = evaluate(weights, held_yaml, run_plan.imgsz, work)
    touched = oracle(thresholds.held_out_predictions(weights, held_yaml, run_plan.imgsz))
    return {"map50": round(scores.map50, 3), "map50_95": round(scores.map50_95, 3), "touched": round(touched, 3),
            "imgsz": run_plan.imgsz,
            "epochs_planned": run_plan.epochs, "passes": passes[0], "freeze": run_plan.freeze, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--budget", type=float, default=200.0, help="training seconds per run")
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--name", default="recipe_ab", help="results file, bench/results/NAME.json")
    args = parser.parse_args()
    prepare_ultralytics(Path(tempfile.gettempdir()) / "recipe-ab-ultralytics", allow_downloads=False)
    variants = [parse_variant(v) for v in args.variants]
    rows, results = [], []
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        train = [i for i in items if i.split == "train"][:args.k]
        held = [i for i in items if i.split != "train"][:args.holdout]
        with tempfile.TemporaryDirectory(prefix="recipe-ab-") as tmp:
            held_yaml = held_out_dataset(held, names, Path(tmp) / "held")
            for name, options in variants:
                result = run(train, held_yaml, names, options, args.budget, Path(tmp) / name)
                results.append({"dataset": dataset.name, "variant": name, "options": options, **result})
                rows.append([dataset.name, name, result["map50"], result["map50_95"], result["touched"],
                             result["imgsz"], result["freeze"], result["passes"], result["seconds"]])
                print_table(["dataset", "variant", "mAP50", "mAP50-95", "touched (oracle)", "imgsz", "freeze", "passes",
                             "s"], rows)
    print("wrote", write_run(args.name, args, results))


if __name__ == "__main__":
    main()
