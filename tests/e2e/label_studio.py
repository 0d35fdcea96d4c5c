"""Harness for end-to-end tests: a real Label Studio and our backend as separate processes, plus API helpers.

Label Studio lives in its own virtual environment (its pins clash with ours), created on first use. A fresh data
dir takes ~30-60 s to migrate, so the migrated sqlite database is cached under the cache dir, keyed by the Label
Studio version and the test user's credentials, and copied into a fresh data dir on every later start (~5 s).
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

LS_VERSION = "1.23.2"
CACHE_DIR = Path(os.environ.get("LS_E2E_CACHE", "~/.cache/ls-yolo-e2e")).expanduser()
VENV_DIR = Path(os.environ.get("LS_E2E_VENV", str(CACHE_DIR / "venv"))).expanduser()
REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("SHARED_DIR", str(REPO_ROOT.parent / "shared"))).expanduser()

USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-123"
TOKEN = "5eed0e2e" + hashlib.sha1(b"ls-yolo-e2e").hexdigest()[8:]  # a legacy token: 40 hex chars
DB_FILES = ("label_studio.sqlite3", ".env")  # .env holds the SECRET_KEY Label Studio generated on the first start

START_TIMEOUT = float(os.environ.get("LS_E2E_START_TIMEOUT", "180"))
STARTED_LINE = re.compile(r"Starting development server at https?://[^:/]+:(\d+)/")


class HarnessError(RuntimeError):
    """Label Studio or the backend could not be installed, started or asked; the message carries its log."""


# -- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


class Process:
    """A child started in its own process group, so stopping it also stops everything it spawned."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.name, self.log = name, log
        self._log_fh = open(log, "ab")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group, the leader included
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log_fh.close()

    def fail(self, message: str) -> HarnessError:
        return HarnessError(f"{self.name}: {message}\n--- last lines of {self.log} ---\n{log_tail(self.log)}")


def wait_until(check, timeout: float, process: Process, what: str, interval: float = 0.3):
    """Poll check() until it returns something truthy; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise process.fail(f"exited with code {process.popen.returncode} while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise process.fail(f"no {what} after {timeout:.0f}s")


@contextmanager
def file_lock(path: Path):
    """Serialise venv creation and DB caching between concurrent test sessions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the Label Studio installation ----------------------------------------------------------------------
def _installed_version(venv: Path) -> str | None:
    for dist in venv.glob("lib/python*/site-packages/label_studio-*.dist-info"):
        return dist.name[len("label_studio-"):-len(".dist-info")]
    return None


def ensure_venv(venv: Path = VENV_DIR) -> Path:
    """The label-studio executable of a venv holding LS_VERSION, created with pip on first use (minutes)."""
    exe = venv / "bin" / "label-studio"
    if exe.is_file() and _installed_version(venv) == LS_VERSION:
        return exe
    with file_lock(CACHE_DIR / "venv.lock"):
        if exe.is_file() and _installed_version(venv) == LS_VERSION:
            return exe
        python = os.environ.get("LS_E2E_PYTHON", sys.executable)  # our tests run on a Python LS supports
        steps = [[python, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                  f"label-studio=={LS_VERSION}"]]
        for step in steps:
            print(f"[e2e] {' '.join(step)}  (first run only; takes a few minutes)", file=sys.stderr)
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise HarnessError(f"cannot install Label Studio {LS_VERSION} into {venv}: {' '.join(step)} "
                                   f"failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        if not exe.is_file() or _installed_version(venv) != LS_VERSION:
            raise HarnessError(f"{venv} still has no label-studio {LS_VERSION} after pip install")
        return exe


def db_cache_dir() -> Path:
    key = hashlib.sha256(f"{USERNAME}:{PASSWORD}:{TOKEN}".encode()).hexdigest()[:12]
    return CACHE_DIR / f"db-{LS_VERSION}-{key}"


# -- a running Label Studio -----------------------------------------------------------------------------
class LabelStudio:
    """One Label Studio server on 127.0.0.1 with a fresh data dir, and thin wrappers over the API the tests use."""

    def __init__(self, exe: Path, workdir: Path):
        self.exe = exe
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.document_root = workdir / "files"  # local files storage lives under here
        self.token = TOKEN
        self.process: Process | None = None
        self.port = 0
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {TOKEN}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_HOST": self.url,
            "LABEL_STUDIO_USERNAME": USERNAME,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def start(self, attempts: int = 3) -> "LabelStudio":
        """Start on a free port from a cached migrated DB (migrating once and caching it on a miss)."""
        cached = db_cache_dir()
        with file_lock(CACHE_DIR / "db.lock"):
            if not (cached / DB_FILES[0]).is_file():
                self._migrate_into(cached)
        for attempt in range(attempts):
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir.mkdir(parents=True)
            self.document_root.mkdir(parents=True, exist_ok=True)
            for name in DB_FILES:
                if (cached / name).is_file():
                    shutil.copy2(cached / name, self.data_dir / name)
            if self._launch(timeout=START_TIMEOUT, log_name=f"label-studio-{attempt}.log"):
                self._check_user()
                return self
        raise self.process.fail(f"never came up on the port it was given after {attempts} tries")

    def _migrate_into(self, cached: Path) -> None:
        """First start on an empty data dir: migrate, create the user and token, stop, keep the DB."""
        print(f"[e2e] migrating a fresh Label Studio {LS_VERSION} DB once, cached in {cached}", file=sys.stderr)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.document_root.mkdir(parents=True, exist_ok=True)
        if not self._launch(timeout=max(START_TIMEOUT, 300), log_name="label-studio-migrate.log"):
            raise self.process.fail("the migrating start did not come up on its port")
        self._check_user()
        self.stop()
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        for name in DB_FILES:
            if (self.data_dir / name).is_file():
                shutil.copy2(self.data_dir / name, tmp / name)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)

    def _launch(self, timeout: float, log_name: str) -> bool:
        """Start the server; False if Label Studio moved to another port than the one it was given."""
        self.port = free_port()
        self.process = Process("label-studio", [str(self.exe), "start", "--no-browser", "--internal-host",
                                                "127.0.0.1", "-p", str(self.port)],
                               self.env(), self.workdir / log_name, cwd=self.workdir)

        def started_port():
            found = STARTED_LINE.search(log_tail(self.process.log, 20000))
            return int(found.group(1)) if found else None

        actual = wait_until(started_port, timeout, self.process, "'Starting development server' line")
        if actual != self.port:
            print(f"[e2e] Label Studio took port {actual} instead of {self.port}; retrying", file=sys.stderr)
            self.stop()
            return False

        def healthy():
            try:
                return self.session.get(f"{self.url}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, timeout, self.process, f"answer from {self.url}/health")
        return True

    def _check_user(self) -> None:
        response = self.session.get(f"{self.url}/api/current-user/whoami", timeout=10)
        if response.status_code != 200 or response.json().get("email") != USERNAME:
            raise self.process.fail(f"the legacy token is not accepted ({response.status_code}): {response.text[:300]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    # -- API --------------------------------------------------------------------------------------------
    def api(self, method: str, path: str, expect: tuple[int, ...] = (200, 201, 204), **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        response = self.session.request(method, f"{self.url}{path}", **kwargs)
        if response.status_code not in expect:
            raise HarnessError(f"{method} {path} answered {response.status_code}: {response.text[:1000]}")
        return response

    def create_project(self, label_config: str, title: str = "e2e") -> dict:
        return self.api("POST", "/api/projects", json={"title": title, "label_config": label_config}).json()

    def import_files(self, project: int, paths: list[Path]) -> dict:
        """Upload image files as tasks; Label Studio needs a distinct multipart field name per file."""
        handles = [open(p, "rb") for p in paths]
        try:
            files = {f"file{i}": (p.name, fh) for i, (p, fh) in enumerate(zip(paths, handles))}
            return self.api("POST", f"/api/projects/{project}/import", files=files).json()
        finally:
            for fh in handles:
                fh.close()

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        return self.api("POST", f"/api/projects/{project}/import", json=tasks).json()

    def add_local_storage(self, project: int, folder: Path) -> dict:
        """A Local Files storage over folder (under the document root), so /data/local-files/ serves it."""
        return self.api("POST", "/api/storages/localfiles", json={
            "project": project, "title": "e2e local files", "path": str(folder), "use_blob_urls": True}).json()

    def put_local_file(self, source: Path, relative: str) -> str:
        """Copy a file under the document root; returns the task URL Label Studio serves it at."""
        target = self.document_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return f"/data/local-files/?d={relative}"

    def tasks(self, project: int) -> list[dict]:
        body = self.api("GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"}).json()
        return body["tasks"] if isinstance(body, dict) else body

    def connect_ml(self, project: int, url: str, title: str = "yolo", basic_auth: tuple[str, str] | None = None,
                   extra_params: dict | None = None) -> dict:
        body = {"url": url, "project": project, "title": title, "auth_method": "NONE", "extra_params": extra_params}
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        return self.api("POST", "/api/ml", json=body).json()

    def ml_backend(self, ml_id: int) -> dict:
        return self.api("GET", f"/api/ml/{ml_id}").json()

    def retrieve_predictions(self, project: int) -> dict:
        return self.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                        json={"selectedItems": {"all": True, "excluded": []}}).json()

    def predictions(self, project: int) -> list[dict]:
        return self.api("GET", "/api/predictions", params={"project": project}).json()

    def create_annotation(self, task: int, result: list[dict]) -> dict:
        return self.api("POST", f"/api/tasks/{task}/annotations", json={"result": result}).json()

    def train(self, ml_id: int) -> requests.Response:
        return self.api("POST", f"/api/ml/{ml_id}/train", json={})

    def webhooks(self, project: int) -> list[dict]:
        return self.api("GET", "/api/webhooks", params={"project": project}).json()

    def set_webhook_headers(self, project: int, backend_url: str, headers: dict[str, str]) -> list[dict]:
        """Label Studio's auto-created ML webhook carries no auth: give it headers (e.g. basic auth)."""
        patched = [self.api("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": headers}).json()
                   for hook in self.webhooks(project) if hook.get("url", "").startswith(backend_url.rstrip("/"))]
        if not patched:
            raise HarnessError(f"project {project} has no webhook to {backend_url}: {self.webhooks(project)}")
        return patched


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- our backend ----------------------------------------------------------------------------------------
class Backend:
    """`python -m ls_backend` as its own process, pointed at a Label Studio."""

    def __init__(self, workdir: Path, ls: LabelStudio, overrides: dict[str, str] | None = None):
        weights = SHARED_DIR / "weights"
        self.workdir = workdir
        self.port = free_port()
        self.model_dir = workdir / "models"
        from ls_backend.settings import Settings

        ours = {name.upper() for name in Settings.model_fields}  # a developer's own settings must not leak in
        env = {k: v for k, v in os.environ.items() if k.upper() not in ours}
        env.update({
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "MODEL_DIR": str(self.model_dir),
            "BASE_MODEL": str(weights / "person-fall-yolov8s.pt"),
            "TRAIN_BASE_MODEL": str(weights / "yolov5nu-coco-backbone.pt"),
            "ALLOW_DOWNLOADS": "false",
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "YOLO_CONFIG_DIR": str(workdir / "ultralytics"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update({k: str(v) for k, v in (overrides or {}).items()})
        self.env = env
        self.auth = (env.get("BASIC_AUTH_USER", ""), env.get("BASIC_AUTH_PASS", ""))
        self.session = requests.Session()
        if any(self.auth):
            self.session.auth = self.auth
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "Backend":
        self.process = Process("backend", [sys.executable, "-m", "ls_backend"], self.env,
                               self.workdir / "backend.log", cwd=REPO_ROOT)

        def health():
            try:
                response = self.session.get(f"{self.url}/health", timeout=2)
            except requests.RequestException:
                return None
            return response.json() if response.status_code == 200 else None

        body = wait_until(health, timeout, self.process, f"200 from {self.url}/health")
        if body.get("base_model_error"):
            raise self.process.fail(f"base model unavailable: {body['base_model_error']}")
        return self

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def ultralytics_asset(name: str) -> Path:
    """Ultralytics' own sample images, found without importing ultralytics (slow, writes a settings file)."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("ultralytics is not installed in the test environment")
    path = Path(list(spec.submodule_search_locations)[0]) / "assets" / name
    if not path.is_file():
        raise HarnessError(f"{path} is missing from the ultralytics package")
    return path
