"""A shard's commit as the worker makes it, alone and from many threads: what it costs and what
it waits for.

    .venv/bin/python bench/commit.py                     # 1, 4, 8 and 16 threads, 256-doc shards
    .venv/bin/python bench/commit.py --threads 8 --busy 2 --shards 64

Real Postgres (a fresh database, migrated; no S3, no engine). One job of `--shards` shards; each
thread claims a shard and commits it as `worker/tasks._commit` does: its result rows upserted
and the fenced finish (which locks the job row to complete it when last) in one transaction. The
rows are built before the clock starts. Per commit: wall seconds and this thread's CPU seconds
(`time.thread_time`: Python and psycopg work, not time spent waiting for the GIL, a lock or the
server). `--busy N` adds N threads spinning in pure Python, as a worker's classify threads hold
the GIL, so the gap between wall and CPU shows what the GIL costs a commit. Each thread count
runs on a job of its own. Prints a table and writes bench/results/commit.json.
"""

from __future__ import annotations

import secrets
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from report import bench_parser, parse_bench_args, print_table, write_results
from retention import make_job
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.migrate import migrate
from postroom.db.models import Job
from postroom.db.session import make_engine, make_sessionmaker
from postroom.domain import DocResult
from postroom.partitions import SHARED
from postroom.results import upsert_results
from postroom.settings import Settings
from postroom.shards import claim_shard, finish_shard


def shard_results(shard_no: int, size: int) -> list[tuple[int, DocResult]]:
    """What a generative shard's classifier returns: a label, its confidence, the distribution."""
    return [
        (
            line,
            DocResult(
                id=f"s{shard_no}-{line}",
                label="a",
                confidence=0.91,
                distribution={"a": 0.91, "b": 0.09},
                tokens_in=180,
                tokens_out=1,
            ),
        )
        for line in range(size)
    ]


def commit_one(
    sessions: sessionmaker[Session], job_id: uuid.UUID, shard_no: int, size: int
) -> dict[str, float]:
    with sessions.begin() as session:
        claimed = claim_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            worker="bench",
            lease_seconds=300,
            route="gpu",
        )
        created = session.execute(select(Job.created_at).where(Job.id == job_id)).scalar_one()
    assert claimed is not None, f"shard {shard_no} was not claimable"
    rows = shard_results(shard_no, size)
    wall, cpu = time.perf_counter(), time.thread_time()
    with sessions.begin() as session:
        upsert_results(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            attempt=claimed.attempt,
            route="gpu",
            model="tiny",
            revision="r",
            results=rows,
            job_created_at=created,
            part=SHARED,
        )
        upserted = time.perf_counter()
        won = finish_shard(
            session=session,
            job_id=job_id,
            shard_no=shard_no,
            attempt=claimed.attempt,
            succeeded=size,
            failed=0,
            route="gpu",
        )
        finished = time.perf_counter()
    assert won, f"shard {shard_no} lost its lease"
    ended = time.perf_counter()
    return {
        "wall": ended - wall,
        "cpu": time.thread_time() - cpu,
        "upsert": upserted - wall,
        "finish": finished - upserted,
        "tx_commit": ended - finished,
    }


def spin(stop: threading.Event) -> None:
    """Pure Python that holds the GIL between switch intervals, as a classify thread does."""
    n = 0
    while not stop.is_set():
        for i in range(10_000):
            n ^= i


def run_level(
    sessions: sessionmaker[Session], *, threads: int, shards: int, size: int, busy: int
) -> dict[str, Any]:
    job_id = make_job(sessions, sizes=(size,) * shards, tenant=f"commit-{secrets.token_hex(3)}")
    stop = threading.Event()
    spinners = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
    for spinner in spinners:
        spinner.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            commits = list(pool.map(lambda n: commit_one(sessions, job_id, n, size), range(shards)))
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
    seconds = time.perf_counter() - started
    with sessions() as session:
        status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    assert str(status) == "completed", f"the job ended {status}, not completed"

    def median_ms(key: str) -> float:
        return round(statistics.median(c[key] for c in commits) * 1000, 1)

    walls = sorted(c["wall"] for c in commits)
    return {
        "threads": threads,
        "busy_threads": busy,
        "shards": shards,
        "shard_size": size,
        "seconds": round(seconds, 2),
        "docs_per_s": round(shards * size / seconds),
        "commit_ms_median": median_ms("wall"),
        "commit_ms_p90": round(walls[int(0.9 * (len(walls) - 1))] * 1000, 1),
        "cpu_ms_median": median_ms("cpu"),
        "upsert_ms_median": median_ms("upsert"),
        "finish_ms_median": median_ms("finish"),
        "tx_commit_ms_median": median_ms("tx_commit"),
    }


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--threads", default="1,4,8,16", help="thread counts, one level each")
    parser.add_argument("--shards", type=int, default=96, help="shards per level")
    parser.add_argument("--shard-size", type=int, default=Settings().shard_size)
    parser.add_argument("--busy", type=int, default=0, help="threads spinning in Python")
    args = parse_bench_args(parser, "commit")
    name = f"postroom_commit_{secrets.token_hex(3)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate(url)
    engine = make_engine(Settings(database_url=url))
    try:
        sessions = make_sessionmaker(engine)
        run_level(sessions, threads=1, shards=4, size=args.shard_size, busy=0)  # warm-up
        levels = [
            run_level(
                sessions, threads=int(t), shards=args.shards, size=args.shard_size, busy=args.busy
            )
            for t in args.threads.split(",")
        ]
    finally:
        engine.dispose()
        with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print_table(
        "| threads | busy | docs/s | commit ms (median / p90) | its CPU ms | upsert | finish "
        "| tx commit |\n|---:|---:|---:|---:|---:|---:|---:|---:|",
        (
            f"| {r['threads']} | {r['busy_threads']} | {r['docs_per_s']:,} "
            f"| {r['commit_ms_median']} / {r['commit_ms_p90']} | {r['cpu_ms_median']} "
            f"| {r['upsert_ms_median']} | {r['finish_ms_median']} | {r['tx_commit_ms_median']} |"
            for r in levels
        ),
    )
    write_results(args.out, {"levels": levels})


if __name__ == "__main__":
    main()
