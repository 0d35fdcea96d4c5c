"""Few-shot quality of polygons and choices: our recipe against a plain Ultralytics fine-tune of the same kind.

    nice -n 19 python bench/fewshot_kinds.py [--ks 10 25] [--holdout 40] [--budget 45] [--refine-budget 240 --refine-rounds 2]
        [--freeze -1] [--kinds classify segment] [--skip-plain]

Polygons: pothole-seg (human outlines), scored by mask mAP50 / mAP50-95 on held-out (valid/test) images.
Choices: a three-class blood-cell classification set cut from the boxes of bccd (each crop one class, as drawn),
scored by top-1 accuracy on crops of held-out images.

'ours' is what the backend does for a user with k annotated tasks: model.kind_training.run_kind_training with the
default quick-update budget, then refinement rounds judged by the not-worse gate, starting from the offline
YOLOv5n COCO backbone with the kind's head. 'plain' is YOLO(<same seeded model>).train(epochs=30, batch=8) at
Ultralytics' default size of the kind (640 for segmentation, 224 for classification), on the same k images.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import SHARED, print_table, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.heads import seeded_model  # noqa: E402
from model.kind_training import evaluate_kind, run_kind_training  # noqa: E402
from model.kinds import parse_controls  # noqa: E402
from model.project_store import ProjectStore  # noqa: E402
from model.registry import ProjectRegistry  # noqa: E402
from model.trainer import TrainParams  # noqa: E402
from tests.kind_annotations import choice_result, crops, polygon_result, read_seg  # noqa: E402

BACKBONE = SHARED / "weights" / "yolov5nu-coco-backbone.pt"
SEG_CONFIG = ('<View><Image name="image" value="$image"/><PolygonLabels name="outline" toName="image">'
              '<Label value="pothole"/></PolygonLabels></View>')
CELLS = ["RBC", "WBC", "Platelets"]
CLS_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="cell" toName="image">'
              + "".join(f'<Choice value="{n}"/>' for n in CELLS) + "</Choices></View>")


def seg_sets(holdout: int, work: Path):
    items = read_seg(SHARED / "datasets" / "pothole-seg")
    train = [i for i in items if i.split == "train"]
    held = [i for i in items if i.split != "train"][:holdout]
    out = work / "seg-held"
    for sub in ("images/val", "labels/val"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for item in held:
        (out / "images" / "val" / item.image.name).symlink_to(item.image)
        rows = [f"{c} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in pts) for c, pts in item.outlines]
        (out / "labels" / "val" / f"{item.image.stem}.txt").write_text("\n".join(rows) + "\n")
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(out), "train": "images/val", "val": "images/val",
                                    "names": {0: "pothole"}}))
    samples = [(item.image, polygon_result(item, ["pothole"])) for item in train]
    return samples, data


def cls_sets(holdout: int, work: Path):
    """Training crops from bccd's train split (one image's crops stay together), held-out crops from valid/test."""
    from model.yolo_import import read_dataset

    root = SHARED / "datasets" / "bccd"
    samples = [(path, choice_result([name], "cell")) for path, name in crops(root, CELLS, 40, work / "cls-train")]
    held_root = work / "cls-held"
    counts = {n: 0 for n in CELLS}
    from PIL import Image

    for item in read_dataset(root):
        if item.split == "train":
            continue
        for k, (cls, x1, y1, x2, y2) in enumerate(item.rows):
            name = CELLS[cls]
            if counts[name] >= holdout // 3 or (x2 - x1) * item.width < 12:
                continue
            folder = held_root / "val" / name
            folder.mkdir(parents=True, exist_ok=True)
            with Image.open(item.image) as im:
                im.convert("RGB").crop((x1 * item.width, y1 * item.height, x2 * item.width,
                                        y2 * item.height)).save(folder / f"{item.image.stem}-{k}.jpg")
            counts[name] += 1
    for name in CELLS:
        (held_root / "train" / name).mkdir(parents=True, exist_ok=True)
        for path in list((held_root / "val" / name).glob("*.jpg"))[:1]:
            shutil.copy(path, held_root / "train" / name / path.name)  # Ultralytics wants a train folder to exist
    # Interleave classes so the first k crops hold every class, as an annotator sampling a project would.
    by_class = {n: [s for s in samples if s[1][0]["value"]["choices"] == [n]] for n in CELLS}
    mixed = [s for group in zip(*by_class.values()) for s in group]
    return mixed, held_root


def ours(samples, config: str, task: str, k: int, work: Path, budget: float, refine_budget: float,
         rounds: int, freeze: int = -1) -> tuple[Path, dict]:
    control = parse_controls(config)[0]
    store, registry = ProjectStore(work / "models", 1), ProjectRegistry(work / "models" / "1" / "controls", control.name)
    for task_id, (image, result) in enumerate(samples[:k], start=1):
        store.put({"task_id": task_id, "annotation_id": task_id, "data": {"image": str(image)}, "result": result,
                   "cancelled": False})
    started = time.perf_counter()
    fetch = lambda record: Path(record["data"]["image"])  # noqa: E731
    outcome = run_kind_training(store, registry, control, task, fetch, BACKBONE,
                                TrainParams(time_budget=budget, freeze=freeze), min(10, k), True, 5)
    history = [(outcome.version.name, outcome.accepted, outcome.reason)]
    for round_ in range(1, rounds + 1):
        outcome = run_kind_training(store, registry, control, task, fetch, BACKBONE,
                                    TrainParams(time_budget=refine_budget, freeze=freeze), min(10, k), True, 5,
                                    refined=True, refine_round=round_)
        history.append((outcome.version.name, outcome.accepted, outcome.reason))
        if not outcome.accepted or (outcome.gain or 0.0) < 0.005:
            break
    served = registry.current()
    return served.weights, {"version": served.name, "plan": served.meta["plan"], "history": history,
                            "seconds": round(time.perf_counter() - started, 1)}


def plain(samples, config: str, task: str, k: int, work: Path) -> tuple[Path, dict, int]:
    """Ultralytics defaults on the same k images, from the same seeded model."""
    from model.kind_dataset import build_kind_dataset

    control = parse_controls(config)[0]
    records = [{"task_id": i, "data": {"image": str(image)}, "result": result}
               for i, (image, result) in enumerate(samples[:k], start=1)]
    info = build_kind_dataset(records, control, task, lambda r: Path(r["data"]["image"]), work / "plain-data")
    imgsz = 224 if task == "classify" else 640
    model = seeded_model(BACKBONE, task, len(info.names), work / "plain-seed")
    started = time.perf_counter()
    model.train(data=str(info.yaml_path), epochs=30, imgsz=imgsz, batch=8, workers=0, val=False, plots=False,
                project=str(work / "plain"), name="run", exist_ok=True, verbose=False)
    return work / "plain" / "run" / "weights" / "last.pt", {"seconds": round(time.perf_counter() - started, 1)}, imgsz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 25])
    parser.add_argument("--kinds", nargs="+", default=["classify", "segment"])
    parser.add_argument("--holdout", type=int, default=40)
    parser.add_argument("--budget", type=float, default=45.0, help="quick update seconds (TRAIN_TIME_BUDGET)")
    parser.add_argument("--refine-budget", type=float, default=240.0, help="REFINE_TIME_BUDGET")
    parser.add_argument("--refine-rounds", type=int, default=2, help="REFINE_ROUNDS")
    parser.add_argument("--freeze", type=int, default=-1, help="TRAIN_FREEZE (-1: the base's backbone)")
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="fewshot-kinds-") as tmp:
        root = Path(tmp)
        sets = {}
        for kind in args.kinds:
            if kind == "segment":
                sets[kind] = (*seg_sets(args.holdout, root), SEG_CONFIG, "pothole-seg polygons", "mask mAP50-95")
            elif kind == "classify":
                sets[kind] = (*cls_sets(args.holdout, root), CLS_CONFIG, "bccd cell crops choices", "top-1")
        for task, (samples, held, config, name, metric) in sets.items():
            for k in args.ks:
                work = root / f"{task}-{k}"
                weights, detail = ours(samples, config, task, k, work / "ours", args.budget, args.refine_budget,
                                       args.refine_rounds, args.freeze)
                score = evaluate_kind(weights, held, task, detail["plan"]["imgsz"], work / "ours-val")
                row = {"dataset": name, "k": k, "metric": metric, "ours": score.map50_95 if task != "classify"
                       else score.fitness, "ours_map50": score.map50, **{f"ours_{k_}": v for k_, v in detail.items()}}
                if not args.skip_plain:
                    pweights, pdetail, imgsz = plain(samples, config, task, k, work / "plain")
                    pscore = evaluate_kind(pweights, held, task, imgsz, work / "plain-val")
                    row.update(plain=pscore.map50_95 if task != "classify" else pscore.fitness,
                               plain_map50=pscore.map50, plain_seconds=pdetail["seconds"])
                results.append(row)
                rows.append([name, k, metric, row["ours"], row.get("plain", "-"), row["ours_map50"],
                             row.get("plain_map50", "-"), row["ours_seconds"], row.get("plain_seconds", "-")])
                print_table(["dataset", "k", "metric", "ours", "plain", "ours mAP50/top1", "plain mAP50/top1",
                             "ours s", "plain s"], rows)
    path = write_results("fewshot_kinds", {"args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
