"""`postroom eval --compare A,B --max-drop X` as a quality gate: it fails on a degraded alias
(MiniLM cut to 12 tokens) and passes on an identical one (the same alias run twice), and reports
what it measured."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from postroom_cli.evaluate import SAMPLE
from postroom_cli.local import postroom_command, stop
from tests.stack import start_worker

pytestmark = pytest.mark.usefixtures("worker")  # serves `minilm`


@pytest.fixture(scope="module")
def variants_worker(
    env: dict[str, str], logs_dir: Path, sessions: sessionmaker[Session]
) -> Iterator[None]:
    """A worker serving `minilm-short` (MiniLM with max_model_len 12)."""
    proc = start_worker(env, logs_dir / "worker-variants.log", sessions, "--models", "minilm-short")
    yield
    stop(proc)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 150 tickets of the shipped sample, with its labels sidecar."""
    folder = tmp_path_factory.mktemp("compare")
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:150]
    (folder / "tickets.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sidecar = SAMPLE.with_name(SAMPLE.name.removesuffix(".jsonl") + ".labels.json")
    (folder / "tickets.labels.json").write_text(sidecar.read_text())
    return folder / "tickets.jsonl"


def run_compare(
    env: dict[str, str], api_url: str, key: str, file: Path, sides: str, out: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        postroom_command(
            "eval", str(file), "--compare", sides, "--max-drop", "1", "--json", str(out / "c.json"),
            "--plot", str(out / "c.png"), "--api-url", api_url, "--key", key,
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )  # fmt: skip


@pytest.mark.timeout(600)  # two engines start first on a small machine
@pytest.mark.usefixtures("variants_worker")
def test_the_gate_fails_on_a_degraded_alias(
    api_url: str, tenant_key: str, env: dict[str, str], labelled: Path, tmp_path: Path
) -> None:
    proc = run_compare(env, api_url, tenant_key, labelled, "minilm,minilm-short", tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "c.json").read_text())
    assert not data["passed"]
    assert data["delta"]["accuracy_points"] < -1, data["delta"]
    assert any(f.startswith("accuracy drops") for f in data["failures"])
    assert "gate failed" in proc.stdout
    assert data["agreement"] < 1.0
    for side in ("a", "b"):
        assert data[side]["total"] == 150
        assert 0 <= data[side]["ece"] <= 1
        assert data[side]["docs_per_second"] > 0
        assert sum(b["count"] for b in data[side]["reliability"]) == 150 - data[side]["failed"]
    assert set(data["delta"]["per_label_f1_points"]) == set(data["a"]["per_label"])
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_the_gate_passes_on_an_identical_alias(
    api_url: str, tenant_key: str, env: dict[str, str], labelled: Path, tmp_path: Path
) -> None:
    proc = run_compare(env, api_url, tenant_key, labelled, "minilm,minilm", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["passed"]
    assert data["agreement"] >= 0.99
    assert abs(data["delta"]["accuracy_points"]) <= 1
    assert data["a"]["accuracy"] >= 0.8
    assert "gate passed" in proc.stdout


def test_a_side_with_an_engine_setting_is_refused_with_what_to_do(
    api_url: str, tenant_key: str, env: dict[str, str], labelled: Path, tmp_path: Path
) -> None:
    proc = run_compare(
        env, api_url, tenant_key, labelled, "minilm,minilm?max_model_len=12", tmp_path
    )
    assert proc.returncode == 1
    assert "register a second one in POSTROOM_MODELS" in " ".join(proc.stderr.split())
