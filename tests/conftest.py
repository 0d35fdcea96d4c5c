"""Shared fixtures: real weights and datasets from ../shared, a fake Label Studio media host, real Redis."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared")).resolve()
RECORDED = SHARED / "label-studio" / "recorded"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PERSON_CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                 '<Label value="person" predicted_values="Normal,Fall"/><Label value="car"/></RectangleLabels></View>')


def shared_file(*parts: str) -> Path:
    """A file from ../shared, or a loud skip naming what is missing and the setting that finds it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"SKIPPED LOUDLY: {path} is absent; set SHARED_DIR to the folder holding weights/ and datasets/")
    return path


def recorded(name: str) -> dict:
    return json.loads(shared_file("label-studio", "recorded", f"{name}.json").read_text())["request"]["json"]


@pytest.fixture(scope="session")
def person_weights() -> Path:
    return shared_file("weights", "person-fall-yolov8s.pt")


@pytest.fixture(scope="session")
def backbone_weights() -> Path:
    return shared_file("weights", "yolov5nu-coco-backbone.pt")


@pytest.fixture(scope="session")
def assets() -> Path:
    from ultralytics import ASSETS

    return Path(ASSETS)


@pytest.fixture(scope="session")
def yolo_config_dir(tmp_path_factory) -> Path:
    """One offline Ultralytics config for the whole session, so fonts are copied once."""
    path = tmp_path_factory.mktemp("ultralytics")
    from model.yolo_env import prepare_ultralytics

    prepare_ultralytics(path, allow_downloads=False)
    return path


class MediaHandler(http.server.BaseHTTPRequestHandler):
    """Serves files the way Label Studio does: uploads and local files need a token, other paths do not."""

    root: Path
    api: dict  # path -> JSON answer, for the few API routes the backend reads
    tasks: list  # what /api/tasks lists, page by page
    predictions: list  # what was POSTed to /api/predictions
    fail_after: int | None  # answer 500 once this many predictions were stored, as a crash would
    on_prediction: object  # called with the count after each stored prediction
    on_get: object  # called with the path of each GET before it is answered
    token: str = TOKEN
    refresh_token: str = ""
    seen: list

    def log_message(self, *args) -> None:
        pass

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        return header == f"Token {self.token}" or (self.refresh_token and header == "Bearer access-from-refresh")

    def do_POST(self) -> None:
        if self.path == "/api/predictions":
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if not self._authorized() or (self.fail_after is not None and len(self.predictions) >= self.fail_after):
                self._send(401 if not self._authorized() else 500, b"{}")
                return
            self.predictions.append(body)
            for task in self.tasks:
                if task["id"] == body["task"]:
                    task.setdefault("predictions", []).append(body)
            hook = vars(type(self)).get("on_prediction")
            if hook:
                hook(len(self.predictions))
            self._send(201, json.dumps({"id": len(self.predictions), **body}).encode())
            return
        if self.path == "/api/token/refresh/":
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            ok = self.refresh_token and body.get("refresh") == self.refresh_token
            self._send(200 if ok else 401, json.dumps({"access": "access-from-refresh"} if ok else {}).encode())
            return
        self._send(404, b"")

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        hook = vars(type(self)).get("on_get")
        if hook:
            hook(self.path)
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path == "/api/tasks" and self._authorized():
            query = urllib.parse.parse_qs(parsed.query)
            page, size = int(query["page"][0]), int(query["page_size"][0])
            chunk = self.tasks[(page - 1) * size: page * size]
            if page > 1 and not chunk:
                self._send(404, b'{"detail": "Invalid page."}')
            else:
                self._send(200, json.dumps({"tasks": chunk, "total": len(self.tasks)}).encode())
            return
        if parsed.path in self.api:
            if not self._authorized():
                self._send(401, b'{"detail":"Authentication credentials were not provided."}')
            else:
                self._send(200, json.dumps(self.api[parsed.path]).encode())
            return
        if parsed.path.startswith("/data/"):
            if not self._authorized():
                self._send(401, b'{"detail":"Authentication credentials were not provided."}')
                return
            if parsed.path.startswith("/data/local-files"):
                relative = urllib.parse.parse_qs(parsed.query).get("d", [""])[0]
                path = self.root / "local" / relative
            else:
                path = self.root / parsed.path.lstrip("/")
        else:
            path = self.root / "public" / parsed.path.lstrip("/")
        if not path.is_file():
            self._send(404, b"not found")
            return
        self._send(200, path.read_bytes())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class MediaServer:
    """A local stand-in for Label Studio's media routes, in a thread on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        handler = type("Handler", (MediaHandler,), {"root": root, "seen": [], "api": {}, "tasks": [],
                                                     "predictions": [], "fail_after": None, "on_prediction": None,
                                                     "on_get": None})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, kind: str, name: str, source: Path | bytes) -> str:
        """Place a file and return the reference a task would carry for it."""
        folder = {"upload": self.root / "data" / "upload" / "1", "local": self.root / "local" / "images",
                  "public": self.root / "public"}[kind]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / name
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
        return {"upload": f"/data/upload/1/{name}", "local": f"/data/local-files/?d=images/{name}",
                "public": f"{self.url}/{name}"}[kind]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def media(tmp_path) -> MediaServer:
    server = MediaServer(tmp_path / "media")
    yield server
    server.close()


@pytest.fixture
def backend_env(tmp_path, monkeypatch, person_weights, backbone_weights, yolo_config_dir):
    """Environment for a backend in this test: its own MODEL_DIR, offline, real shared weights, tiny training."""
    from ls_backend.settings import get_settings

    env = {
        "MODEL_DIR": str(tmp_path / "models"), "BASE_MODEL": str(person_weights),
        "TRAIN_BASE_MODEL": str(backbone_weights), "ALLOW_DOWNLOADS": "false",
        "YOLO_CONFIG_DIR": str(yolo_config_dir), "REDIS_URL": "", "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "", "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", "ALLOWED_MEDIA_HOSTS": "",
        "TRAIN_IMGSZ": "96", "TRAIN_EPOCHS": "3", "TRAIN_TIME_BUDGET": "0", "REFINE_TIME_BUDGET": "0",
        "MIN_ANNOTATIONS": "10", "CROSSCHECK": "false",  # tests/test_crosscheck.py turns it on
        "RETRAIN_EVERY": "5",
    }

    def apply(**overrides: str) -> dict:
        env.update({k.upper(): str(v) for k, v in overrides.items()})
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        return env

    apply()
    yield apply
    get_settings.cache_clear()
    from ls_backend.jobs import set_backend

    set_backend(None)


@pytest.fixture
def make_client(backend_env):
    """A TestClient over a freshly built app with the given setting overrides."""
    from fastapi.testclient import TestClient

    from ls_backend.app import create_app

    clients = []

    def make(**overrides) -> TestClient:
        backend_env(**overrides)
        client = TestClient(create_app())
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.app.state.scheduler.close()
        client.__exit__(None, None, None)


@pytest.fixture
def redis_db():
    """A real Redis database of our own, flushed around each test."""
    import redis

    connection = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        connection.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not running at {REDIS_TEST_URL}: {exc}")
    connection.flushdb()
    yield connection
    connection.flushdb()


class PrivateRedis:
    """A redis-server of a test's own, to stop and start again while the backend uses it."""

    def __init__(self, folder: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        self._command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                         "no", "--dir", str(folder)]
        self._server: subprocess.Popen | None = None
        import redis

        self.connection = redis.Redis.from_url(self.url)

    def pings(self) -> bool:
        import redis

        try:
            return bool(self.connection.ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        self._server = subprocess.Popen(self._command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.pings():
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not answer at {self.url}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self._server is not None:
            self._server.terminate()
            self._server.wait(10)
            self._server = None


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
