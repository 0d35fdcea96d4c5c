"""Give Label Studio's auto-created webhook our basic-auth header: Label Studio creates it without one."""
from __future__ import annotations

import base64
import logging
import threading
from urllib.parse import urlsplit

from .ls_client import LabelStudioClient, LabelStudioError

log = logging.getLogger(__name__)

# Label Studio creates the webhook only after our /setup answered its connect call, so look again a few times.
RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def basic_auth_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def points_at(url: object, netloc: str) -> bool:
    """Whether a webhook URL is <this backend, as Label Studio reaches it>/webhook."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
    except ValueError:
        return False
    return parts is not None and parts.netloc.lower() == netloc and parts.path.rstrip("/").endswith("/webhook")


class WebhookAuth:
    """Patches each project's webhook once per process, in a background thread, so /setup (3 s) never waits."""

    def __init__(self, client: LabelStudioClient, header: str):
        self.client = client
        self.header = header
        self._done: set[tuple[str, str]] = set()
        self._running: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def ensure(self, project: str, netloc: str) -> bool:
        """Start patching the project's webhook to netloc (the Host Label Studio called us at); False if no need."""
        key = (project, netloc.lower())
        with self._lock:
            if not netloc or key in self._done or key in self._running:
                return False
            self._running.add(key)
        threading.Thread(target=self._run, args=key, name=f"webhook-auth-{project}", daemon=True).start()
        return True

    def _run(self, project: str, netloc: str) -> None:
        try:
            for delay in (0.0, *RETRY_SECONDS):
                if self._stop.wait(delay):
                    return
                try:
                    if self.patch(project, netloc):
                        with self._lock:
                            self._done.add((project, netloc))
                        return
                except LabelStudioError as exc:
                    log.warning("project %s: cannot give the webhook our credentials yet: %s", project, exc)
            log.warning("project %s: Label Studio has no webhook to %s/webhook; annotations will not arrive until "
                        "it carries our basic-auth header (see README, Connect it to Label Studio)", project, netloc)
        finally:
            with self._lock:
                self._running.discard((project, netloc))

    def patch(self, project: str, netloc: str) -> bool:
        """Give every webhook of the project that points at us our Authorization header; False if none does."""
        ours = [hook for hook in self.client.webhooks(project)
                if isinstance(hook, dict) and points_at(hook.get("url"), netloc)]
        for hook in ours:
            headers = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
            if headers.get("Authorization") != self.header:
                kept = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                self.client.patch_webhook(hook["id"], {**kept, "Authorization": self.header})
                log.info("project %s: webhook %s to %s now carries our basic-auth header", project, hook["id"],
                         hook["url"])
        return bool(ours)

    def close(self) -> None:
        self._stop.set()
