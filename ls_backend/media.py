"""Fetch task images safely: only from Label Studio or allowed hosts, bounded, cached."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import requests

from .ls_client import LabelStudioClient, http_session
from .netpolicy import AddressPolicy, AddressRefused, Resolver, WallClock, parse_origin

log = logging.getLogger(__name__)


class MediaError(RuntimeError):
    """One task's image cannot be had; the message says why, the rest of the batch goes on."""


class MediaFetcher:
    """Turns a task's image reference into a local file path."""

    def __init__(self, cache_dir: Path, allowed_hosts: list[str], client: LabelStudioClient | None,
                 max_bytes: int, timeout: float, local_root: Path | None = None, cache_max_bytes: int = 2 << 30,
                 resolver: Resolver | None = None):
        self.cache_dir = cache_dir
        self.client = client
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.cache_max_bytes = cache_max_bytes
        self.local_root = local_root.resolve() if local_root else None
        self.policy = AddressPolicy(([client.origin.netloc] if client else []) + list(allowed_hosts), resolver)
        self.session = http_session(self.policy)

    def resolve(self, ref: str) -> str:
        """An absolute URL for a Label Studio path or a URL, refused unless its host is Label Studio or allowed."""
        if not isinstance(ref, str) or not ref.strip():
            raise MediaError("the task has no image reference")
        url = ref.strip()
        if url.startswith("/"):
            if self.client is None:
                raise MediaError(f"{url[:100]} is a Label Studio path but no Label Studio URL is known")
            url = urljoin(self.client.url + "/", url.lstrip("/"))
        try:
            origin = parse_origin(url)
        except AddressRefused as exc:
            raise MediaError(str(exc)) from exc
        if not self.policy.trusts(origin):
            raise MediaError(f"refused host {origin.host}: not Label Studio and not in ALLOWED_MEDIA_HOSTS")
        return url

    def _local_file(self, url: str) -> Path | None:
        """Serve /data/local-files/ straight from disk when the document root is mounted here too."""
        if self.local_root is None or self.client is None or not self.client.owns(url):
            return None
        parts = urlsplit(url)
        if not parts.path.startswith("/data/local-files"):
            return None
        relative = unquote(parse_qs(parts.query).get("d", [""])[0])
        path = (self.local_root / relative).resolve()
        if self.local_root not in path.parents or not path.is_file():
            return None
        return path

    def fetch(self, ref: str) -> Path:
        """A cached local copy of the image, downloaded once within the size and time bounds."""
        url = self.resolve(ref)
        local = self._local_file(url)
        if local is not None:
            return local
        target = self.cache_dir / hashlib.sha256(url.encode()).hexdigest()[:32]
        try:
            _touch(target)  # a hit is a use: eviction goes by modification time
            return target
        except FileNotFoundError:
            pass
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        headers = self.client.auth_header() if self.client and self.client.owns(url) else {}
        self._download(url, headers, target)
        if _usage.add(self.cache_dir, target.stat().st_size, self.cache_max_bytes):
            _usage.counted(self.cache_dir, self._evict(keep=target))
        return target

    def _download(self, url: str, headers: dict[str, str], target: Path) -> None:
        """Write the body to a temporary file and move it into place only when complete; nothing partial stays."""
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, WallClock(self.timeout) as clock:
                try:
                    self._copy(url, headers, out)
                except requests.RequestException as exc:
                    if not clock.expired:
                        raise MediaError(f"cannot download {url}: {exc}") from exc
                if clock.expired:
                    raise MediaError(f"{url} took longer than MEDIA_TIMEOUT={self.timeout}s")
            os.replace(tmp, target)
            _touch(target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _copy(self, url: str, headers: dict[str, str], out) -> None:
        with self.session.get(url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=False) as response:
            if response.status_code != 200:
                redirect = " (redirects are not followed)" if response.is_redirect else ""
                raise MediaError(f"{url} answered {response.status_code}{redirect}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise MediaError(f"{url} is larger than MEDIA_MAX_BYTES={self.max_bytes}")
            size = 0
            for chunk in response.iter_content(1 << 16):
                size += len(chunk)
                if size > self.max_bytes:
                    raise MediaError(f"{url} is larger than MEDIA_MAX_BYTES={self.max_bytes}")
                out.write(chunk)

    def _evict(self, keep: Path) -> int:
        """Delete least recently used files until the cache fits MEDIA_CACHE_MAX_BYTES, and partial files left by a
        killed process (older than any download may last); the bytes left."""
        files, now = [], time.time()
        for entry in os.scandir(self.cache_dir):
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if entry.name.startswith(".part-"):
                if now - stat.st_mtime > self.timeout + 60:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.is_file() and entry.path != str(keep):
                files.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in files) + keep.stat().st_size
        for _, size, path in sorted(files):
            if total <= self.cache_max_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= size
        return total


class _CacheUsage:
    """Bytes in each cache folder as this process last counted them plus what it wrote since: the folder is listed
    again only when it may be over its bound, or after a minute, as other processes write to it too."""

    RESCAN_SECONDS = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._folders: dict[Path, tuple[float, int]] = {}

    def add(self, folder: Path, size: int, limit: int) -> bool:
        """Count a new file; whether the folder is due for eviction."""
        with self._lock:
            counted_at, used = self._folders.get(folder, (-math.inf, 0))
            self._folders[folder] = (counted_at, used + size)
        return used + size > limit or time.monotonic() - counted_at > self.RESCAN_SECONDS

    def counted(self, folder: Path, used: int) -> None:
        with self._lock:
            self._folders[folder] = (time.monotonic(), used)


_usage = _CacheUsage()


def _touch(path: Path) -> None:
    """Mark a use with the precise clock: the file system's own timestamps are only as fine as a kernel tick."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))
