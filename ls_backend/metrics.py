"""Prometheus figures: request latency from the server, model and job state from MODEL_DIR."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import report

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry()
REQUESTS = Histogram("lsyolo_request_seconds", "Request latency by route", ["route", "status"], registry=REGISTRY,
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PREDICTED_TASKS = Counter("lsyolo_predicted_tasks", "Tasks predicted through /predict", registry=REGISTRY)
KNOWN_ROUTES = {"/", "/health", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/train"}


def observe(path: str, status: int, seconds: float) -> None:
    route = path if path in KNOWN_ROUTES else "/status" if path.startswith("/status/") else "other"
    REQUESTS.labels(route, str(status)).observe(seconds)


def render(backend, queue) -> bytes:
    """Current figures for every project on disk, then the request metrics."""
    families = {
        "versions": GaugeMetricFamily("lsyolo_versions", "Versions trained per project", labels=["project"]),
        "annotated": GaugeMetricFamily("lsyolo_annotated_tasks", "Annotated tasks stored", labels=["project"]),
        "map50": GaugeMetricFamily("lsyolo_served_map50", "Held-out mAP50 of the served version", labels=["project", "version"]),
        "job": GaugeMetricFamily("lsyolo_job_running", "1 while a training job runs", labels=["project", "state"]),
        "boxes": GaugeMetricFamily("lsyolo_corrected_boxes", "Boxes by what the annotator did to our prediction",
                                   labels=["project", "version", "outcome"]),
        "acceptance": GaugeMetricFamily("lsyolo_acceptance_rate", "Share of predicted boxes kept unchanged",
                                        labels=["project", "version"]),
        "touched": GaugeMetricFamily("lsyolo_boxes_touched_per_box", "Boxes a human had to touch per final box",
                                     labels=["project", "version"]),
    }
    for project in backend.projects():
        registry = backend.registry(project)
        families["versions"].add_metric([project], len(registry.versions()))
        families["annotated"].add_metric([project], backend.store(project).counts(0)[0])
        current = registry.current()
        if current is not None:
            families["map50"].add_metric([project, current.name], current.meta.get("metrics", {}).get("map50", 0.0))
        for version, effort in report.effort_by_version(backend, project).items():
            for outcome in ("kept", "moved", "relabelled", "deleted", "added"):
                families["boxes"].add_metric([project, version, outcome], getattr(effort, outcome))
            families["acceptance"].add_metric([project, version], effort.acceptance)
            families["touched"].add_metric([project, version], effort.touched_per_box)
        state = queue.status(project).get("state", "none")
        families["job"].add_metric([project, state], 1.0 if state == "running" else 0.0)
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(list(families.values())))
    return generate_latest(snapshot) + generate_latest(REGISTRY)


class _Snapshot:
    """A collector that hands Prometheus families already filled in."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        yield from self.families
