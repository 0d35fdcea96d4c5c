"""The HTTP face of the backend: Label Studio's ML-backend protocol over FastAPI."""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from model.label_config import ConfigError, parse_label_config
from model.weights import WeightsUnavailable

from . import metrics, report
from .backend import Backend, InvalidInput, project_id
from .events import handle_event, remember_config
from .jobs import autolabel_project, set_backend, set_queue, train_project
from .queues import LocalQueue, RQQueue
from .scheduler import Scheduler
from .settings import Settings, get_settings

log = logging.getLogger(__name__)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message}, status_code=status)


async def json_body(request: Request) -> dict:
    """The request's JSON object, or InvalidInput with a readable reason."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app with its backend, queue and scheduler; nothing slow happens here."""
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = Backend(settings)
    set_backend(backend)
    queue = (RQQueue(settings.model_dir, settings.redis_url, settings.queue_name, settings.job_timeout)
             if settings.redis_url else LocalQueue(settings.model_dir, {"train": train_project,
                                                                         "autolabel": autolabel_project}))
    set_queue(queue)
    scheduler = Scheduler(backend, queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        backend.warm_up()
        yield
        scheduler.close()

    app = FastAPI(title="YOLO backend for Label Studio", lifespan=lifespan)
    app.state.backend, app.state.queue, app.state.scheduler = backend, queue, scheduler

    @app.middleware("http")
    async def basic_auth_and_timing(request: Request, call_next):
        if settings.basic_auth_user or settings.basic_auth_pass:
            if not _authorized(request.headers.get("authorization", ""), settings):
                return Response("authentication required", status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="yolo-backend"'})
        started = time.perf_counter()
        response = await call_next(request)
        metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    @app.get("/")
    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "UP",
            "model_class": "YOLO",
            "queue": queue.kind,
            "base_model": settings.base_model,
            "base_model_error": backend.base_error,
            "models_loaded": backend.models.loaded(),
            "waiting_for_queue": sorted(f"{kind}:{project}" for kind, project in scheduler.pending),
        }

    @app.exception_handler(InvalidInput)
    @app.exception_handler(ConfigError)
    async def bad_request(_: Request, exc: ValueError):
        return error(400, str(exc))

    @app.exception_handler(WeightsUnavailable)
    async def no_model(_: Request, exc: WeightsUnavailable):
        return error(503, f"no model to predict with: {exc}")

    @app.post("/setup")
    async def setup(request: Request):
        body = await json_body(request)
        project = project_id(body.get("project"))
        config = body.get("schema") or body.get("label_config") or ""
        parse_label_config(config)
        await run_in_threadpool(remember_config, backend, project, config, hostname=body.get("hostname"),
                                access_token=body.get("access_token"))
        return {"model_version": backend.model_version(project)}

    @app.post("/predict")
    async def predict(request: Request):
        body = await json_body(request)
        project = project_id(body.get("project"))
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise InvalidInput("'tasks' must be a list of task objects")
        config = body.get("label_config") or backend.store(project).info().get("label_config", "")
        control = parse_label_config(config)
        version, results, _ = await run_in_threadpool(backend.predict_tasks, project, control, tasks)
        metrics.PREDICTED_TASKS.inc(len(tasks))
        return {"results": results, "model_version": version}

    @app.post("/webhook")
    async def webhook(request: Request):
        return await run_in_threadpool(handle_event, backend, scheduler, await json_body(request))

    @app.post("/train")
    async def train(request: Request):
        """Older Label Studio versions call /train instead of sending START_TRAINING."""
        body = {**await json_body(request), "action": "START_TRAINING"}
        return await run_in_threadpool(handle_event, backend, scheduler, body)

    @app.get("/versions")
    async def versions(project: str | None = None):
        projects = [project_id(project)] if project else backend.projects()
        listed = [{"project": p, **v.meta} for p in projects for v in backend.registry(p).versions()]
        return {"versions": [v["version"] for v in listed], "details": listed}

    @app.get("/status/{project}")
    async def status(project: str):
        project = project_id(project)
        total, _ = backend.store(project).counts(0)
        return {
            "project": project,
            "model_version": backend.model_version(project),
            "annotated_tasks": total,
            "job": queue.status(project),
            "autolabel": queue.status(project, "autolabel"),
            "versions": [v.meta for v in backend.registry(project).versions()],
        }

    @app.get("/projects/{project}/")
    async def project_page(project: str):
        project = project_id(project)
        rows = await run_in_threadpool(report.version_rows, backend, project)
        return HTMLResponse(report.page_html(project, backend.model_version(project), rows, queue.status(project),
                                             queue.status(project, "autolabel")))

    @app.get("/projects/{project}/plot.png")
    async def project_plot(project: str):
        rows = await run_in_threadpool(report.version_rows, backend, project_id(project))
        return Response(await run_in_threadpool(report.plot_png, rows), media_type="image/png")

    @app.post("/autolabel/{project}")
    async def autolabel(project: str):
        """Pre-annotate every unlabeled task with the served version (protect it with BASIC_AUTH_*)."""
        project = project_id(project)
        if not backend.registry(project).current_name():
            return error(409, f"project {project} has no trained version yet")
        return {"project": project, "autolabel": await run_in_threadpool(scheduler.request, project, "autolabel")}

    @app.get("/metrics")
    async def metrics_route():
        body = await run_in_threadpool(metrics.render, backend, queue)
        return PlainTextResponse(body, media_type=metrics.CONTENT_TYPE)

    return app


def _authorized(header: str, settings: Settings) -> bool:
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, settings.basic_auth_user) & secrets.compare_digest(password, settings.basic_auth_pass)
