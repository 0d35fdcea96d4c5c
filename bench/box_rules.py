"""Box post-processing that might leave a reviewer fewer boxes to move, judged as bench/serve_rules.py judges rules.

    python bench/serve_rules.py --ks 10 --rules product --variants default raw:iou=0.95 --datasets ...
    python bench/box_rules.py [--hs 2 10]

Reads the held-out predictions serve_rules.py kept (the `default` variant, NMS at the product's overlap, and `raw`,
NMS at 0.95: nearly every candidate box) and compares, with the product's threshold rule on h held-out images and
touched per ground-truth box on the others (the same draws for every row):
- `nms`: the product (the `default` predictions);
- `merge`: merge-NMS, each kept box replaced by the score-weighted mean of the candidates it suppressed;
- `corrected`: the product's boxes shifted and scaled per label by the median offset and log size ratio of
  predicted to human boxes (matched at IoU 0.5) on the draw's h held-out images, where a label has 10 matches.
Beside them, over all held-out images: the median log ratio of human to predicted box sides of matched boxes (a
systematic size error) and its standard deviation (scatter).
Results: bench/results/box_rules.json.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

from common import RESULTS, print_table, write_results
from serve_rules import learn, touched

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import thresholds  # noqa: E402
from model.effort import MATCH_IOU, iou  # noqa: E402
from model.label_config import Box  # noqa: E402
from model.policy import NMS_IOU, THRESHOLDS, Thresholds  # noqa: E402

MIN_MATCHES = 10


def merge_nms(boxes: list[Box]) -> list[Box]:
    """Greedy NMS per label at NMS_IOU, each kept box the score-weighted mean of its cluster."""
    kept = []
    for label in {b.label for b in boxes}:
        left = sorted((b for b in boxes if b.label == label), key=lambda b: -(b.score or 0.0))
        while left:
            top = left[0]
            cluster = [b for b in left if b is top or iou(top, b) > NMS_IOU]
            left = [b for b in left if all(b is not c for c in cluster)]
            weight = sum(b.score for b in cluster)
            kept.append(Box(label, *(sum(b.score * getattr(b, side) for b in cluster) / weight
                                     for side in ("x1", "y1", "x2", "y2")), top.score))
    return kept


def matched(images) -> dict[str, list[tuple[float, ...]]]:
    """Per label, for each candidate box matched to a human one: centre offset (in box sizes), log size ratio."""
    found: dict[str, list[tuple[float, ...]]] = {}
    for image in images:
        pairs = sorted(((iou(p, t), p, t) for p in image.predicted for t in image.truth
                        if p.label == t.label), key=lambda pair: -pair[0])
        used: set[int] = set()
        for overlap, p, t in pairs:
            if overlap < MATCH_IOU:
                break
            if id(p) in used or id(t) in used:
                continue
            used.update((id(p), id(t)))
            pw, ph = p.x2 - p.x1, p.y2 - p.y1
            found.setdefault(p.label, []).append((((t.x1 + t.x2) - (p.x1 + p.x2)) / 2 / pw,
                                                  ((t.y1 + t.y2) - (p.y1 + p.y2)) / 2 / ph,
                                                  math.log((t.x2 - t.x1) / pw), math.log((t.y2 - t.y1) / ph)))
    return found


def corrections(images) -> dict[str, tuple[float, ...]]:
    """Per label with MIN_MATCHES matches: the median offset and log size ratio from predicted to human boxes."""
    return {label: tuple(statistics.median(v) for v in zip(*rows))
            for label, rows in matched(images).items() if len(rows) >= MIN_MATCHES}


def size_error(images) -> tuple[float, float]:
    """All labels' matched boxes: median log size ratio (bias) and its spread (scatter)."""
    logs = [value for rows in matched(images).values() for row in rows for value in row[2:]]
    return (round(statistics.median(logs), 3), round(statistics.pstdev(logs), 3)) if logs else (0.0, 0.0)


def corrected(box: Box, by_label: dict[str, tuple[float, ...]]) -> Box:
    if box.label not in by_label:
        return box
    dx, dy, lw, lh = by_label[box.label]
    w, h = box.x2 - box.x1, box.y2 - box.y1
    cx, cy = (box.x1 + box.x2) / 2 + dx * w, (box.y1 + box.y2) / 2 + dy * h
    w, h = w * math.exp(lw), h * math.exp(lh)
    return Box(box.label, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, box.score)


def simulate(variants: dict, h: int, draws: int, labels: list[str]) -> dict[str, float]:
    """Mean touched per GT box of each variant over the same draws of h held-out images."""
    n = len(variants["nms"])
    rng = random.Random(0)
    scores: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(draws):
        picked = set(rng.sample(range(n), h))
        for name, images in variants.items():
            if callable(images):
                images = images([variants["nms"][i] for i in picked])
            held = [images[i] for i in picked]
            rest = [image for i, image in enumerate(images) if i not in picked]
            scores[name].append(touched(rest, learn(held, "product", labels)))
    return {name: round(statistics.mean(values), 3) for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, default=RESULTS / "serve-rules-predictions")
    parser.add_argument("--hs", nargs="+", type=int, default=[2, 10])
    parser.add_argument("--draws", type=int, default=100)
    args = parser.parse_args()
    rows, results = [], []
    for raw_file in sorted(args.predictions.glob("*-raw.json")):
        nms = thresholds.load_held_out(raw_file.with_name(raw_file.name.replace("-raw", "-default")))
        raw = thresholds.load_held_out(raw_file)
        labels = sorted({box.label for image in nms for box in image.truth + image.predicted})

        def correct(held):
            by_label = corrections(held)
            return [thresholds.HeldOutImage([corrected(b, by_label) for b in i.predicted], i.truth) for i in nms]
        variants = {"nms": nms, "merge": [thresholds.HeldOutImage(merge_nms(i.predicted), i.truth) for i in raw],
                    "corrected": correct}
        oracle = round(min(touched(nms, Thresholds(t, {})) for t in THRESHOLDS), 3)
        bias, scatter = size_error(nms)
        name = raw_file.name.removesuffix("-raw.json")
        for h in args.hs:
            found = simulate(variants, h, args.draws, labels)
            results.append({"predictions": name, "h": h, **found, "oracle_nms": oracle, "log_size_bias": bias,
                            "log_size_scatter": scatter})
            rows.append([name, h, found["nms"], found["merge"], found["corrected"], oracle, bias, scatter])
    print_table(["predictions", "h", "nms (product)", "merge-NMS", "corrected", "oracle (nms)", "log size bias",
                 "scatter"], rows)
    print("wrote", write_results("box_rules", {"args": {**vars(args), "predictions": str(args.predictions)},
                                              "results": results}))


if __name__ == "__main__":
    main()
