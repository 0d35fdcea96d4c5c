"""The per-process state that the server, the jobs and the CLI share: settings, models, clients."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import NamedTuple

from model.images import set_max_pixels
from model.policy import Thresholds
from model.project_store import ProjectStore
from model.registry import ProjectRegistry
from model.runtime import available as runtime_unavailable
from model.workspace import Workspace, projects
from model.weights import WeightsUnavailable, resolve_weights
from model.yolo_env import prepare_ultralytics

from .ls_client import LabelStudioClient, LabelStudioError
from .media import MediaFetcher
from .serving import PredictionService
from .settings import Settings
from .sync_state import sync_state

log = logging.getLogger(__name__)


class Served(NamedTuple):
    """What a project's predictions come from."""

    version: str
    weights: Path
    is_base: bool
    imgsz: int
    thresholds: Thresholds
    members: list[Path]  # models whose boxes are fused with the weights' (model.fusion)


class Backend:
    """Everything a request or a job needs, created once per process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        settings.model_dir.mkdir(parents=True, exist_ok=True)
        prepare_ultralytics(settings.ultralytics_dir, settings.allow_downloads)
        set_max_pixels(settings.max_image_pixels)
        if settings.predict_runtime == "openvino" and (reason := runtime_unavailable()):
            raise RuntimeError(f"PREDICT_RUNTIME=openvino, but {reason}: "
                               "pip install the version in requirements.txt, or set PREDICT_RUNTIME=auto")
        self.predictions = PredictionService(self)
        self.models = self.predictions.models  # what /health lists
        self.predict_tasks = self.predictions.predict_tasks  # what /predict and auto-labeling call
        self.sync = sync_state(settings.model_dir, settings.redis_url)  # what the last resync covered
        self._clients: dict[tuple[str, str], LabelStudioClient] = {}
        self._base: Path | None = None
        self.base_error: str | None = None
        self._base_lock = threading.Lock()
        self._warming: threading.Thread | None = None

    # -- projects -------------------------------------------------------------------------------
    def projects(self) -> list[str]:
        """Every project with a folder in MODEL_DIR (the _cache, _weights, ... folders are not projects)."""
        return projects(self.settings.model_dir)

    def workspace(self, project: str) -> Workspace:
        return Workspace(self.settings.model_dir, project)

    def store(self, project: str) -> ProjectStore:
        return ProjectStore(self.settings.model_dir, project)

    def registry(self, project: str) -> ProjectRegistry:
        return ProjectRegistry(self.settings.model_dir, project)

    def client(self, project: str | None = None) -> LabelStudioClient | None:
        """LABEL_STUDIO_URL with its key wins; else the hostname of the last /setup with the token that came with it."""
        s = self.settings
        if s.label_studio_url:
            url, key = s.label_studio_url, s.label_studio_api_key
        else:
            info = self.store(project).info() if project else {}
            url, key = info.get("hostname") or "", info.get("access_token") or ""
        if not url:
            return None
        if (url, key) not in self._clients:
            try:
                self._clients[(url, key)] = LabelStudioClient(url, key)
            except LabelStudioError as exc:
                log.warning("project %s: %s", project, exc)
                return None
        return self._clients[(url, key)]

    def fetcher(self, project: str | None) -> MediaFetcher:
        s = self.settings
        return MediaFetcher(s.media_cache, s.media_hosts, self.client(project), s.media_max_bytes,
                            s.media_timeout, s.local_files_document_root, s.media_cache_max_bytes)

    # -- models ---------------------------------------------------------------------------------
    def base_weights(self) -> Path:
        """The zero-shot model, resolved once; a failure is remembered and shown in /health."""
        with self._base_lock:
            if self._base is None:
                try:
                    self._base = resolve_weights(self.settings.base_model, self.settings.model_dir / "_weights",
                                                 self.settings.allow_downloads)
                    self.base_error = None
                except WeightsUnavailable as exc:
                    self.base_error = str(exc)
                    raise
            return self._base

    def train_base_weights(self) -> Path:
        if self.settings.train_base == self.settings.base_model:
            return self.base_weights()
        return resolve_weights(self.settings.train_base, self.settings.model_dir / "_weights", self.settings.allow_downloads)

    def warm_up(self) -> None:
        """Import Ultralytics now (torch's first import is not thread-safe), then load the base model in the background.

        A local base model with an OpenVINO export is served without torch, so torch is not imported for it.
        """
        local = Path(self.settings.base_model).expanduser()
        if not (local.is_file() and self.models.uses_export(local)):
            import ultralytics  # noqa: F401

        def load() -> None:
            try:
                self.models.get(self.base_weights())
            except Exception as exc:  # shown in /health, never fatal
                self.base_error = self.base_error or f"base model failed to load: {exc}"
                log.error("base model unavailable: %s", self.base_error)
        self._warming = threading.Thread(target=load, name="warm-up", daemon=True)
        self._warming.start()

    def close(self, timeout: float = 60.0) -> None:
        """Let a base model still loading finish (a process that exits under OpenVINO's compile aborts), and stop
        fetching images."""
        if self._warming is not None:
            self._warming.join(timeout)
        self.predictions.io_pool.shutdown(wait=False, cancel_futures=True)

    def model_version(self, project: str) -> str:
        """What Label Studio stores with each prediction; it changes whenever a new version is served."""
        return self.registry(project).current_name() or f"base-{Path(self.settings.base_model).stem}"

    def serving(self, project: str) -> Served:
        """The served version's name, weights, whether it is the base model, image size, box thresholds and the
        models fused with it."""
        s = self.settings
        current = self.registry(project).current()
        if current is not None and current.weights.is_file():
            # Predict at the size the version learned at: objects then look as large as they did in training;
            # and at the thresholds that left the fewest boxes to fix on its held-out tasks.
            imgsz = (current.meta.get("plan") or {}).get("imgsz") or s.predict_imgsz
            return Served(current.name, current.weights, False, imgsz,
                          Thresholds.from_meta(current.meta, s.predict_conf),
                          current.members if s.fuse_fold_models else [])
        return Served(self.model_version(project), self.base_weights(), True, s.predict_imgsz,
                      Thresholds(s.predict_conf, {}), [])
