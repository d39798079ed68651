"""Service configuration: one pydantic model that rejects unknown keys, loadable from YAML."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from edge_service.const import DEFAULT_BUNDLE_DIR, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT


class ServiceConfig(BaseModel):
    """Everything the edge service can be told. Unknown keys are an error, not ignored."""

    model_config = ConfigDict(extra="forbid")

    bundle: Path = Field(DEFAULT_BUNDLE_DIR, description="model bundle folder to serve")
    host: str = Field("0.0.0.0", description="address the gRPC port binds")
    port: int = Field(
        DEFAULT_GRPC_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one"
    )
    metrics_host: str = Field("0.0.0.0", description="address the /metrics port binds")
    metrics_port: int = Field(
        DEFAULT_METRICS_PORT,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; 0 picks a free one",
    )
    num_threads: int | None = Field(
        None, ge=1, le=64, description="interpreter threads; default all cores"
    )
    max_workers: int = Field(8, ge=1, le=256, description="gRPC worker threads")
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request the gRPC port accepts"
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="largest decoded image (width x height) accepted"
    )
    confidence_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="below this best score an answer is unsure"
    )
    grace_seconds: float = Field(5.0, ge=0.0, description="time calls in flight get at shutdown")


def load_config(path: Path | None = None, **overrides: object) -> ServiceConfig:
    """Read a YAML config file (optional) and apply non-None overrides on top."""
    data: dict[str, object] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        data.update(loaded)
    data.update({key: value for key, value in overrides.items() if value is not None})
    return ServiceConfig.model_validate(data)
