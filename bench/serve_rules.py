"""Which boxes to serve: rules for learning thresholds on a few held-out tasks, judged on many more images.

    python bench/serve_rules.py --datasets ../shared/datasets/bccd /work/datasets-extra/aquarium --ks 10 50

For each dataset and k, a model is trained on the first k training images with the product's trainer (size and
passes planned as the backend plans them, --budget seconds), and predicts the held-out (valid/test) images once.
Then, --draws times, h of those images play the project's held-out tasks (h = what the backend holds out of k,
model/dataset.VAL_PERMILLE), each rule learns its thresholds there, and the boxes it would serve are scored on the
other images: boxes a human must touch per ground-truth box (1.0 = nothing served), and how often a draw's
served boxes cost more than drawing (touched > 1.0). 'oracle' is the best single threshold chosen on all images.

Prediction settings (--variants `name:key=value,...`, keys `iou` (NMS overlap), `agnostic_nms`, `augment`
(Ultralytics' test-time augmentation) and `scale` (predict at this multiple of the training size)): the same
model predicts the held-out images once per variant, each timed and simulated with every rule.

Predictions are kept in --predictions (one JSON file per dataset, k, seed and variant): a later run with other
--rules reads them instead of training again (--retrain trains anyway). --seeds trains one model per seed, each
simulated with the same draws, so a rule is judged on more than one model of a set.

Rules: `product` is model/thresholds.learn; `count` needs a confident saving (SERVE_Z spreads, a saving's spread
from the box count) for every label at every h: the product's rule on fewer than THIN_LABELS_FOLLOW_FROM_IMAGES
held-out images until it demanded SERVE_Z_FEW_IMAGES spreads there of the shared threshold and of all it serves;
`image` also takes the spread between images into account before serving (the larger of the two); `thin` serves a label
with few held-out boxes at the shared threshold unless it was seen to cost there (kept < false; the product's
rule from THIN_LABELS_FOLLOW_FROM_IMAGES held-out images on); `seen` is the product's rule, but a label with no
human box on the held-out tasks is withheld instead of following the shared threshold.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, TRAIN_BASE, held_out_dataset, parse_variant, print_table, train_as_planned, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import thresholds, trainer  # noqa: E402
from model.dataset import VAL_PERMILLE  # noqa: E402
from model.policy import MIN_BOXES_PER_CLASS, NEVER, SERVE_Z, THRESHOLDS, Thresholds  # noqa: E402
from model.yolo_env import prepare_ultralytics  # noqa: E402
from model.yolo_import import class_names, read_dataset  # noqa: E402

RULES = ("product", "count", "image", "thin", "seen")


def predict_options(options: dict[str, str], train_imgsz: int) -> tuple[int, dict]:
    """The size and Ultralytics predict arguments of a variant."""
    imgsz = max(32, round(train_imgsz * float(options.get("scale", 1)) / 32) * 32)
    kwargs = {key: float(value) if key == "iou" else value.lower() in ("1", "true", "yes")
              for key, value in options.items() if key != "scale"}
    return imgsz, kwargs


def gain_and_spread(images, served: Thresholds, label: str | None, by_image: bool) -> tuple[int, float]:
    per_image = [thresholds.effort_at([image], served, label) for image in images]
    gains = [e.kept - e.deleted for e in per_image]
    spread = math.sqrt(sum(e.kept + e.deleted for e in per_image))
    if by_image and len(gains) > 1:
        spread = max(spread, math.sqrt(len(gains) * statistics.variance(gains)))
    return sum(gains), spread


def learn(images, rule: str, labels: list[str], default: float = 0.25) -> Thresholds:
    """The thresholds a rule learns; 'product' is model/thresholds.learn itself."""
    if rule in ("product", "seen"):
        served = thresholds.learn(images, labels, default)[0]
        seen = {box.label for image in images for box in image.truth}
        unseen = {label: NEVER for label in labels if label not in seen} if rule == "seen" else {}
        return Thresholds(served.default, {**served.per_label, **unseen})

    def bound(t: float, label: str | None = None, by_image: bool = False) -> float:
        gain, spread = gain_and_spread(images, Thresholds(t, {}), label, by_image)
        return gain - SERVE_Z * spread

    def pick(options, label: str | None = None) -> float:
        chosen = max(options, key=lambda t: (bound(t, label), -abs(t - default)))
        return chosen if bound(chosen, label) > 0 and bound(chosen, label, rule == "image") > 0 else NEVER

    best = pick(THRESHOLDS)
    counts: dict[str, int] = {}
    for image in images:
        for box in image.predicted:
            counts.setdefault(box.label, 0)
        for box in image.truth:
            counts[box.label] = counts.get(box.label, 0) + 1
    per_label = {}
    for label, count in counts.items():
        own = count >= MIN_BOXES_PER_CLASS or best == NEVER
        if rule == "thin" and not own:
            effort = thresholds.effort_at(images, Thresholds(best, {}), label)
            chosen = NEVER if effort.kept < effort.deleted else best
        else:
            chosen = pick(THRESHOLDS if own else (best,), label)
        if chosen != best:
            per_label[label] = chosen
    return Thresholds(best, per_label)


def touched(images, served: Thresholds) -> float:
    effort = thresholds.effort_at(images, served)
    return effort.touched / max(1, effort.final)


def oracle(images) -> float:
    """Touched per box at the one threshold best on these very images: what no rule learned elsewhere beats."""
    return min(touched(images, Thresholds(t, {})) for t in THRESHOLDS)


def simulate(images, h: int, draws: int, rules: list[str], labels: list[str]) -> dict:
    rng = random.Random(0)
    samples = [rng.sample(range(len(images)), h) for _ in range(draws)]
    result = {}
    for rule in rules:
        scores = []
        for picked in samples:
            rest = [image for i, image in enumerate(images) if i not in picked]
            scores.append(touched(rest, learn([images[i] for i in picked], rule, labels)))
        result[rule] = {"mean": round(statistics.mean(scores), 3), "worse": round(sum(s > 1.0 for s in scores) / draws, 3)}
    result["oracle"] = round(oracle(images), 3)
    return result


def predictions(dataset: Path, names: list[str], train, held, seed: int, variants, args) -> list[tuple]:
    """(variant, options, imgsz, ms per image, images) per variant: from --predictions, else a model trained now."""
    stem = f"{dataset.name}-k{len(train)}-s{seed}"
    files = {variant: args.predictions / f"{stem}-{variant}.json" for variant, _ in variants}
    same = {"budget": args.budget, "holdout": args.holdout}
    metas = {v: f.with_suffix(".meta") for v, f in files.items()}
    kept = {v: json.loads(m.read_text()) for v, m in metas.items() if m.is_file()}
    if not args.retrain and len(kept) == len(files) and all(meta["trained"] == same for meta in kept.values()):
        return [(v, options, kept[v]["imgsz"], kept[v]["ms_per_image"], thresholds.load_held_out(files[v]))
                for v, options in variants]
    found = []
    with tempfile.TemporaryDirectory(prefix="serve-rules-") as tmp:
        work = Path(tmp)
        held_yaml = held_out_dataset(held, names, work / "held")
        weights, _, run_plan = train_as_planned(train, names, TRAIN_BASE,
                                                trainer.TrainParams(time_budget=args.budget, seed=seed), work)
        for variant, options in variants:
            imgsz, kwargs = predict_options(options, run_plan.imgsz)
            started = time.monotonic()
            images = thresholds.held_out_predictions(weights, held_yaml, imgsz, options=kwargs)
            ms = round(1000 * (time.monotonic() - started) / max(1, len(images)), 1)
            thresholds.save_held_out(images, files[variant])
            metas[variant].write_text(json.dumps({"imgsz": imgsz, "ms_per_image": ms, "trained": same}))
            found.append((variant, options, imgsz, ms, images))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path, required=True)
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per model")
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--variants", nargs="+", default=["default"], help="prediction settings, see above")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one model per seed")
    parser.add_argument("--predictions", type=Path, default=RESULTS / "serve-rules-predictions")
    parser.add_argument("--retrain", action="store_true", help="train even where predictions are kept")
    parser.add_argument("--hs", nargs="+", type=int, default=[],
                        help="held-out task counts to simulate instead of the backend's (what more evidence buys)")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    prepare_ultralytics(Path(tempfile.gettempdir()) / "serve-rules-ultralytics", allow_downloads=False)
    rows, results = [], []
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        held = [i for i in items if i.split != "train"][:args.holdout]
        for k in args.ks:
            train = [i for i in items if i.split == "train"][:k]
            hs = args.hs or [max(1, round(len(train) * VAL_PERMILLE / 1000))]
            for seed in args.seeds:
                found = predictions(dataset, names, train, held, seed, variants, args)
                for (variant, options, imgsz, ms, images), h in ((f, h) for f in found for h in hs):
                    result = {"dataset": dataset.name, "k": len(train), "h": h, "seed": seed, "pool": len(images),
                              "variant": variant, "options": options, "imgsz": imgsz, "ms_per_image": ms,
                              **simulate(images, h, args.draws, args.rules, names)}
                    results.append(result)
                    rows.append([dataset.name, len(train), h, seed, variant, imgsz, round(ms),
                                 *(f"{result[r]['mean']:.3f} ({result[r]['worse']:.0%})" for r in args.rules),
                                 result["oracle"]])
                    print_table(["dataset", "k", "held-out h", "seed", "variant", "imgsz", "ms/image",
                                 *(f"{r}: touched (worse draws)" for r in args.rules), "oracle"], rows)
    print("wrote", write_results("serve_rules", {"args": {**vars(args), "datasets": [str(d) for d in args.datasets],
                                                          "predictions": str(args.predictions)},
                                                 "results": results}))


if __name__ == "__main__":
    main()
