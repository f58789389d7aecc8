"""docker-compose.yml (no Docker engine here): it parses, its `postroom` commands exist, and
nothing sensitive is published beyond 127.0.0.1."""

from __future__ import annotations

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


def test_worker_uses_the_gpu_image_with_a_device_reservation() -> None:
    worker = _compose()["services"]["worker"]
    assert worker["build"]["target"] == "gpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_flower_requires_credentials() -> None:
    env = _compose()["x-postroom-env"]
    assert ":?" in env["POSTROOM_FLOWER_BASIC_AUTH"]  # compose refuses to start without them
