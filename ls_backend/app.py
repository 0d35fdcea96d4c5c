"""The HTTP face of the backend: Label Studio's ML-backend protocol over FastAPI."""
from __future__ import annotations

import base64
import contextlib
import functools
import logging
import secrets
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.kinds import parse_controls
from model.label_config import ConfigError
from model.weights import WeightsUnavailable

from . import metrics, report
from .backend import Backend
from .controls import (any_trained, composite_version, control_models, parse_for_project, predict_controls,
                       project_registries)
from .events import handle_event, remember_config
from .job_context import JobContext, set_backend
from .jobs import autolabel_project, train_project
from .ls_client import setup_connection
from .queues import LocalQueue, RQQueue
from .scheduler import Scheduler
from .schemas import (BadBody, Event, PredictRequest, ProjectId, SetupRequest, TrainRequest, WebhookRequest,
                      describe_errors, parse_json)
from .settings import Settings, get_settings
from .webhook_auth import WebhookAuth, basic_auth_header

log = logging.getLogger(__name__)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message}, status_code=status, headers=headers)


class BoundedJSONRequest(Request):
    """Bodies are parsed by schemas.parse_json: strict JSON of bounded depth, refused with a readable 400."""

    async def json(self):
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json(await self.body())
            except BadBody as exc:
                raise HTTPException(400, str(exc)) from exc
        return self._json


class BoundedJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJSONRequest(request.scope, request.receive))
        return bounded


router = APIRouter(route_class=BoundedJSONRoute)


@router.get("/")
@router.get("/health")
async def health(request: Request) -> dict:
    """Answered on the event loop, never behind busy worker threads: Label Studio gives it 1 s (nothing here blocks)."""
    state = request.app.state
    return {
        "status": "UP",
        "model_class": "YOLO",
        "queue": state.queue.kind,
        "base_model": state.backend.settings.base_model,
        "base_model_error": state.backend.base_error,
        "models_loaded": state.backend.models.loaded(),
        "model_runtimes": state.backend.models.runtimes(),
        "waiting_for_queue": sorted(f"{kind}:{project}" for kind, project in state.scheduler.pending),
    }


@router.post("/setup")
def setup(body: SetupRequest, request: Request) -> dict:
    backend = request.app.state.backend
    parse_controls(body.config)
    remember_config(backend, body.project, body.config, **setup_connection(body.hostname, body.access_token))
    if request.app.state.webhook_auth is not None:
        request.app.state.webhook_auth.ensure(body.project, request.headers.get("host", ""))
    models = control_models(backend, body.project, parse_controls(body.config))
    return {"model_version": composite_version(backend, body.project, models)}


@router.post("/predict")
def predict(body: PredictRequest, request: Request):
    backend = request.app.state.backend
    limit = backend.settings.max_predict_tasks
    if len(body.tasks) > limit:
        return error(413, f"{len(body.tasks)} tasks in one /predict, more than MAX_PREDICT_TASKS={limit}: retrieve "
                          f"predictions for fewer tasks at a time, or pre-annotate all with POST /autolabel/<project>")
    models = parse_for_project(backend, body.project, body.label_config)
    version, results, _ = predict_controls(backend, body.project, models, [task.as_sent() for task in body.tasks])
    metrics.PREDICTED_TASKS.inc(len(body.tasks))
    return {"results": results, "model_version": version}


@router.post("/webhook")
def webhook(body: WebhookRequest, request: Request) -> dict:
    return handle_event(request.app.state.backend, request.app.state.scheduler, body)


@router.post("/train")
def train(body: TrainRequest, request: Request) -> dict:
    """Older Label Studio versions call /train instead of sending START_TRAINING."""
    event = Event(action="START_TRAINING", project=body.project)
    return handle_event(request.app.state.backend, request.app.state.scheduler, event)


@router.get("/versions")
def versions(request: Request, project: ProjectId | None = None) -> dict:
    backend = request.app.state.backend
    projects = [project] if project else backend.projects()
    listed = [listed_version(p, v.meta) for p in projects for r in project_registries(backend, p) for v in r.versions()]
    return {"versions": [v["version"] for v in listed], "details": listed}


def listed_version(project: str, meta: dict) -> dict:
    """A control's version goes by the name model_version gives it ('outline-v2'), the boxes' by its own ('v2')."""
    control = meta.get("control")
    return {"project": project, **meta, **({"version": f"{control}-{meta['version']}"} if control else {})}


@router.get("/status/{project}")
def status(project: ProjectId, request: Request) -> dict:
    backend, queue = request.app.state.backend, request.app.state.queue
    total, _ = backend.store(project).counts(0)
    return {
        "project": project,
        "model_version": backend.model_version(project),
        "annotated_tasks": total,
        "job": queue.status(project),
        "autolabel": queue.status(project, "autolabel"),
        "versions": [v.meta for v in backend.registry(project).versions()],
        "controls": {r.project: [v.meta for v in r.versions()] for r in project_registries(backend, project)[1:]},
    }


@router.get("/projects/{project}/")
def project_page(project: ProjectId, request: Request) -> HTMLResponse:
    backend, queue = request.app.state.backend, request.app.state.queue
    rows = report.version_rows(backend, project)
    return HTMLResponse(report.page_html(project, backend.model_version(project), rows, queue.status(project),
                                         queue.status(project, "autolabel")))


@router.get("/projects/{project}/plot.png")
def project_plot(project: ProjectId, request: Request) -> Response:
    rows = report.version_rows(request.app.state.backend, project)
    return Response(report.plot_png(rows), media_type="image/png")


@router.post("/autolabel/{project}")
def autolabel(project: ProjectId, request: Request):
    """Pre-annotate every unlabeled task with the served version (protect it with BASIC_AUTH_*)."""
    if not any_trained(request.app.state.backend, project):
        return error(409, f"project {project} has no trained version yet")
    return {"project": project, "autolabel": request.app.state.scheduler.request(project, "autolabel")}


@router.get("/metrics")
def metrics_route(request: Request) -> PlainTextResponse:
    body = metrics.render(request.app.state.backend, request.app.state.queue)
    return PlainTextResponse(body, media_type=metrics.CONTENT_TYPE)


def accepted_credentials(settings: Settings) -> set[bytes] | None:
    """user:pass as UTF-8 (RFC 7617, browsers) and as Latin-1 (Python requests, so Label Studio); None: no auth."""
    if not (settings.basic_auth_user or settings.basic_auth_pass):
        return None
    pair = f"{settings.basic_auth_user}:{settings.basic_auth_pass}"
    accepted = {pair.encode("utf-8")}
    with contextlib.suppress(UnicodeEncodeError):
        accepted.add(pair.encode("latin-1"))
    return accepted


def authorized(header: str, accepted: set[bytes]) -> bool:
    """Compare bytes, so non-ASCII credentials work; anything malformed is simply not authorized."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters in the header
        return False
    matches = [secrets.compare_digest(given, pair) for pair in accepted]  # compare with all: no early exit
    return any(matches)


class BasicAuthAndTiming:
    """Every route, /docs and /openapi.json included, needs the credentials when they are set; then timing.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would wrap the body-limit 413 in an exception group.
    """

    def __init__(self, app: ASGIApp, accepted: set[bytes] | None):
        self.app = app
        self.accepted = accepted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.accepted is not None and not authorized(Headers(scope=scope).get("authorization", ""), self.accepted):
            response = error(401, "authentication required: this backend's BASIC_AUTH_USER and BASIC_AUTH_PASS",
                             headers={"WWW-Authenticate": 'Basic realm="yolo-backend", charset="UTF-8"'})
            return await response(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics.observe(scope["path"], status, time.perf_counter() - started)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app with its backend, queue and scheduler; nothing slow happens here."""
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = Backend(settings)
    set_backend(backend)
    queue = (RQQueue(settings.model_dir, settings.redis_url, settings.queue_name, settings.job_timeout)
             if settings.redis_url else LocalQueue(settings.model_dir, concurrency=settings.job_concurrency))
    scheduler = Scheduler(backend, queue)
    if isinstance(queue, LocalQueue):  # in-process jobs are handed the server's own backend and scheduler
        context = JobContext(backend, scheduler)
        queue.start({"train": functools.partial(train_project, context=context),
                     "autolabel": functools.partial(autolabel_project, context=context)})
    accepted = accepted_credentials(settings)
    client = backend.client() if accepted and settings.label_studio_api_key else None  # LABEL_STUDIO_URL's
    webhook_auth = (WebhookAuth(client, basic_auth_header(settings.basic_auth_user, settings.basic_auth_pass))
                    if client else None)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        backend.warm_up()
        yield
        scheduler.close()
        backend.close()
        if webhook_auth is not None:
            webhook_auth.close()

    # max_body_size: Starlette's ASGI middleware answers 413 from Content-Length, or once the streamed bytes pass it.
    app = FastAPI(title="YOLO backend for Label Studio", lifespan=lifespan, max_body_size=settings.max_body_bytes)
    app.state.backend, app.state.queue, app.state.scheduler = backend, queue, scheduler
    app.state.webhook_auth = webhook_auth
    app.include_router(router)
    app.add_middleware(BasicAuthAndTiming, accepted=accepted)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError):
        return error(400, describe_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 413:
            message = f"the request body is larger than MAX_BODY_BYTES={settings.max_body_bytes} bytes"
        return error(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(ConfigError)
    async def unservable_config(_: Request, exc: ConfigError):
        return error(400, str(exc))

    @app.exception_handler(WeightsUnavailable)
    async def no_model(_: Request, exc: WeightsUnavailable):
        return error(503, f"no model to predict with: {exc}")

    return app
