"""Fetch task images safely: only from Label Studio or allowed hosts, bounded, cached."""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import cv2
import numpy as np
import requests

from .ls_client import LabelStudioClient, http_session

log = logging.getLogger(__name__)

_METADATA_HOSTS = {"metadata.google.internal", "metadata", "169.254.169.254", "fd00:ec2::254", "100.100.100.200"}


class MediaError(RuntimeError):
    """One task's image cannot be had; the message says why, the rest of the batch goes on."""


def _refused_address(host: str) -> bool:
    """Link-local and cloud metadata addresses are never fetched, whatever the allow-list says."""
    if host in _METADATA_HOSTS:
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if address.is_link_local or str(address) in _METADATA_HOSTS:
            return True
    return False


class MediaFetcher:
    """Turns a task's image reference into a local file path."""

    def __init__(self, cache_dir: Path, allowed_hosts: list[str], client: LabelStudioClient | None,
                 max_bytes: int, timeout: float, local_root: Path | None = None):
        self.cache_dir = cache_dir
        self.allowed_hosts = allowed_hosts
        self.client = client
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.local_root = local_root.resolve() if local_root else None
        self.session = client.session if client else http_session()

    def resolve(self, ref: str) -> str:
        """An absolute URL for a Label Studio path or a URL, refused unless its host is allowed."""
        if not isinstance(ref, str) or not ref.strip():
            raise MediaError("the task has no image reference")
        ref = ref.strip()
        if ref.startswith("/"):
            if self.client is None:
                raise MediaError(f"{ref} is a Label Studio path but no Label Studio URL is known")
            return urljoin(self.client.url + "/", ref.lstrip("/"))
        parts = urlsplit(ref)
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"refused {parts.scheme or 'schemeless'} URL {ref[:100]}: only http(s) is fetched")
        host = (parts.hostname or "").lower()
        if not self._allowed(parts.netloc.lower(), host):
            raise MediaError(f"refused host {host}: not Label Studio and not in ALLOWED_MEDIA_HOSTS")
        return ref

    def _allowed(self, netloc: str, host: str) -> bool:
        if _refused_address(host):
            return False
        if self.client is not None and netloc == self.client.netloc:
            return True
        return netloc in self.allowed_hosts or host in self.allowed_hosts

    def _local_file(self, url: str) -> Path | None:
        """Serve /data/local-files/ straight from disk when the document root is mounted here too."""
        if self.local_root is None or self.client is None:
            return None
        parts = urlsplit(url)
        if parts.netloc.lower() != self.client.netloc or not parts.path.startswith("/data/local-files"):
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
        if target.is_file():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        headers = self.client.auth_header() if self.client and urlsplit(url).netloc.lower() == self.client.netloc else {}
        deadline = time.monotonic() + self.timeout
        try:
            with self.session.get(url, headers=headers, stream=True, timeout=min(self.timeout, 10.0), allow_redirects=False) as response:
                if response.status_code != 200:
                    raise MediaError(f"{url} answered {response.status_code}")
                fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
                size = 0
                with os.fdopen(fd, "wb") as fh:
                    for chunk in response.iter_content(1 << 16):
                        size += len(chunk)
                        if size > self.max_bytes:
                            os.unlink(tmp)
                            raise MediaError(f"{url} is larger than MEDIA_MAX_BYTES={self.max_bytes}")
                        if time.monotonic() > deadline:
                            os.unlink(tmp)
                            raise MediaError(f"{url} took longer than MEDIA_TIMEOUT={self.timeout}s")
                        fh.write(chunk)
                os.replace(tmp, target)
        except requests.RequestException as exc:
            raise MediaError(f"cannot download {url}: {exc}") from exc
        return target


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to BGR, or say that it is not one."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise MediaError(f"{path.name} is not a readable image")
    return image


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise MediaError(f"{path.name} is not a readable image") from exc
    return height, width
