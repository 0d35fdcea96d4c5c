"""Resolve a weights setting to a local file, downloading an official model only when that is allowed."""
from __future__ import annotations

from pathlib import Path


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be had; the message says which and what to do."""


def resolve_weights(spec: str, download_dir: Path, allow_downloads: bool) -> Path:
    """A path as given, or a bare Ultralytics name fetched once into download_dir."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_absolute() or len(path.parts) > 1:
        raise WeightsUnavailable(f"weights file {spec} does not exist")
    cached = download_dir / path.name
    if cached.is_file():
        return cached
    if not allow_downloads:
        raise WeightsUnavailable(
            f"{spec} is not a local file and downloads are off (ALLOW_DOWNLOADS=false): set BASE_MODEL to a .pt path"
        )
    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        from ultralytics.utils.downloads import attempt_download_asset

        fetched = Path(attempt_download_asset(str(cached)))
    except Exception as exc:  # the network or the release host may be down
        raise WeightsUnavailable(f"could not download {spec}: {exc}; set BASE_MODEL to a local .pt path") from exc
    if not fetched.is_file():
        raise WeightsUnavailable(f"could not download {spec}; set BASE_MODEL to a local .pt path")
    return fetched
