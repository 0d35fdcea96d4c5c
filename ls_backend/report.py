"""Per-project figures over versions: quality on held-out tasks and effort measured from real corrections."""
from __future__ import annotations

import html
import io

from model.crosscheck import more_models
from model.effort import Effort

from .backend import Backend

EFFORT_FIELDS = ("kept", "moved", "relabelled", "deleted", "added", "iou_sum")


def effort_by_version(backend: Backend, project: str) -> dict[str, Effort]:
    """Sum the per-task comparisons by the version whose prediction the annotator saw."""
    totals: dict[str, Effort] = {}
    for record in backend.store(project).efforts():
        effort = Effort(**{k: record.get(k, 0) for k in EFFORT_FIELDS})
        totals[record["version"]] = totals.get(record["version"], Effort()) + effort
    return totals


def version_rows(backend: Backend, project: str) -> list[dict]:
    """One row per version that was trained or whose predictions were corrected, oldest first."""
    efforts = effort_by_version(backend, project)
    rows = []
    for version in backend.registry(project).versions():
        effort = efforts.pop(version.name, None)
        meta = version.meta
        checked = meta.get("crosscheck") or {}  # figures of the version's own and its folds' held-out tasks
        rows.append({"version": version.name, "status": meta.get("status"), "annotations": meta.get("annotations"),
                     "held_out": checked.get("tasks") or meta.get("held_out_tasks", len(meta.get("val_tasks") or []))
                     or None, "pseudo": meta.get("pseudo_labeled"),
                     "map50": checked.get("map50", meta.get("metrics", {}).get("map50")),
                     "serving": serving_note(meta), "effort": effort.as_dict() if effort else None})
    for name, effort in sorted(efforts.items()):  # base model predictions, before any training
        rows.insert(0, {"version": name, "status": "base", "annotations": 0, "held_out": None, "pseudo": None,
                        "map50": None, "serving": None, "effort": effort.as_dict()})
    return rows


def serving_note(meta: dict) -> str | None:
    """Which boxes a version serves, and the held-out evidence for holding any back."""
    evidence = meta.get("threshold_evidence")
    if not evidence:
        return None
    withheld = evidence.get("withheld_labels") or []
    labels = meta.get("labels") or []
    folds = (meta.get("crosscheck") or {}).get("folds") or []
    lent = meta.get("lent_folds")
    checked = ""
    if folds:
        fused = meta.get("fused_models")
        checked = (f" (cross-checked: {more_models(folds)} held out tasks of their own"
                   + ("; their boxes are fused with its own)" if fused else ")"))
    elif lent:
        checked = (f" ({lent['tasks']} of them predicted by the fold models of {lent['from']}'s cross-check, which "
                   "never trained on them)")
    basis = (f"on {evidence['images']} held-out tasks{checked}, served boxes would leave {evidence['touched']} to "
             f"touch against {evidence['touched_if_none_served']} to draw with none")
    if labels and len(withheld) == len(labels):
        return f"none: {basis}, so no box is served until a version pays"
    if withheld:
        return f"all but {', '.join(withheld)}: {basis}"
    return f"all labels: {basis}"


def plot_png(rows: list[dict]) -> bytes:
    """Acceptance rate, boxes touched per box, and held-out mAP50 across versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["version"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    series = {
        "acceptance rate": [r["effort"]["acceptance"] if r["effort"] else None for r in rows],
        "boxes touched per box": [r["effort"]["touched_per_box"] if r["effort"] else None for r in rows],
        "held-out mAP50": [r["map50"] for r in rows],
    }
    for label, values in series.items():
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("model version")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def job_text(job: dict) -> str:
    """A job view (job_status.job_view) in words: its state and progress, the job waiting behind it, and an
    interruption it resumes."""
    if not job:
        return "none yet"
    state, progress = job.get("state"), job.get("progress") or {}
    text = str(state)
    if state == "running" and progress.get("epochs"):
        text += f" ({progress.get('run', 'training')}, epoch {progress.get('epoch')} of {progress['epochs']})"
    if job.get("total") is not None:
        text += f" ({job.get('done')} of {job['total']} tasks)"
    if job.get("error") or job.get("reason"):
        text += f": {job.get('error') or job.get('reason')}"
    if job.get("waiting"):
        text += "; another job is waiting"
    previous = job.get("previous") or {}
    if previous.get("state") == "interrupted":
        text += f". The job before was interrupted: {previous.get('error')}"
    return text


def page_html(project: str, model_version: str, rows: list[dict], job: dict, autolabel: dict) -> str:
    """A small status page: what is served, how it was judged, how much humans had to fix."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value if value is not None else "–"))

    body = "".join(
        "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in (
            r["version"], r["status"], r["annotations"], r["pseudo"], r["held_out"], r["map50"], r["serving"],
            r["effort"]["final"] if r["effort"] else None, r["effort"]["acceptance"] if r["effort"] else None,
            r["effort"]["touched_per_box"] if r["effort"] else None)) + "</tr>" for r in rows)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Project {html.escape(project)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;border-bottom:1px solid #ddd}}</style></head>
<body><h1>Project {html.escape(project)}</h1><p>Serving <b>{html.escape(model_version)}</b>.
Training: {html.escape(job_text(job))}.<br>Auto-labeling: {html.escape(job_text(autolabel))}.</p>
<table><tr><th>version</th><th>status</th><th>annotations</th><th>pseudo-labeled</th><th>held-out tasks</th>
<th>held-out mAP50</th><th>boxes served</th><th>corrected boxes</th>
<th>acceptance rate</th><th>boxes touched per box</th></tr>{body}</table>
<p><img src="plot.png" alt="figures over versions"></p></body></html>"""
