"""See it work: Prometheus metrics on the API, a worker and `postroom beat`, Flower's API, the
`postroom status` snapshot, the Grafana dashboard's queries and the JSON logs, all against the real
processes the session starts (plus a beat and a Flower of this module's own)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import postroom.metrics
import postroom.postgres_metrics
from postroom.db.models import Job, Shard
from postroom.domain import SHARD_CLAIMABLE, ShardState
from postroom.settings import Settings
from postroom_cli.client import Client
from postroom_cli.local import free_port, http_ok, postroom_command, spawn, stop
from tests.helpers import LABELS, make_docs, wait_for_status, write_jsonl
from tests.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")
ROOT = Path(__file__).resolve().parents[2]
FLOWER_AUTH = ("watcher", "s3cret-pass")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)


def labelsets(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(have) for (n, have), _ in samples.items() if n == name]


@pytest.fixture(scope="module")
def beat_metrics(env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """`postroom beat` as compose runs it, serving its metrics on a free port."""
    port = free_port()
    proc = spawn(
        postroom_command("beat"),
        env={**env, "POSTROOM_BEAT_METRICS_PORT": str(port)},
        log=logs_dir / "beat-observability.log",
    )
    url = f"http://127.0.0.1:{port}/metrics"
    wait_until(lambda: http_ok(url), timeout=60, what="beat metrics up", alive=proc)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def flower_url(env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    """`postroom flower` as compose runs it (basic auth), on a free port."""
    port = free_port()
    proc = spawn(
        postroom_command("flower", "--port", str(port)),
        env={**env, "POSTROOM_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)},
        log=logs_dir / "flower.log",
    )
    url = f"http://127.0.0.1:{port}"

    def sees_workers() -> bool:
        # Worker heartbeats are events: once Flower lists a worker, its event receiver is on.
        response = httpx.get(f"{url}/workers", params={"json": 1}, auth=FLOWER_AUTH, timeout=5)
        return response.status_code == 200 and bool(response.json().get("data"))

    wait_until(sees_workers, timeout=60, what="Flower receiving events", alive=proc)
    yield url
    stop(proc)


def submit(client: Client, tmp: Path, docs: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    path = write_jsonl(tmp / f"{uuid.uuid4().hex}.jsonl", docs)
    return client.upload(path, {"labels": ",".join(LABELS), "model": "tiny", **params})


def _waiting_shards(sessions: sessionmaker[Session], queue: str) -> list[tuple[Any, ...]]:
    with sessions() as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.created_at, Shard.shard_no, Shard.state, Shard.attempt)
            .join(Job, Job.id == Shard.job_id)
            .where(Shard.queue == queue, Shard.state.in_([*SHARD_CLAIMABLE, ShardState.running]))
            .limit(20)
        ).all()
    return [tuple(row) for row in rows]


def marked_docs(count: int, marker: str, *, seed: int) -> list[dict[str, Any]]:
    """Documents carrying `marker` in their text, so logs can be searched for document text."""
    return [{**d, "text": f"{d['text']} {marker}"} for d in make_docs(count, seed=seed)]


def test_metrics_move_during_a_job(
    client: Client,
    api_url: str,
    settings: Settings,
    worker: subprocess.Popen[bytes],
    beat_metrics: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
) -> None:
    worker_url = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
    api_metrics = f"{api_url}/metrics"
    before = scrape(worker_url)
    # The port is the session worker's (not another worker's that started with the same env).
    [info] = labelsets(before, "postroom_worker_info")
    assert info["name"].endswith(f":{worker.pid}"), info
    assert info["route"] == "gpu"

    # When a job of 30 shards runs on the worker
    job = submit(client, tmp_path, marked_docs(3000, "obsmarker1", seed=11))
    depth = scrape(api_metrics)
    assert value(depth, "postroom_queue_depth_shards", queue="gpu.tiny") > 0
    assert value(depth, "postroom_queue_depth_documents", queue="gpu.tiny") > 0

    def engine_busy() -> bool:
        return value(scrape(worker_url), "postroom_engine_inflight_requests", model="tiny") > 0

    wait_until(engine_busy, timeout=120, what="requests in the tiny engine")
    during = scrape(worker_url)
    occupancy = value(during, "postroom_engine_batch_occupancy_ratio", model="tiny")
    assert 0 < occupancy <= 1
    assert value(during, "postroom_engine_max_num_seqs", model="tiny") == 32
    # A second job whose prompt cannot fit the model: every document fails with a reason
    body = {
        "labels": LABELS,
        "model": "tiny",
        "instructions": "classify this document " * 800,
        "documents": make_docs(10, seed=12),
    }
    failing = client.http.post("/v1/jobs", json=body).raise_for_status().json()
    done = wait_for_status(client, job["id"], timeout=240)
    assert done["status"] == "completed"
    assert wait_for_status(client, failing["id"])["counts"]["failed"] == 10

    # Then the worker's counters moved by exactly what was committed, with route and model
    after = scrape(worker_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    gpu_tiny = {"route": "gpu", "model": "tiny"}
    assert delta("postroom_documents_total", outcome="succeeded", **gpu_tiny) == 3000
    assert delta("postroom_documents_total", outcome="failed", **gpu_tiny) == 10
    assert delta("postroom_document_failures_total", reason="prompt_layout") == 10
    assert delta("postroom_tokens_total", direction="in", **gpu_tiny) > 3000
    assert delta("postroom_shard_seconds_count", **gpu_tiny) == 31
    assert delta("postroom_shard_seconds_sum", **gpu_tiny) > 0
    assert delta("postroom_shards_total", route="gpu", outcome="committed") == 31
    assert delta("postroom_spend_dollars_total", route="gpu") > 0
    assert delta("postroom_engine_requests_total", model="tiny") >= 3000
    assert delta("postroom_engine_prompt_tokens_total", model="tiny") > 0
    # What the prefix cache served (vLLM's CPU backend may report 0 cached tokens).
    assert delta("postroom_engine_cached_prompt_tokens_total", model="tiny") >= 0
    assert {"model": "tiny"} in labelsets(after, "postroom_engine_cached_prompt_tokens_total")
    assert value(after, "postroom_engine_inflight_requests", model="tiny") == 0

    # The API counts the deployment from Postgres: the queue drains to 0, workers are alive
    def drained() -> Samples | None:
        samples = scrape(api_metrics)
        return (
            samples
            if value(samples, "postroom_queue_depth_shards", queue="gpu.tiny") == 0
            else None
        )

    try:
        api = wait_until(drained, timeout=90, what="gpu.tiny queue depth back to 0")
    except TimeoutError as e:  # say what still waits: it is the whole deployment's queue
        raise AssertionError(f"{e}; waiting: {_waiting_shards(sessions, 'gpu.tiny')}") from e
    assert value(api, "postroom_queue_depth_documents", queue="gpu.tiny") == 0
    assert value(api, "postroom_queue_running_shards", queue="gpu.tiny") == 0
    assert {"queue": "spill"} in labelsets(api, "postroom_queue_depth_shards")
    assert value(api, "postroom_workers_alive", route="gpu") >= 1
    assert value(api, "postroom_postgres_up") == 1
    assert 0 <= value(api, "postroom_spill_ratio") <= 1
    upload = {"method": "POST", "route": "/v1/jobs/upload"}
    assert value(api, "postroom_http_requests_total", status="201", **upload) >= 1
    assert value(api, "postroom_http_request_seconds_count", **upload) >= 1
    inline = {"method": "POST", "route": "/v1/jobs"}
    assert value(api, "postroom_http_requests_total", status="201", **inline) >= 1

    # And beat serves the reaper's and the router's counters (from its first reaper tick on,
    # which a loaded machine may not have reached yet)
    def reaper_counted() -> Samples | None:
        samples = scrape(beat_metrics)
        return samples if labelsets(samples, "postroom_reaper_actions_total") else None

    beat = wait_until(reaper_counted, timeout=60, what="the reaper's counters on beat")
    actions = {labels["action"] for labels in labelsets(beat, "postroom_reaper_actions_total")}
    assert actions == {"expired", "republished", "rewritten", "trimmed", "withdrawn"}


def test_flower_shows_shard_tasks_by_job_and_shard(
    client: Client, flower_url: str, tmp_path: Path
) -> None:
    assert httpx.get(f"{flower_url}/api/tasks", timeout=5).status_code == 401
    wrong = httpx.get(f"{flower_url}/api/tasks", auth=("watcher", "nope"), timeout=5)
    assert wrong.status_code == 401

    job = submit(client, tmp_path, make_docs(300, seed=21))
    wait_for_status(client, job["id"])

    seen: list[tuple[str, str, str]] = []
    shadows = [f"postroom.classify_shard[{job['id']}/{n:06d}]" for n in range(3)]

    def shard_tasks() -> dict[str, dict[str, Any]] | None:
        response = httpx.get(
            f"{flower_url}/api/tasks", params={"limit": 1000}, auth=FLOWER_AUTH, timeout=5
        )
        response.raise_for_status()
        tasks = [t for t in response.json().values() if job["id"] in (t.get("args") or "")]
        seen[:] = [(t.get("name"), t.get("args"), t.get("state")) for t in tasks]
        # A shard's message may be delivered more than once (a retry, a republish): one
        # successful task per shard is what counts.
        by_args = {t["args"]: t for t in tasks if t.get("state") == "SUCCESS"}
        return by_args if len(by_args) == 3 else None

    try:
        tasks = wait_until(shard_tasks, timeout=30, what="Flower lists the job's 3 shard tasks")
    except TimeoutError as e:
        raise AssertionError(f"{e}; Flower has {seen}") from e
    assert sorted(tasks) == sorted(repr((job["id"], n)) for n in range(3))
    # Workers name each task after its job and shard (the message's shadow name). The API's
    # task-sent event carries the plain task name, and when it reaches Flower after the
    # worker's events it overwrites the name (Celery merges late `sent` events whole), so a
    # task may show as plain `postroom.classify_shard`; its args still say job and shard.
    names = {t["name"] for t in tasks.values()}
    assert names <= {*shadows, "postroom.classify_shard"}, names
    assert names & set(shadows), names


def status_snapshot(api_url: str, key: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        postroom_command("status", "--once", "--json", "--api-url", api_url, "--key", key),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    snapshot: dict[str, Any] = json.loads(out.stdout)
    return snapshot


def test_status_once_json_follows_a_job(
    api_url: str,
    env: dict[str, str],
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
    sessions: Any,
) -> None:
    from postroom.tenants import create_key

    # An operator's admin key: its status shows the workers themselves too.
    with sessions.begin() as session:
        tenant_key = create_key(session=session, tenant=f"ops-{uuid.uuid4().hex[:12]}", admin=True)
    client = Client(api_url, tenant_key)
    job = submit(client, tmp_path, make_docs(3000, seed=31))

    def running_with_progress() -> dict[str, Any] | None:
        snapshot = status_snapshot(api_url, tenant_key, env)
        [mine] = [j for j in snapshot["jobs"] if j["id"] == job["id"]]
        counts = mine["counts"]
        done = counts["succeeded"] + counts["failed"]
        return snapshot if mine["status"] == "running" and 0 < done < counts["total"] else None

    snapshot = wait_until(running_with_progress, timeout=120, what="job running with progress")
    [mine] = [j for j in snapshot["jobs"] if j["id"] == job["id"]]
    assert mine["rate_docs_per_second"] > 0
    assert mine["eta_seconds"] is not None
    [gpu_worker] = [w for w in snapshot["workers"] if w["name"].endswith(f":{worker.pid}")]
    assert gpu_worker["alive"]
    assert gpu_worker["route"] == "gpu"
    assert {"tiny", "minilm"} <= set(gpu_worker["models"])
    assert snapshot["workers_alive"]["gpu"] >= 1
    queues = {q["queue"]: q for q in snapshot["queues"]}
    assert queues["gpu.tiny"]["shards"] + queues["gpu.tiny"]["running_shards"] > 0
    assert set(snapshot["spill"]) == {"window_seconds", "documents", "ratio"}

    wait_for_status(client, job["id"], timeout=240)
    after = status_snapshot(api_url, tenant_key, env)
    [mine] = [j for j in after["jobs"] if j["id"] == job["id"]]
    assert mine["status"] == "completed"
    assert mine["counts"]["succeeded"] == 3000


def test_status_lists_only_the_callers_jobs(
    api_url: str, client: Client, tmp_path: Path, sessions: Any
) -> None:
    from postroom.tenants import create_key

    job = submit(client, tmp_path, make_docs(20, seed=41))
    with sessions.begin() as session:
        other = Client(api_url, create_key(session=session, tenant=f"t-{uuid.uuid4().hex[:12]}"))
    assert job["id"] in [j["id"] for j in client.status()["jobs"]]
    snapshot = other.status()
    assert snapshot["jobs"] == []
    assert snapshot["queues"]
    # Another tenant learns how many workers are alive, never which (names, pids, engines).
    assert snapshot["workers_alive"]["gpu"] >= 1
    assert snapshot["workers"] == []
    assert httpx.get(f"{api_url}/v1/status", timeout=5).status_code == 401


def exported_names() -> set[str]:
    """Every sample name the code exports: the registry's after importing the metric modules,
    the worker's engine collector's and the API's Postgres collector's."""
    families = [
        *REGISTRY.collect(),
        *postroom.metrics.WorkerCollector().describe(),
        *postroom.postgres_metrics.PostgresCollector().describe(),
    ]
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def test_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "config/grafana/dashboards/postroom.json").read_text())
    assert dashboard["uid"] == "postroom"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 30
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len(panels) >= 10
    exported = exported_names()
    used: set[str] = set()
    for panel in panels:
        assert panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            names = set(re.findall(r"\bpostroom_[a-z0-9_]+", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exported, (panel["title"], names - exported)
            used |= names
    # The dashboard shows what the issue asks for.
    for wanted in (
        "postroom_queue_depth_shards",
        "postroom_queue_depth_documents",
        "postroom_documents_total",
        "postroom_tokens_total",
        "postroom_spill_ratio",
        "postroom_shard_seconds_bucket",
        "postroom_engine_inflight_requests",
        "postroom_engine_batch_occupancy_ratio",
        "postroom_engine_cached_prompt_tokens_total",
        "postroom_document_failures_total",
        "postroom_reaper_actions_total",
        "postroom_router_decisions_total",
        "postroom_spend_dollars_total",
    ):
        assert wanted in used, wanted


def test_compose_runs_prometheus_and_grafana_on_loopback() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        ports = services[name]["ports"]
        assert ports, name
        assert all(str(p).startswith("127.0.0.1:") for p in ports), (name, ports)
    assert ":?" in str(services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    prometheus = yaml.safe_load((ROOT / "config/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert {"api", "worker", "beat"} <= set(jobs)
    targets = json.dumps(jobs)
    for target in ("api:8000", "beat:9102", "9101"):
        assert target in targets
    provisioning = ROOT / "config/grafana/provisioning"
    datasources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_every_process_logs_json_with_ids_and_no_document_text(
    client: Client, logs_dir: Path, beat_metrics: str, tmp_path: Path
) -> None:
    marker = f"secretword{uuid.uuid4().hex[:8]}"
    job = submit(client, tmp_path, marked_docs(200, marker, seed=51))
    wait_for_status(client, job["id"])
    records: dict[str, list[dict[str, Any]]] = {}
    for name in ("api.log", "worker.log", "beat-observability.log"):
        text = (logs_dir / name).read_text(errors="replace")
        assert marker not in text, name
        assert "obsmarker1" not in text, name
        records[name] = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for record in records[name]:
            assert {"ts", "level", "logger", "msg"} <= set(record), record
            assert record["level"] in ("debug", "info", "warning", "error", "critical"), record
    # The API's output is JSON through and through. (Workers and beat also carry Celery's
    # startup banner and vLLM's own log format, which are not ours: see the README.)
    api_lines = (logs_dir / "api.log").read_text(errors="replace").splitlines()
    assert [line for line in api_lines if line.strip() and not line.startswith("{")] == []

    # Ids are bound from context: job, shard, task and route on the worker's shard summaries
    # (each written after its shard's commit, so the last may follow the job's completion) …
    def shard_summaries() -> list[dict[str, Any]] | None:
        text = (logs_dir / "worker.log").read_text(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        done = [
            r for r in lines if r.get("job_id") == job["id"] and r["msg"].startswith("shard done")
        ]
        return done if len(done) >= 2 else None

    done = wait_until(shard_summaries, timeout=30, what="both shard summaries logged")
    assert len(done) == 2, done
    assert all({"shard_no", "task_id", "route"} <= set(r) for r in done)
    # … request and tenant on the API's line per write request
    writes = [r for r in records["api.log"] if r["msg"].startswith("POST /v1/jobs/upload 201")]
    assert writes
    assert all({"request_id", "tenant_id"} <= set(r) for r in writes)
    # … and the processes' own startup lines are JSON too (logging is set before worker_init).
    for name in ("worker.log", "beat-observability.log"):
        assert any(r["msg"].startswith("metrics on http") for r in records[name]), name
