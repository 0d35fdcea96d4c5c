"""The training job: the same function runs on an RQ worker or in the server's own background thread."""
from __future__ import annotations

import logging
import time

from model import compute, crosscheck
from model.label_config import ConfigError, parse_label_config
from model.pipeline import NotEnoughData, run_training, trained_upto
from model.policy import (REFINE_MIN_GAIN, SELF_TRAINING_FROM_ROUND, Thresholds, every_label_served, pseudo_label_quota,
                          usable_pseudo_label)
from model.project_store import annotation_record
from model.trainer import TrainParams

from .backend import Backend
from .controls import any_trained, composite_version, only_boxes, parse_for_project, predict_controls
from .job_context import JobContext, context_from_settings, get_backend, rq_queue, set_backend  # noqa: F401
from .job_status import job_updater
from .ls_client import LabelStudioError
from .settings import get_settings
from .sync_state import full_run_requested, needs_export

log = logging.getLogger(__name__)


def latest_annotation(task: dict) -> dict | None:
    """The task's newest annotation that is a real label (cancelled ones are not)."""
    usable = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(usable, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0)) if usable else None


def resync(backend: Backend, project: str) -> int:
    """Mirror every annotation of the project from Label Studio's export, so none made while we were down is lost."""
    client = backend.client(project)
    if client is None:
        raise LabelStudioError("no Label Studio URL known for a full resync: set LABEL_STUDIO_URL")
    store = backend.store(project)
    details = client.project(project)
    if details.get("label_config"):
        store.update_info(label_config=details["label_config"])
    records = []
    for task in client.export_tasks(project):
        annotation = latest_annotation(task)
        if annotation is not None:
            records.append(annotation_record(task, annotation))
    store.replace_all(records)
    log.info("project %s: resynced %d annotated tasks from Label Studio", project, len(records))
    return len(records)


def next_run(backend: Backend, project: str, resync_requested: bool, registry=None,
             cross_check: bool = False) -> tuple[str, float, int] | None:
    """What run is worth doing now: an update for new annotations, else idle refinement rounds, else, with
    cross_check, the served version's cross-check folds (model.crosscheck), else none.

    Refinement rounds go on while nobody labels, each judged by the not-worse gate, until REFINE_ROUNDS are done
    or a round is rejected or gains less than REFINE_MIN_GAIN over the version it continued.
    """
    s = backend.settings
    registry = registry or backend.registry(project)  # a control's own registry (ls_backend.controls)
    _, changed = backend.store(project).counts(since=trained_upto(registry))
    current = registry.current()
    if resync_requested:
        return "full", s.refine_time_budget or s.train_time_budget, 1
    if changed or current is None:
        return "update", s.train_time_budget, 0
    if s.refine_time_budget <= 0:
        return None
    newest = registry.versions()[-1]
    if newest.meta.get("crosscheck"):
        return None  # the rounds and the cross-check of these annotations are done
    done = newest.meta.get("refine_round") or int(bool(newest.meta.get("refined")))
    if done == 0:
        return "refine", s.refine_time_budget, 1
    stopped = newest.meta.get("status") == "rejected" or (newest.meta.get("gain") or 0.0) < REFINE_MIN_GAIN
    if done < s.refine_rounds and not stopped:
        return "refine", s.refine_time_budget, done + 1
    folds = crosscheck.pending(registry) if cross_check and s.crosscheck else None
    return ("crosscheck", s.refine_time_budget, folds[2]) if folds else None


def sync_from_label_studio(backend: Backend, project: str) -> bool:
    """Export the project from Label Studio if no job has yet, or the Train button asked again; say whether the
    Train button asks for a full run. Every other job trains on what webhooks stored and calls Label Studio for
    nothing."""
    state = backend.sync.read(project)
    pressed = full_run_requested(state)
    if pressed:
        backend.sync.mark(project, full=state.get("requested", 0))
    if needs_export(state):
        try:
            resync(backend, project)
            backend.sync.mark(project, synced=state.get("requested", 0), synced_at=time.time())
        except LabelStudioError as exc:
            log.warning("project %s: training on stored annotations only: %s", project, exc)
    return pressed


def train_project(project: str, job_id: str | None = None, context: JobContext | None = None) -> dict:
    """Resync when needed, train a version, and record the outcome in the project's job state.

    A quick update is served first; when no newer annotations wait, a longer refinement of the same data follows.
    """
    context = context or context_from_settings()
    backend = context.backend
    s = backend.settings
    started = time.time()
    status = job_updater(s.model_dir, project, "train", job_id)
    status(state="running", started=started, progress=None, error=None, reason=None)
    try:
        resync_requested = sync_from_label_studio(backend, project)
        if not only_boxes(parse_for_project(backend, project, records=backend.store(project).records())):  # several controls, or not boxes: each learns
            from .control_training import train_controls

            return train_controls(backend, project, resync_requested, status, started, context.scheduler)
        run = next_run(backend, project, resync_requested, cross_check=True)
        if run is None:
            raise NotEnoughData("nothing new to learn: no annotation changed since the served version")
        kind, budget, refine_round = run
        store = backend.store(project)
        control = parse_label_config(store.info().get("label_config", ""))
        fetcher = backend.fetcher(project)
        params = TrainParams(s.train_epochs, s.train_imgsz, budget, s.train_freeze, s.train_batch, s.device)

        def progress(epoch: int, epochs: int) -> None:
            status(progress={"epoch": epoch, "epochs": epochs, "run": kind})

        self_training = kind == "refine" and refine_round >= SELF_TRAINING_FROM_ROUND
        pseudo = pseudo_labels(backend, project, control) if self_training else []

        def fetch(record):
            return fetcher.fetch(record["data"].get(control.value_key))

        if kind == "crosscheck":
            outcome = crosscheck.run_crosscheck(store, backend.registry(project), control, fetch,
                                                backend.train_base_weights(), params, s.predict_conf, progress)
        else:
            outcome = run_training(store, backend.registry(project), control, fetch, backend.train_base_weights(),
                                   params, s.min_annotations, s.accept_only_if_not_worse, s.keep_versions, progress,
                                   refined=kind != "update", default_conf=s.predict_conf, refine_round=refine_round,
                                   pseudo=pseudo, export=s.exports_versions, export_precision=s.openvino_precision)
    except (NotEnoughData, ConfigError) as exc:
        status(state="skipped", reason=str(exc), finished=time.time())
        return {"state": "skipped", "reason": str(exc)}
    except compute.Stopped:
        raise  # left "running": the next start marks it interrupted and queues it again
    except Exception as exc:
        status(state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise
    result = {"state": "finished", "run": kind, "version": outcome.version.name, "accepted": outcome.accepted,
              "reason": outcome.reason, "metrics": outcome.metrics, "seconds": round(time.time() - started, 1)}
    status(**result, finished=time.time())
    follow_up = []  # auto-labeling first: annotators get the new predictions before a refinement starts
    if outcome.accepted and s.autolabel_after_train and backend.client(project) is not None:
        follow_up.append("autolabel")
    following = next_run(backend, project, False, cross_check=True)
    if following is not None and (outcome.accepted or following[0] == "crosscheck"):
        follow_up.append("train")  # an idle round or fold, or an update for annotations that came meanwhile
    for job in follow_up:  # the scheduler retries one it cannot queue now, as it does a webhook's request
        if context.scheduler is not None:
            context.scheduler.request(project, job)
        else:
            log.info("project %s: no queue to run the %s that would follow (run it by hand)", project, job)
    return result


def pseudo_labels(backend: Backend, project: str, control) -> list[dict]:
    """Unlabeled tasks the served version labels confidently, as records to train on (self-training).

    The served version's own prediction is reused where auto-labeling already stored it in Label Studio;
    otherwise the task is predicted here. Any failure only means a round without pseudo-labels.
    """
    s = backend.settings
    registry = backend.registry(project)
    version = registry.current_name()
    client = backend.client(project)
    if not s.self_training or version is None or client is None:
        return []
    meta = registry.current().meta
    if not every_label_served(Thresholds.from_meta(meta, s.predict_conf), meta.get("labels") or []):
        log.info("project %s: no self-training while %s withholds a label (its objects would be learned as background)",
                 project, version)
        return []
    quota = pseudo_label_quota(backend.store(project).counts(0)[0])
    chosen: list[dict] = []
    try:
        to_predict = []
        for task in client.iter_tasks(project):
            if len(chosen) + len(to_predict) >= quota * 2:  # enough candidates: a large project is not paged through
                break
            if _labeled(task):
                continue
            stored = [p for p in task.get("predictions") or [] if p.get("model_version") == version]
            if stored:
                if usable_pseudo_label(stored[-1]) and len(chosen) < quota:
                    chosen.append({"task_id": int(task["id"]), "data": task.get("data") or {},
                                   "result": stored[-1]["result"]})
            else:
                to_predict.append(task)
        for start in range(0, len(to_predict), max(1, s.predict_batch)):
            if len(chosen) >= quota:
                break
            batch = to_predict[start:start + s.predict_batch]
            used, results, broken = backend.predictions.predict_tasks(project, control, batch)
            if used != version:
                break
            chosen.extend({"task_id": int(task["id"]), "data": task.get("data") or {}, "result": item["result"]}
                          for i, (task, item) in enumerate(zip(batch, results))
                          if i not in broken and usable_pseudo_label(item))
    except (LabelStudioError, OSError) as exc:
        log.warning("project %s: refining without pseudo-labels: %s", project, exc)
    log.info("project %s: %d unlabeled tasks pseudo-labeled by %s for self-training", project, len(chosen[:quota]), version)
    return chosen[:quota]


def _labeled(task: dict) -> bool:
    return any(not a.get("was_cancelled") for a in task.get("annotations") or []) or (
        "annotations" not in task and bool(task.get("total_annotations")))


def _predicted_by(task: dict, version: str) -> bool:
    return any(p.get("model_version") == version for p in task.get("predictions") or [])


def autolabel_project(project: str, progress_bar: bool = False, job_id: str | None = None,
                      context: JobContext | None = None) -> dict:
    """Predict every unlabeled task lacking a prediction of the served version and store it in Label Studio.

    Safe to interrupt: a rerun skips what already holds this version's prediction. Stops when a newer version
    is served, since its own run will redo the rest.
    """
    from tqdm import tqdm

    backend = (context or context_from_settings()).backend
    s = backend.settings
    models = parse_for_project(backend, project)
    version = composite_version(backend, project, models) if any_trained(backend, project) else None
    status = job_updater(s.model_dir, project, "autolabel", job_id)
    if version is None:
        return status(state="skipped", reason="no trained version yet")
    status(state="running", version=version, done=0, total=None,
                 started=time.time(), error=None, reason=None)
    try:
        client = backend.client(project)
        if client is None:
            raise LabelStudioError("no Label Studio URL known: set LABEL_STUDIO_URL")
        to_predict = [t for t in client.iter_tasks(project) if not _labeled(t) and not _predicted_by(t, version)]
        done = failed = 0
        state = "finished"
        with tqdm(total=len(to_predict), desc=f"project {project} {version}", unit="task",
                  disable=not progress_bar) as bar:
            for start in range(0, len(to_predict), max(1, s.predict_batch)):
                batch = to_predict[start:start + s.predict_batch]
                used, results, broken = predict_controls(backend, project, models, batch)
                if used != version:
                    state = "superseded"
                    break
                for i, (task, item) in enumerate(zip(batch, results)):
                    if i in broken:
                        failed += 1
                        continue
                    client.create_prediction(task["id"], item["result"], item["score"], version)
                    done += 1
                bar.update(len(batch))
                status(done=done, failed=failed, total=len(to_predict))
    except Exception as exc:
        status(state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise
    reason = f"{composite_version(backend, project, models)} replaced {version}" if state == "superseded" else None
    return status(state=state, reason=reason, done=done, failed=failed, total=len(to_predict), finished=time.time())


def _run_rq(kind: str, project: str, run) -> dict:
    """Leave the waiting slot, wait for the project's lock for this kind of job, then run it with a context
    rebuilt from settings in this worker."""
    from rq import get_current_job

    from .queues import WAITING, hold_lock

    job = get_current_job()
    redis = job.connection
    key = WAITING.format(kind=kind, project=project)
    if (redis.get(key) or b"").decode() == job.id:
        redis.delete(key)
    release = hold_lock(redis, kind, project)
    try:
        return run(project, job_id=job.id, context=context_from_settings())
    finally:
        release()


def run_queued(project: str) -> dict:
    """RQ entry point of a training job."""
    return _run_rq("train", project, train_project)


def run_queued_autolabel(project: str) -> dict:
    """RQ entry point of an auto-labeling job."""
    return _run_rq("autolabel", project, autolabel_project)


def on_rq_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ gave up on a job: one whose state still says running died with its worker, and is resumed."""
    rq_queue(get_settings()).lost(job.args[0], job.id, f"the worker running it was lost (RQ: {exc_type.__name__})")
