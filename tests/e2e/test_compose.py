"""docker-compose.yml (no Docker engine here): it parses, its `postroom` commands exist, and
nothing sensitive is published beyond 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import typer.main
import yaml

from postroom_cli.main import app

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_every_postroom_command_in_compose_exists() -> None:
    cli = typer.main.get_command(app)
    assert hasattr(cli, "commands")
    services = _compose()["services"]
    postroom_services = {
        name: svc
        for name, svc in services.items()
        if str(svc.get("image", "")).startswith("postroom")
    }
    assert {"migrate", "api", "worker", "beat", "flower"} <= set(postroom_services)
    for name, service in postroom_services.items():
        command = service["command"]
        sub = cli.commands.get(command[0])
        assert sub is not None, f"{name}: `postroom {command[0]}` does not exist"
        options = {opt for param in sub.params for opt in getattr(param, "opts", [])}
        for arg in command[1:]:
            if arg.startswith("--"):
                assert arg in options, f"{name}: `postroom {command[0]}` has no option {arg}"


def test_stateful_services_listen_on_loopback_only() -> None:
    services = _compose()["services"]
    for name in ("postgres", "redis", "s3", "flower"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


# Published beyond the host only on purpose: the HTTP API (bearer keys on every /v1 route).
PUBLIC_SERVICES = {"api"}
# Images (or postroom commands) that must never be reachable from outside the host.
INTERNAL_IMAGES = ("postgres", "redis", "moto", "minio", "prometheus", "grafana")


def _host_ip(port: Any) -> str:
    """The host address a compose `ports` entry binds: short ("127.0.0.1:5432:5432") or long."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "0.0.0.0"))
    parts = str(port).rsplit(":", 2)
    return parts[0].strip("[]") if len(parts) == 3 else "0.0.0.0"


def test_nothing_but_the_api_is_published_beyond_loopback() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: host networking bypasses ports"
        if name in PUBLIC_SERVICES:
            continue
        for port in service.get("ports", []):
            assert _host_ip(port) == "127.0.0.1", (name, port)


def test_databases_broker_s3_flower_and_dashboards_are_loopback_only() -> None:
    services = _compose()["services"]
    internal = {
        name
        for name, svc in services.items()
        if any(image in str(svc.get("image", "")) for image in INTERNAL_IMAGES)
        or svc.get("command", [None])[0] == "flower"
    }
    assert {"postgres", "redis", "s3", "flower"} <= internal
    for name in internal:
        assert name not in PUBLIC_SERVICES
        for port in services[name].get("ports", []):
            assert _host_ip(port) == "127.0.0.1", (name, port)
        for published in services[name].get("expose", []):
            assert ":" not in str(published), (name, published)


def test_dashboards_need_a_login() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if "grafana" in str(service.get("image", "")):
            env = service.get("environment", {})
            assert ":?" in str(env.get("GF_SECURITY_ADMIN_PASSWORD", "")), name
            assert str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "false", name


def test_flower_refuses_to_start_without_credentials() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "postroom_cli", "flower"],
        env={"POSTROOM_FLOWER_BASIC_AUTH": "", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode != 0
    assert b"POSTROOM_FLOWER_BASIC_AUTH" in done.stderr + done.stdout


def test_worker_uses_the_gpu_image_with_a_device_reservation() -> None:
    worker = _compose()["services"]["worker"]
    assert worker["build"]["target"] == "gpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_flower_requires_credentials() -> None:
    env = _compose()["x-postroom-env"]
    assert ":?" in env["POSTROOM_FLOWER_BASIC_AUTH"]  # compose refuses to start without them


def test_published_api_metrics_need_the_token() -> None:
    compose = _compose()
    assert ":?" in compose["x-postroom-env"]["POSTROOM_METRICS_TOKEN"]
    scrape = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    (api,) = [job for job in scrape["scrape_configs"] if job["job_name"] == "api"]
    assert api["authorization"]["credentials_file"] == "/etc/prometheus/metrics_token"
    targets = [c["target"] for c in compose["services"]["prometheus"]["configs"]]
    assert targets == ["/etc/prometheus/metrics_token"]
