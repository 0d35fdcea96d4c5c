"""Talk to Label Studio's API with whichever token the user has."""
from __future__ import annotations

import logging
import threading
import time

import requests
from urllib3.util.retry import Retry

from .netpolicy import AddressPolicy, AddressRefused, Origin, PinnedAdapter, Resolver, parse_origin

log = logging.getLogger(__name__)

ACCESS_TOKEN_SECONDS = 240  # Label Studio's access tokens live 5 minutes; refresh before that.


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused us; the message says which."""


def http_session(policy: AddressPolicy) -> requests.Session:
    """A session that connects only where the policy allows, and retries idempotent calls on connection errors and 5xx."""
    session = requests.Session()
    # No proxies or .netrc credentials from the environment: the policy needs direct connections, and no secret
    # may reach a host it was not configured for.
    session.trust_env = False
    # POST is not retried: a prediction stored before the connection dropped must not be stored twice.
    retry = Retry(total=3, backoff_factor=0.3, status_forcelist=(502, 503, 504))
    for scheme in ("http://", "https://"):
        session.mount(scheme, PinnedAdapter(policy, max_retries=retry, pool_maxsize=16))
    return session


def setup_connection(hostname: str | None, access_token: str | None) -> dict[str, str]:
    """What /setup stores: a token only together with the hostname it came with, so it never follows another host."""
    if not hostname:
        return {}
    return {"hostname": hostname, "access_token": access_token or ""}


def is_personal_access_token(key: str) -> bool:
    """Personal access tokens are JWTs (three dot-separated parts); legacy tokens are 40 hex chars."""
    return key.count(".") == 2


class LabelStudioClient:
    """API calls plus the Authorization header for Label Studio's own media URLs."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, resolver: Resolver | None = None):
        if not url:
            raise LabelStudioError("no Label Studio URL: set LABEL_STUDIO_URL or connect the backend from Label Studio")
        self.url = url.rstrip("/")
        try:
            self.origin: Origin = parse_origin(self.url)
        except AddressRefused as exc:
            raise LabelStudioError(f"unusable Label Studio URL: {exc}") from exc
        self.api_key = api_key
        self.timeout = timeout
        # Label Studio's own host may be loopback or private: the user (or Label Studio itself) named it.
        self.session = http_session(AddressPolicy([self.origin.netloc], resolver))
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def owns(self, url: str) -> bool:
        """Whether a URL is on Label Studio's own origin: only those requests carry its token."""
        try:
            return parse_origin(url) == self.origin
        except AddressRefused:
            return False

    def auth_header(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not is_personal_access_token(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if self._access is None or self._access[1] < time.monotonic():
                self._access = (self._refresh(), time.monotonic() + ACCESS_TOKEN_SECONDS)
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self) -> str:
        try:
            response = self.session.post(f"{self.url}/api/token/refresh/", json={"refresh": self.api_key}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: {exc}") from exc
        if response.status_code != 200:
            raise LabelStudioError(f"Label Studio refused the personal access token ({response.status_code}): {response.text[:200]}")
        return response.json()["access"]

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {**kwargs.pop("headers", {}), **self.auth_header()}
        try:
            response = self.session.request(method, f"{self.url}{path}", headers=headers, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise LabelStudioError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        return response

    def export_tasks(self, project: int | str) -> list[dict]:
        """Every task of the project with its annotations, as the Train button needs."""
        return self.request("GET", f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": "true"}, timeout=300).json()

    def project(self, project: int | str) -> dict:
        return self.request("GET", f"/api/projects/{project}").json()

    def iter_tasks(self, project: int | str, page_size: int = 100):
        """All tasks of a project, page by page, with their annotations and predictions."""
        page = 1
        while True:
            try:
                body = self.request("GET", "/api/tasks", params={"project": project, "page": page, "page_size": page_size, "fields": "all"}).json()
            except LabelStudioError as exc:
                if "404" in str(exc) and page > 1:
                    return
                raise
            tasks = body.get("tasks", body) if isinstance(body, dict) else body
            if not tasks:
                return
            yield from tasks
            if isinstance(body, dict) and body.get("total") is not None and page * page_size >= body["total"]:
                return
            page += 1

    def create_prediction(self, task: int, result: list[dict], score: float, model_version: str) -> dict:
        return self.request("POST", "/api/predictions", json={"task": task, "result": result, "score": score, "model_version": model_version}).json()

    def webhooks(self, project: int | str) -> list[dict]:
        return self.request("GET", "/api/webhooks", params={"project": project}).json()

    def patch_webhook(self, webhook: int, headers: dict[str, str]) -> dict:
        return self.request("PATCH", f"/api/webhooks/{webhook}", json={"headers": headers}).json()
