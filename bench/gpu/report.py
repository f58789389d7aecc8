"""The report: per-pass rates and MFU, label agreement, the median pass of a mode, ratios between
modes, the printed table; writing and merging report JSON."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu.config import H100_BF16_FLOPS, MODE_NAMES, MODES, EngineCfg


def derive(pass_: dict[str, Any], params: int) -> dict[str, Any]:
    """docs/s, prompt tok/s, hit rate and MFU on computed tokens of one timed pass."""
    if "wall_s" not in pass_:
        return pass_
    wall = pass_["wall_s"]
    prompt = pass_["prompt_tokens"]
    computed = prompt - pass_["cached_tokens"]
    computed_per_s = computed / wall
    return {
        **{k: v for k, v in pass_.items() if k != "labels"},
        "wall_s": round(wall, 3),
        "docs_per_s": round(pass_["docs"] / wall, 1),
        "prompt_tok_per_s": round(prompt / wall),
        "computed_tok_per_s": round(computed_per_s),
        "prefix_hit_rate": round(pass_["cached_tokens"] / prompt, 4) if prompt else 0.0,
        "mfu": round(2 * params * computed_per_s / H100_BF16_FLOPS, 4),
    }


def agreement(a: dict[str, Any] | list[Any] | None, b: dict[str, Any] | None, ids: list[str]):
    if not a or not b:
        return None
    a_map = a if isinstance(a, dict) else dict(zip(ids, a, strict=False))
    same = sum(1 for i in ids if a_map.get(i) is not None and a_map.get(i) == b.get(i))
    return round(same / len(ids), 4)


def median_pass(passes: list[dict[str, Any]], kind: str, name: str | None = None) -> Any:
    """The median (by docs/s) of the complete timed passes of one kind (and name); the spread
    and the number of repeats are added to it."""
    timed = [
        p
        for p in passes
        if "docs_per_s" in p
        and p.get("ok") == p.get("docs")
        and (p.get("config") or {}).get("kind", "classify") == kind
        and (name is None or p["name"] == name)
    ]
    if not timed:
        return None
    timed.sort(key=lambda p: p["docs_per_s"])
    mid = dict(timed[(len(timed) - 1) // 2])
    mid["repeats"] = len(timed)
    mid["docs_per_s_min"] = timed[0]["docs_per_s"]
    mid["docs_per_s_max"] = timed[-1]["docs_per_s"]
    return mid


def mode_summary(
    entry: dict[str, Any], best: dict[str, Any] | None, engine: EngineCfg
) -> dict[str, Any]:
    """A mode's row of the report: its engine, the numbers of its chosen pass, every pass."""
    out: dict[str, Any] = {
        "engine_config": engine.name,
        "engine_start_s": round1(entry.get("engine_start_s")),
        "phase_s": entry.get("phase_s"),
    }
    if "error" in entry or "skipped" in entry:
        out["error"] = entry.get("error") or entry.get("skipped")
    if best:
        out.update({k: best[k] for k in best if k not in ("labels",)})
    else:
        out.setdefault("error", "no complete timed pass")
    out["all_passes"] = entry.get("passes", [])
    for key in ("cli", "vllm", "stats"):
        if key in entry:
            out[key] = entry[key]
    return out


def round1(x: Any) -> Any:
    return round(x, 1) if isinstance(x, float) else x


def ratios(modes: dict[str, Any]) -> dict[str, Any]:
    def rate(m: str) -> float | None:
        return modes.get(m, {}).get("docs_per_s")

    out: dict[str, Any] = {}
    for num, den in (("b", "a"), ("b", "c"), ("d", "b"), ("c", "a")):
        if rate(num) and rate(den):
            out[f"{num}/{den}"] = round(rate(num) / rate(den), 3)  # type: ignore[operator]
    return out


def table(report: dict[str, Any]) -> str:
    head = (
        f"{'shape':6} {'mode':32} {'docs/s':>8} {'prompt tok/s':>12} {'computed/s':>11} "
        f"{'hit':>6} {'MFU':>6} {'start s':>8} {'ok':>11}  config"
    )
    lines = [head, "-" * len(head)]
    for shape, res in report.get("shapes", {}).items():
        for mode in MODES:
            m = res.get("modes", {}).get(mode)
            if m is None:
                continue
            if "docs_per_s" not in m:
                lines.append(f"{shape:6} {MODE_NAMES[mode]:32} {'—':>8}  {m.get('error', '')}")
                continue
            cfg = m.get("config") or {}
            client = (
                f" {cfg['threads']}thr/{cfg['shard_size']}/f{cfg['inflight_factor']:g}"
                if cfg.get("kind") == "classify"
                else ""
            )
            if m.get("repeats", 1) > 1:
                client += f" median of {m['repeats']} ({m['docs_per_s_min']}-{m['docs_per_s_max']})"
            lines.append(
                f"{shape:6} {MODE_NAMES[mode]:32} {m['docs_per_s']:8.1f} "
                f"{m['prompt_tok_per_s']:12,} {m['computed_tok_per_s']:11,} "
                f"{m['prefix_hit_rate']:6.1%} {m['mfu']:6.1%} {m['engine_start_s'] or 0:8.1f} "
                f"{m['ok']:>5}/{m['docs']:<5}  {m['engine_config']}{client}"
            )
        if res.get("ratios"):
            lines.append(
                f"{shape:6} ratios: " + ", ".join(f"{k} = {v}" for k, v in res["ratios"].items())
            )
        for name, eng in res.get("engines", {}).items():
            for p in eng.get("passes", []):
                if "docs_per_s" in p:
                    flight = (
                        f"  in flight ≤{p['max_inflight_seen']} shards ≤{p['max_shards_in_flight']}"
                        if "max_inflight_seen" in p
                        else ""
                    )
                    cpu = f"  core CPU {p.get('cpu_engine_core', 0):.2f}"
                    lines.append(
                        f"{shape:6}   engine {name:9} {p['name']:34} {p['docs_per_s']:8.1f} "
                        f"docs/s  MFU {p['mfu']:.1%}{cpu}{flight}"
                    )
    return "\n".join(lines)


def write_report(report: dict[str, Any], opts: argparse.Namespace) -> None:
    text = json.dumps(report, indent=1, default=str)
    targets = [Path(opts.out)]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpu.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def merge(paths: Sequence[str]) -> dict[str, Any]:
    """One report of several runs: per shape, the first file that has it gives the table's row
    set; every run is kept whole under "runs" (named by its file)."""
    merged: dict[str, Any] = {"shapes": {}, "shape_source": {}, "runs": {}}
    for path in paths:
        report = json.loads(Path(path).read_text())
        name = Path(path).stem
        for shape, result in report.get("shapes", {}).items():
            if shape not in merged["shapes"]:
                merged["shapes"][shape] = result
                merged["shape_source"][shape] = name
        merged["runs"][name] = report
    return merged
