"""The few-shot curve: quality after k labeled images fed through the real webhook path, against a plain fine-tune.

    python bench/fewshot.py [--datasets ../shared/datasets/bccd ../shared/datasets/pothole-seg] [--ks 10 25 50]
    python bench/fewshot.py --replot run1.json run2.json   # one table and plot from runs made in pieces
    python bench/fewshot.py --ks 10 --repeats 3            # each k three times: a mean and a range, not one draw

For each YOLO-format dataset: the plain baseline (YOLO(base).train(epochs=30, imgsz=640, batch=8) on the first
ten training images, from the same base as ours: TRAIN_BASE_MODEL), the untrained base model, and for each k a
fresh backend that receives k ANNOTATION_CREATED webhooks and trains as it would for a user (quick update, then
refinement). Scored on held-out (valid/test) images: mAP50 and mAP50-95 with Ultralytics' metric code, and boxes a
human must touch per ground-truth box (missed, wrong label, IoU < 0.75, plus false boxes) from the predictions
/predict returns. One run's figures vary by up to 0.07 mAP50 between identical runs at k=10, so a lever is judged
on --repeats runs: the table then adds each k's mean and range. Each run also scores every version it left on disk
(its `trail`: quick update, idle rounds, cross-check), so what each step added is seen within one run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

from common import (SHARED, TRAIN_BASE, LabelStudioStandIn, annotation_event, backend_env, held_out_dataset,
                    print_table, start_server, write_results, RESULTS)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.effort import Effort, compare  # noqa: E402
from model.label_config import Box, parse_label_config  # noqa: E402
from model.yolo_import import class_names, label_config, read_dataset, to_result  # noqa: E402

UNLABELED = 100  # unlabeled tasks a benchmark project holds besides its k labeled ones
TOUCHED_TARGETS = {10: 0.5, 50: 0.2}  # the boxes per ground-truth box issue 9 asks a reviewer to touch, by k


def plain_baseline(train, names, held_yaml: Path, work: Path, base: Path) -> dict:
    """What a user gets from Ultralytics' defaults on the same ten images, from the same base as ours."""
    from ultralytics import YOLO

    from model.validator import evaluate

    import yaml

    data = held_out_dataset(train, names, work / "baseline-data")
    spec = yaml.safe_load(data.read_text())
    spec["val"] = str(held_yaml.parent / "images" / "val")  # Ultralytics validates on the held-out images
    data.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    # val=False: Ultralytics would otherwise pick best.pt by its score on the held-out images themselves.
    YOLO(str(base)).train(data=str(data), epochs=30, imgsz=640, batch=8, workers=0, val=False,
                              project=str(work / "baseline"), name="run", exist_ok=True, verbose=False)
    seconds = time.perf_counter() - started
    weights = work / "baseline" / "run" / "weights" / "last.pt"
    scores = evaluate(weights, held_yaml, 640, work)
    return {"map50": scores.map50, "map50_95": scores.map50_95, "train_seconds": round(seconds, 1),
            "touched_per_gt_box": plain_touched(weights, held_yaml, 640)}


def plain_touched(weights: Path, held_yaml: Path, imgsz: int) -> float:
    """Boxes to touch per ground-truth box when the plain model's boxes are served at Ultralytics' default 0.25."""
    from model.policy import Thresholds
    from model.thresholds import effort_at, held_out_predictions

    effort = effort_at(held_out_predictions(weights, held_yaml, imgsz), Thresholds(0.25, {}))
    return effort.touched / max(1, effort.final)


def touched_per_box(url: str, ls: LabelStudioStandIn, held, names, config: str) -> dict:
    """Predict the held-out images through the server and compare each with its ground truth."""
    control = parse_label_config(config)
    total = Effort()
    for start in range(0, len(held), 16):
        chunk = held[start:start + 16]
        tasks = [{"id": 100_000 + start + i, "data": {"image": ls.upload(1, item.image)}} for i, item in enumerate(chunk)]
        body = {"project": "1.1", "label_config": config, "tasks": tasks}
        results = requests.post(f"{url}/predict", json=body, timeout=600).json()["results"]
        for item, result in zip(chunk, results):
            predicted, _ = control.from_result(result["result"])
            truth = [Box(names[c], x1 * item.width, y1 * item.height, x2 * item.width, y2 * item.height)
                     for c, x1, y1, x2, y2 in item.rows]
            total = total + compare(predicted, truth)
    return total.as_dict()


def wait_until_trained(url: str, base_version: str, timeout: float) -> tuple[dict, float]:
    """Until a version is served and no job is queued or running (idle refinement included).

    Returns the settled status and the seconds until the first trained version was served.
    """
    started = deadline = time.monotonic()
    deadline += timeout
    quiet, first = 0, None
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/status/1", timeout=5).json()
        if first is None and status["model_version"] != base_version:
            first = time.monotonic() - started
        busy = status["job"].get("state") in ("queued", "running", "pending")
        quiet = 0 if busy or status["model_version"] == base_version else quiet + 1
        if quiet >= 3:
            return status, first
        time.sleep(1)
    raise RuntimeError(f"training did not settle within {timeout} s")


def run_k(k: int, train, held, held_yaml: Path, names, config: str, work: Path, extra: dict) -> dict:
    ls = LabelStudioStandIn(work / "ls")
    env = backend_env(work / "models", ls.url, AUTOLABEL_AFTER_TRAIN="false", MIN_ANNOTATIONS=min(10, k), **extra)
    server, url = start_server(env, work / "server.log")
    try:
        setup = {"project": "1.1", "schema": config, "hostname": ls.url, "access_token": ""}
        base_version = requests.post(f"{url}/setup", json=setup, timeout=3).json()["model_version"]
        # The rest of the training split plays the project's unlabeled tasks (held-out images are never among them).
        unlabeled = [{"id": 50_000 + i, "data": {"image": ls.upload(1, item.image)}, "annotations": [],
                      "predictions": []} for i, item in enumerate(train[k:k + UNLABELED])]
        ls.api["/api/tasks"] = {"tasks": unlabeled, "total": len(unlabeled)}
        for task_id, item in enumerate(train[:k], start=1):
            event = annotation_event(1, task_id, ls.upload(1, item.image), to_result(item, names), config)
            requests.post(f"{url}/webhook", json=event, timeout=1).raise_for_status()
        started, wall = time.perf_counter(), time.time()  # from the k-th annotation, as a user would count
        status, first = wait_until_trained(url, base_version, timeout=3600)
        seconds = time.perf_counter() - started
        effort = touched_per_box(url, ls, held, names, config)
    finally:
        server.stop()
        ls.close()
    from model.validator import evaluate

    versions = {v["version"]: v for v in status["versions"]}
    served = versions[status["model_version"]]
    scores = evaluate(work / "models" / "1" / "versions" / served["version"] / "weights.pt",
                      held_yaml, served["plan"]["imgsz"], work)
    v1 = versions.get("v1") or {}
    first_scores = evaluate(work / "models" / "1" / "versions" / "v1" / "weights.pt", held_yaml,
                            v1["plan"]["imgsz"], work) if (work / "models/1/versions/v1/weights.pt").is_file() else None
    before = crosscheck_before(versions, served, held_yaml, work, wall)
    trail = version_trail(work / "models" / "1" / "versions", held_yaml, work, wall)
    return {"k": k, "version": served["version"], "versions": [(v["version"], v["status"]) for v in status["versions"]],
            "plan": served["plan"], "thresholds": served.get("thresholds"),
            "pseudo_labeled": [v.get("pseudo_labeled") for v in status["versions"]], "seconds_to_first": round(first or 0, 1),
            "first_map50": first_scores.map50 if first_scores else None, "first_imgsz": v1.get("plan", {}).get("imgsz"),
            "seconds_to_settled": round(seconds, 1), "map50": scores.map50, "map50_95": scores.map50_95,
            "touched_per_gt_box": effort["touched"] / max(1, effort["final"]), "effort": effort, "trail": trail, **before}


def version_trail(root: Path, held_yaml: Path, work: Path, wall: float) -> list[dict]:
    """Every version still on disk scored on the held-out images at its own thresholds (its weights alone): what
    each quick update, idle round and cross-check added, within one run and so without a second run's noise."""
    import json

    from model.policy import Thresholds
    from model.thresholds import effort_at, held_out_predictions
    from model.validator import evaluate

    trail = []
    for folder in sorted(root.glob("v*"), key=lambda p: int(p.name[1:])):
        meta = json.loads((folder / "meta.json").read_text())
        imgsz = meta["plan"]["imgsz"]
        effort = effort_at(held_out_predictions(folder / "weights.pt", held_yaml, imgsz), Thresholds.from_meta(meta, 0.25))
        scores = evaluate(folder / "weights.pt", held_yaml, imgsz, work)
        trail.append({"version": folder.name, "status": meta.get("status"), "refine_round": meta.get("refine_round"),
                      "crosscheck": bool(meta.get("crosscheck")), "pseudo_labeled": meta.get("pseudo_labeled"),
                      "imgsz": imgsz, "epochs": meta["plan"].get("epochs"), "held_out_tasks": meta.get("held_out_tasks"),
                      "own_map50": (meta.get("metrics") or {}).get("map50"), "gain": meta.get("gain"),
                      "seconds_after_k": round(meta.get("created", wall) - wall, 1), "map50": scores.map50,
                      "touched_per_gt_box": effort.touched / max(1, effort.final)})
    if trail:
        print_table(["version", "status", "round", "cross-check", "pseudo", "imgsz", "held-out tasks",
                     "own held-out mAP50", "gain", "s after k", "mAP50", "touched/GT"],
                    [[t["version"], t["status"], t["refine_round"], t["crosscheck"], t["pseudo_labeled"], t["imgsz"],
                      t["held_out_tasks"], t["own_map50"], t["gain"], t["seconds_after_k"], round(t["map50"], 3),
                      round(t["touched_per_gt_box"], 3)] for t in trail])
    return trail


def crosscheck_before(versions: dict, served: dict, held_yaml: Path, work: Path, wall: float) -> dict:
    """For a cross-checked version: the touched per box its weights had with the thresholds of its own held-out
    tasks, and when they were served (seconds from the k-th annotation)."""
    from model.policy import Thresholds
    from model.thresholds import effort_at, held_out_predictions

    parent = versions.get(served.get("parent") or "") if served.get("crosscheck") else None
    if parent is None:
        return {}
    images = held_out_predictions(work / "models" / "1" / "versions" / served["version"] / "weights.pt", held_yaml,
                                  served["plan"]["imgsz"])
    effort = {name: effort_at(images, Thresholds.from_meta(meta, 0.25)) for name, meta in
              (("before", parent), ("after", served))}
    return {"touched_before_crosscheck": effort["before"].touched / max(1, effort["before"].final),
            "touched_after_crosscheck_offline": effort["after"].touched / max(1, effort["after"].final),
            "seconds_to_settled_before_crosscheck": round(parent["created"] - wall, 1),
            "crosscheck_tasks": served["crosscheck"]["tasks"], "crosscheck_map50": served["crosscheck"]["map50"]}


def base_model_row(held, names, config: str, work: Path) -> dict:
    ls = LabelStudioStandIn(work / "ls-base")
    server, url = start_server(backend_env(work / "models-base", ls.url), work / "server-base.log")
    try:
        effort = touched_per_box(url, ls, held, names, config)
    finally:
        server.stop()
        ls.close()
    return {"touched_per_gt_box": effort["touched"] / max(1, effort["final"]), "effort": effort}


def plot(curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    for name, result in curves.items():
        means = [mean_row(rows) for rows in by_k(result["ours"]).values()]
        ks = [r["k"] for r in means]
        line, = left.plot(ks, [r["map50"] for r in means], marker="o", label=name)
        right.plot(ks, [r["touched_per_gt_box"] for r in means], marker="o", color=line.get_color())
        for ax, key in ((left, "map50"), (right, "touched_per_gt_box")):
            if key in (result.get("baseline") or {}):
                ax.scatter([10], [result["baseline"][key]], marker="x", s=80, color=line.get_color())
        if result.get("base"):  # a dataset replotted from rows without the base model's
            right.axhline(result["base"]["touched_per_gt_box"], linestyle="--", color=line.get_color(), alpha=0.5)
    left.set(xlabel="labeled images k", ylabel="held-out mAP50", ylim=(0, 1),
             title="quality (o: ours, x: plain fine-tune at k=10)")
    right.set(xlabel="labeled images k", ylabel="boxes a human must touch per GT box", ylim=(0, None),
              title="effort (dashed: the base model, 1.0 = nothing served)")
    right.scatter(list(TOUCHED_TARGETS), list(TOUCHED_TARGETS.values()), marker="_", s=400, color="grey",
                  label="issue 9 target")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", type=Path,
                        default=sorted(p for p in (SHARED / "datasets").iterdir() if (p / "data.yaml").is_file()))
    parser.add_argument("--ks", nargs="*", type=int, default=[10, 25, 50], help="none: only the baselines")
    parser.add_argument("--holdout", type=int, default=100, help="held-out images scored per dataset")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs of each k (its rows are numbered 'repeat')")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="extra backend settings, KEY=VALUE")
    parser.add_argument("--replot", nargs="+", type=Path, help="print the table and draw the plot of earlier result "
                        "files (bench/results/fewshot.json of several runs), merged by dataset and k; nothing runs")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    if args.replot:
        return report(merged(args.replot), extra)
    curves = {}
    for dataset in args.datasets:
        dataset = dataset.resolve()
        names, items = class_names(dataset), read_dataset(dataset)
        train = [i for i in items if i.split == "train"]
        held = [i for i in items if i.split != "train"][:args.holdout]
        config = label_config(names)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            held_out_dataset(held, names, work / "held")
            result = {"names": names, "held_out": len(held)}
            result["baseline"] = None if args.skip_baseline else plain_baseline(
                train[:10], names, work / "held" / "data.yaml", work, Path(extra.get("TRAIN_BASE_MODEL", TRAIN_BASE)))
            result["base"] = base_model_row(held, names, config, work)
            result["ours"] = []
            curves[dataset.name] = result  # written after each row, so a run stopped early keeps what it measured
            write_results("fewshot", {"settings": extra, "datasets": curves})
            for k in args.ks:
                for repeat in range(args.repeats):
                    with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
                        row = run_k(k, train, held, work / "held" / "data.yaml", names, config, Path(run_dir), extra)
                    result["ours"].append({**row, "repeat": repeat})
                    write_results("fewshot", {"settings": extra, "datasets": curves})
    report(curves, extra)


def merged(files: list[Path]) -> dict:
    """Several runs' results as one set of curves (each k costs ~10 minutes per set, so runs come in pieces); a later
    file's row for a k and repeat replaces an earlier one's."""
    import json

    curves: dict = {}
    for file in files:
        for name, result in json.loads(file.read_text())["datasets"].items():
            curve = curves.setdefault(name, {**result, "ours": []})
            curve["baseline"] = result.get("baseline") or curve.get("baseline")
            curve["base"] = result.get("base") or curve.get("base")
            rows = {(r["k"], r.get("repeat", 0)): r for r in curve["ours"] + result["ours"]}
            curve["ours"] = [rows[key] for key in sorted(rows)]
    return curves


def by_k(rows: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["k"], []).append(row)
    return dict(sorted(groups.items()))


def mean_row(rows: list[dict]) -> dict:
    """One k's repeats as one row: the mean of each figure, its range beside it where there are several."""
    if len(rows) == 1:
        return rows[0]
    out = {"k": rows[0]["k"], "repeat": f"mean of {len(rows)}"}
    for key in ("map50", "map50_95", "touched_per_gt_box", "touched_before_crosscheck", "first_map50",
                "seconds_to_first", "seconds_to_settled_before_crosscheck", "seconds_to_settled"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
        out[f"{key}_range"] = f"{min(values):.3f}-{max(values):.3f}" if values else ""
    return out


def cell(row: dict, key: str):
    """A figure for the table, with its range where the row is a mean of repeats."""
    value = "-" if row.get(key) is None else row[key]
    return f"{value:.3f} ({row[key + '_range']})" if row.get(key + "_range") else value


def report(curves: dict, extra: dict) -> None:
    rows = []
    for name, result in curves.items():
        baseline = result["baseline"]["map50"] if result["baseline"] else None
        base = result["base"]["touched_per_gt_box"] if result.get("base") else "-"
        if not result["ours"]:  # a run of the baselines only (--ks with no value)
            rows.append([name, "-", "", "-", "-", "-", "-", base, baseline, "", "-", "-", "-", "-"])
        for runs in by_k(result["ours"]).values():
            for r in runs + ([mean_row(runs)] if len(runs) > 1 else []):
                rows.append([name, r["k"], r.get("repeat", 0), cell(r, "map50"), cell(r, "map50_95"),
                             cell(r, "touched_per_gt_box"), cell(r, "touched_before_crosscheck"), base,
                             baseline if baseline is not None else "-",
                             f"{r['map50'] / baseline:.2f}x" if baseline and r["k"] == 10 else "",
                             cell(r, "first_map50"), cell(r, "seconds_to_first"),
                             cell(r, "seconds_to_settled_before_crosscheck"), cell(r, "seconds_to_settled")])
    print_table(["dataset", "k", "run", "mAP50", "mAP50-95", "touched/GT", "touched/GT before cross-check",
                 "touched/GT base", "plain mAP50 k=10", "ours/plain", "first mAP50", "s to first",
                 "s to served before cross-check", "s to settle"], rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(curves, RESULTS / "fewshot.png")
    print("wrote", write_results("fewshot", {"settings": extra, "datasets": curves}), RESULTS / "fewshot.png")


if __name__ == "__main__":
    main()
