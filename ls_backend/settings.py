"""Every setting of the backend, read once from environment variables."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.compute import default_job_concurrency

from .netpolicy import AddressRefused, host_entry, parse_origin


class Settings(BaseSettings):
    """One place for configuration so the server, workers and CLI agree."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 9090
    log_level: str = "INFO"

    model_dir: Path = Path("./models")
    cache_dir: Path | None = None
    yolo_config_dir: Path | None = None
    allow_downloads: bool = True

    base_model: str = "yolo11n.pt"
    train_base_model: str | None = None
    segment_base_model: str = ""  # "" seeds each kind's model from TRAIN_BASE_MODEL's backbone (offline)
    classify_base_model: str = ""
    pose_base_model: str = ""
    obb_base_model: str = ""
    device: str = ""
    predict_imgsz: int = 640
    predict_conf: float = 0.25
    predict_batch: int = 4
    # auto: a version's OpenVINO export (made by its training job) predicts when present and importable, else
    # PyTorch; openvino: the same, and the server refuses to start without the openvino package; pytorch: never.
    predict_runtime: Literal["auto", "openvino", "pytorch"] = "auto"
    # "": OpenVINO's default for the CPU (bf16 where the CPU computes it natively, else f32); f32: PyTorch's boxes exactly.
    openvino_precision: Literal["", "f32", "bf16"] = ""
    max_image_pixels: int = 50_000_000

    label_studio_url: str = ""
    label_studio_api_key: str = ""
    allowed_media_hosts: str = ""
    local_files_document_root: Path | None = None
    media_max_bytes: int = 50 * 1024 * 1024
    media_timeout: float = 15.0
    media_cache_max_bytes: int = 2 * 1024 * 1024 * 1024

    job_concurrency: int = Field(default_factory=default_job_concurrency, ge=1)
    redis_url: str = ""
    queue_name: str = "ls-yolo-train"
    job_timeout: int = 3600

    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    allow_unauthenticated: bool = False
    max_body_bytes: int = 32 * 1024 * 1024
    max_predict_tasks: int = 1000

    min_annotations: int = 10
    retrain_every: int = 5
    train_epochs: int = 0
    train_imgsz: int = 0
    train_time_budget: float = 45.0
    refine_time_budget: float = 240.0
    refine_rounds: int = 2
    crosscheck: bool = True
    fuse_fold_models: bool = True
    self_training: bool = True
    train_freeze: int = -1
    train_batch: int = 4
    accept_only_if_not_worse: bool = True
    keep_versions: int = 5
    autolabel_after_train: bool = True

    @field_validator("model_dir", "cache_dir", "yolo_config_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @field_validator("allowed_media_hosts", mode="after")
    @classmethod
    def _hosts(cls, value: str) -> str:
        """A typo in the allow-list is a startup error, not a silently refused image."""
        for entry in value.split(","):
            if entry.strip():
                host_entry(entry)
        return value

    @field_validator("label_studio_url", mode="after")
    @classmethod
    def _url(cls, value: str) -> str:
        """A URL the address policy would refuse at every call is refused once, at startup."""
        try:
            if value:
                parse_origin(value)
        except AddressRefused as exc:
            raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _key_needs_url(self) -> "Settings":
        """The key came with LABEL_STUDIO_URL; without it, it would follow whatever hostname /setup names."""
        if self.label_studio_api_key and not self.label_studio_url:
            raise ValueError("LABEL_STUDIO_API_KEY is sent only to LABEL_STUDIO_URL: set LABEL_STUDIO_URL too")
        return self

    @property
    def exports_versions(self) -> bool:
        """Training jobs export promoted versions to OpenVINO when a CPU server would predict with the export."""
        return self.predict_runtime != "pytorch" and self.device in ("", "cpu")

    @property
    def media_cache(self) -> Path:
        return (self.cache_dir or self.model_dir / "_cache") / "media"

    @property
    def ultralytics_dir(self) -> Path:
        return self.yolo_config_dir or self.model_dir / "_ultralytics"

    @property
    def train_base(self) -> str:
        return self.train_base_model or self.base_model

    def kind_base(self, task: str) -> str:
        """The weights a polygon, choices, keypoint or rotated-box model starts from: its own setting, else the boxes'."""
        return getattr(self, f"{task}_base_model", "") or self.train_base

    @property
    def media_hosts(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_media_hosts.split(",") if h.strip()]


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings are read once per process; tests clear this cache after changing the environment."""
    return Settings()
