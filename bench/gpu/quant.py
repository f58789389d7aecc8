"""FP8 against bf16 on one GPU: docs/s and what quantization does to the labels.

For each model and each quantization, one engine in its own child process (GPU memory is freed
between them) scores the same documents with the layout Postroom uses (`postroom.prompts`; one
step, `allowed_token_ids` = the labels' answer tokens, logprobs, temperature 0), `--repeats` timed
passes each from an empty prefix cache but the job's shared prefix. Reported per run: docs/s
(median pass), agreement of its labels with the model's first quantization (the baseline), and
accuracy when the documents carry a true `label`.

Models: `smollm2=PATH` is the real SmolLM2-135M-Instruct, PATH a converted checkpoint directory or
the `.gguf` file (converted once into --work-dir; needs the `gguf` and `accelerate` wheels);
`tiny`, `0.5b`, `1.5b` are the random-weight shapes of bench/gpu (generated documents; `tiny=DIR`
uses a model built before). A real model
classifies `--labelled FILE.jsonl` (its `<name>.labels.json` sidecar gives the labels).

    python bench/gpu/quant.py --models smollm2=/tmp/smollm2.gguf,1.5b --quant none,fp8 \\
        --labelled postroom/data/support_tickets.jsonl --device cuda --out bench/results/quant.json
    python bench/gpu/quant.py --models tiny --quant none,none --device cpu --docs 32   # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# As in run.py: import the bench package from the root, not bench/gpu/ (whose module names shadow).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = ("tiny", "0.5b", "1.5b")


def prepare(name: str, source: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model directory and the documents (with truth, if any) a model is run on."""
    from bench.gpu.config import LABELS, SEED
    from bench.gpu.docs import make_documents
    from postroom.domain import DEFAULT_INSTRUCTIONS

    work = Path(args.work_dir)
    if name in SHAPES:
        from bench.gpu.config import shape_of
        from worker.tiny_model import build_model

        # `tiny=DIR`: a model built before (the tests pass theirs), else one built here.
        model_dir = Path(source) if source else work / f"model-{name}"
        if not source:
            build_model(
                model_dir, shape=shape_of(name), architecture="qwen2", device=args.build_device
            )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        docs = make_documents(tok, args.docs, seed=SEED)
        labels = [{"name": k, "description": v} for k, v in LABELS.items()]
        return {"model_dir": str(model_dir), "docs": docs, "labels": labels, "truth": None}
    path = Path(source)
    if path.suffix == ".gguf":
        from worker.gguf_model import convert_gguf

        model_dir = work / f"model-{name}"
        convert_gguf(path, model_dir)
        path = model_dir
    if not args.labelled:
        raise SystemExit(f"{name}: a real model needs --labelled FILE.jsonl")
    labelled = Path(args.labelled)
    rows = [json.loads(line) for line in labelled.read_text().splitlines() if line.strip()]
    rows = rows[: args.docs] if args.docs else rows
    sidecar = labelled.with_name(labelled.name.removesuffix(".jsonl") + ".labels.json")
    labels = json.loads(sidecar.read_text())
    labels = [x if isinstance(x, dict) else {"name": x} for x in labels]
    docs = [{"id": str(r.get("id", i)), "text": r["text"]} for i, r in enumerate(rows)]
    return {
        "model_dir": str(path),
        "docs": docs,
        "labels": labels,
        "truth": [r["label"] for r in rows],
        "instructions": DEFAULT_INSTRUCTIONS,
    }


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One engine: start it, then `repeats` timed passes; returns times and the labels."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bench.gpu.config import ENGINES, MAX_MODEL_LEN, engine_kwargs, vllm_env
    from bench.gpu.raw import label_of
    from postroom.domain import DEFAULT_INSTRUCTIONS, Label
    from postroom.prompts import build_layout

    vllm_env(cfg["device"])
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    layout = build_layout(
        tok,
        labels=[Label(**label) for label in cfg["labels"]],
        instructions=cfg.get("instructions") or DEFAULT_INSTRUCTIONS,
        doc_max_tokens=MAX_MODEL_LEN,
        max_model_len=MAX_MODEL_LEN,
    )
    encoded = tok([d["text"] for d in cfg["docs"]], add_special_tokens=False)["input_ids"]
    prompts = [TokensPrompt(prompt_token_ids=layout.prompt(ids)[0]) for ids in encoded]
    params = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=len(layout.answer_ids),
        allowed_token_ids=list(layout.answer_ids),
        detokenize=False,
    )
    engine = ENGINES["defaults" if cfg["device"] == "cpu" else "t32k"]
    kwargs = engine_kwargs(cfg, engine)
    if cfg["quantization"]:
        kwargs["quantization"] = cfg["quantization"]
    started = time.monotonic()
    llm = LLM(**kwargs)
    start_s = time.monotonic() - started
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    walls, labels = [], []
    for _ in range(cfg["repeats"]):
        llm.reset_prefix_cache()
        llm.generate(prompts[:1], params, use_tqdm=False)  # the job's prefix is cached
        started = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.monotonic() - started)
        labels = [
            label_of(layout, o.outputs[0].logprobs[0])
            if o.outputs and o.outputs[0].logprobs
            else None
            for o in outs
        ]
    return {"engine_start_s": round(start_s, 1), "walls": walls, "labels": labels}


def run_child(cfg: dict[str, Any], work: Path, log: Path) -> dict[str, Any]:
    cfg_path = work / f"child-{cfg['run']}.json"
    cfg_path.write_text(json.dumps(cfg))
    with log.open("a") as out:
        subprocess.run(
            [sys.executable, __file__, "--child", str(cfg_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    result: dict[str, Any] = json.loads(cfg_path.with_suffix(".out.json").read_text())
    return result


def summarise(
    name: str, quant: str, data: dict[str, Any], result: dict[str, Any], base: list[Any] | None
) -> dict[str, Any]:
    labels, truth = result["labels"], data["truth"]
    wall = statistics.median(result["walls"])
    row = {
        "model": name,
        "quantization": quant,
        "docs": len(labels),
        "docs_per_second": round(len(labels) / wall, 1),
        "walls_s": [round(w, 3) for w in result["walls"]],
        "engine_start_s": result["engine_start_s"],
        "agreement_with_baseline": None
        if base is None
        else round(sum(a == b for a, b in zip(labels, base, strict=True)) / len(labels), 4),
        "accuracy": None
        if truth is None
        else round(sum(p == t for p, t in zip(labels, truth, strict=True)) / len(truth), 4),
        "label_counts": dict(Counter(str(label) for label in labels).most_common()),
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="tiny", help="smollm2=PATH, tiny, 0.5b, 1.5b")
    parser.add_argument("--quant", default="none,fp8", help="the first one is the baseline")
    parser.add_argument("--labelled", default="", help="JSONL with label (real models)")
    parser.add_argument("--docs", type=int, default=2000, help="documents (generated, or cap)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--kv-cache-bytes", type=int, default=512 * 1024 * 1024)
    parser.add_argument("--work-dir", default="/tmp/postroom-quant")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant.json"))
    args = parser.parse_args()
    if args.child:
        cfg = json.loads(Path(args.child).read_text())
        Path(args.child).with_suffix(".out.json").write_text(json.dumps(child(cfg)))
        return 0
    args.build_device = args.device
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "quant.log"
    rows = []
    for spec in filter(None, (m.strip() for m in args.models.split(","))):
        name, _, source = spec.partition("=")
        data = prepare(name, source, args)
        base = None
        for number, quant in enumerate(q.strip() for q in args.quant.split(",")):
            cfg = {
                **data,
                "run": f"{name}-{number}-{quant}",
                "device": args.device,
                "quantization": None if quant == "none" else quant,
                "repeats": args.repeats,
                "gpu_memory_utilization": args.gpu_memory_utilization,
                "kv_cache_bytes": args.kv_cache_bytes,
            }
            try:
                result = run_child(cfg, work, log)
            except subprocess.CalledProcessError as exc:
                # One engine that will not start (a quantization this build lacks) must not
                # cost the runs already made: record why, from the end of its log, and go on.
                tail = log.read_text(errors="replace").splitlines()[-20:]
                rows.append({"model": name, "quantization": quant, "error": str(exc), "log": tail})
                print(json.dumps(rows[-1]), flush=True)
                continue
            rows.append(summarise(name, quant, data, result, base))
            base = base if base is not None else result["labels"]
            print(json.dumps(rows[-1]), flush=True)
            write(args.out, args.device, rows)
    write(args.out, args.device, rows)
    print(
        f"\n| model | quantization | docs | docs/s | agreement with {rows[0]['quantization']} "
        "| accuracy |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['quantization']} | failed: {r['error']} | | | |")
            continue
        agree = (
            "-" if r["agreement_with_baseline"] is None else f"{r['agreement_with_baseline']:.3f}"
        )
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(
            f"| {r['model']} | {r['quantization']} | {r['docs']} | {r['docs_per_second']:,.1f} "
            f"| {agree} | {acc} |"
        )
    print(f"\nwritten to {args.out}")
    return 1 if any("error" in r for r in rows) else 0


def write(out: str, device: str, rows: list[dict[str, Any]]) -> None:
    """The JSON so far: a call cut by its time limit still returns the runs it made."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": device, "runs": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
