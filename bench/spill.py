"""Spill throughput against the stand-in managed API with a set latency, next to the Little's-law
limit (concurrency ÷ latency).

    .venv/bin/python bench/spill.py                      # 3,000 docs, latency 0.25 s, 16 and 32
    .venv/bin/python bench/spill.py --latency 0.5 --concurrency 64

Prints a table and writes bench/results/spill.json.
"""

from __future__ import annotations

from ceiling import write_docs
from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from stack import Stack, bench_settings

from postroom_cli.local import free_port
from postroom_cli.standin import StandinServer


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--concurrency", default="16,32")
    args = parse_bench_args(parser, "spill")
    logs = scratch_dir("spill")
    path = logs / "docs.jsonl"
    write_docs(path, args.docs)
    warm = logs / "warm.jsonl"
    write_docs(warm, 200, seed=1)
    standin = StandinServer(free_port()).start()
    rows = []
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            standin.set_faults(latency=args.latency)
            settings = bench_settings(
                spill_base_url=standin.url, spill_model="standin", spill_concurrency=concurrency
            )
            workers = [["worker", "--route", "spill", "--concurrency", "8"]]
            with Stack(settings, logs, workers=workers) as stack:
                stack.run_job(warm, 200, spill="always")
                run = stack.run_job(path, args.docs, spill="always")
            limit = concurrency / args.latency
            rows.append(
                {
                    "docs": args.docs,
                    "latency_s": args.latency,
                    "concurrency": concurrency,
                    "limit_docs_per_s": round(limit, 1),
                    "docs_per_s": round(run["docs_per_s"], 1),
                    "ratio": round(run["docs_per_s"] / limit, 3),
                }
            )
    finally:
        standin.stop()
    print_table(
        f"{'docs':>6} {'latency':>8} {'concurrency':>12} {'limit/s':>8} {'docs/s':>8} {'ratio':>6}",
        (
            f"{r['docs']:>6,} {r['latency_s']:>7.2f}s {r['concurrency']:>12} "
            f"{r['limit_docs_per_s']:>8.1f} {r['docs_per_s']:>8.1f} {r['ratio']:>6.3f}"
            for r in rows
        ),
    )
    write_results(args.out, {"results": rows})


if __name__ == "__main__":
    main()
