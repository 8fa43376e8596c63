"""Settings of the service, the CLI and the tools: the one reader of the ``ELGS_*`` environment (pydantic-settings).

Every other module takes its values from :class:`Settings` (the model registry through
``elgs.cli.zoo_options``, the compute threads through :func:`elgs.compute.torch_threads`, the thresholds
through :func:`elgs.thresholds.user_calibration_path`); none reads ``os.environ`` for an ``ELGS_`` name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CPU_MAX_BATCH_SIZE = 4
CUDA_MAX_BATCH_SIZE = 32


class Settings(BaseSettings):
    """Everything ``elgs serve`` and :func:`elgs.api.create_app` can be told.

    Every field is read from the environment variable ``ELGS_<FIELD>`` (``ELGS_MODELS=vgg16,inception_v3``,
    ``ELGS_MAX_BATCH_SIZE=8``, ``ELGS_API_KEY=...``); keyword arguments override the environment.
    """

    model_config = SettingsConfigDict(env_prefix="ELGS_", extra="ignore")

    models: Annotated[list[str], NoDecode] = Field(
        default=["vgg16", "inception_v3"],
        description="zoo models to load, comma separated; the first is the default of every endpoint")
    weights: Literal["pretrained", "random"] = Field(
        default="pretrained", description="'random' is for development and tests only")
    weights_dir: Path | None = Field(default=None, description="directory holding local weight files")
    allow_download: bool = Field(default=True, description="download missing torchvision weights (0: fail fast)")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    input_size: int | None = Field(default=None, ge=32, le=1024, description="square input side (default: per model)")
    host: str = Field(default="127.0.0.1", description="address uvicorn binds")
    port: int = Field(default=8000, ge=0, le=65535)
    max_batch_size: int | None = Field(
        default=None, ge=1, le=1024,
        description=f"requests per batch (default: {CUDA_MAX_BATCH_SIZE} on CUDA, {CPU_MAX_BATCH_SIZE} on CPU)")
    max_batch_rows: int | None = Field(
        default=None, ge=1, le=65536,
        description="pass-1 rows per batch, SmoothGrad's n copies of a request counting each (default: 8 on CPU, "
                    "8 x max_batch_size on CUDA)")
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000,
                               description="a batch closes this long after its first request")
    max_queue: int = Field(default=256, ge=1, description="requests waiting per model before 503")
    request_timeout_s: float = Field(default=30.0, gt=0, description="per-request deadline before 504")
    max_upload_mb: float = Field(default=20.0, gt=0, description="largest upload in MiB before 413")
    max_pixels: int = Field(default=40_000_000, ge=1, description="largest image in pixels before 413")
    body_timeout_s: float = Field(default=30.0, gt=0, description="time to receive a request body before 408")
    max_connections: int = Field(default=1000, ge=1,
                                 description="HTTP requests in progress before 503 (health and metrics exempt); uvicorn "
                                             "keeps 64 more connections open for idle clients and probes")
    decode_concurrency: int | None = Field(
        default=None, ge=1, le=64, description="uploads decoded at once (default: one per core, at most 4)")
    api_key: SecretStr | None = Field(
        default=None, description="when set, every endpoint but health and metrics needs 'Authorization: Bearer <key>'")
    warmup: bool = Field(default=True, description="run one batch per model before /health/ready says ready")
    # Compute placement and the fast path (issue 8; DESIGN 8, docs/deploy.md).
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024,
        description="torch intra-op threads of each model's compute thread (default: the cores this process may use)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="autocast dtype of the two model passes (the defences stay float32)")
    malloc_tuning: bool = Field(
        default=True, description="glibc malloc keeps freed memory for the next model pass instead of unmapping it "
                                  "(elgs.compute.tune_allocator: about 25% faster passes on CPU, up to 1 GiB kept)")
    calibration_file: Path | None = Field(
        default=None, description="attack-score thresholds written by `elgs calibrate` "
                                  "(default: $XDG_CONFIG_HOME/elgs/calibration.json, else ~/.config/elgs/...)")
    compile: bool = Field(default=False, description="torch.compile each model, warmed up over the batch sizes")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",")]
        if isinstance(value, (list, tuple)):
            value = [name for name in value if name]
            if not value:
                raise ValueError("name at least one model, e.g. ELGS_MODELS=efficientnet_lite0")
        return value

    @field_validator("calibration_file", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", mode="after")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def batch_size_for(self, device: torch.device) -> int:
        """``max_batch_size`` or the default for ``device``."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return CUDA_MAX_BATCH_SIZE if device.type == "cuda" else CPU_MAX_BATCH_SIZE


def read_settings(**overrides) -> Settings:
    """:class:`Settings` from the environment and ``overrides``, or a ValueError that names each bad one.

    Raises:
        ValueError: ``invalid setting: max_batch_size (ELGS_MAX_BATCH_SIZE): ... (got 0)``, one entry per problem.
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))} (ELGS_{str(e['loc'][0]).upper() if e['loc'] else '?'}): {e['msg']} "
            f"(got {e.get('input')!r})" for e in error.errors())
        raise ValueError(f"invalid setting: {problems}") from None
