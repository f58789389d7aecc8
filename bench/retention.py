"""Deleting and purging a 1,000,000-document job while another job is being written: how long
each takes, and the other job's write throughput meanwhile against its solo figure.

    .venv/bin/python bench/retention.py                   # 1,000,000 docs
    .venv/bin/python bench/retention.py --docs 200000

Real Postgres (a fresh database, migrated), a moto S3 server. No engine runs: the big jobs are
filled in SQL (their rows are what deletion works through) with one input and one result object
per 1,000-document shard; the other job is written as a worker commits, 1,000 results upserted
and the shard finished per transaction, back to back. Three cases, each timed with the writer
running: (a) `DELETE /v1/jobs/{id}`'s purge of a 1,000,000-document job created today, which
has a partition of its own (over POSTROOM_RESULTS_OWN_PARTITION_DOCS): the partition detached
CONCURRENTLY and dropped; (a') the same for the biggest job that shares today's partition
(POSTROOM_RESULTS_OWN_PARTITION_DOCS - 1 documents; its rows deleted in batches of
POSTROOM_DELETE_BATCH_ROWS, each its own transaction); (b) retention of a job created 40 days
ago: its day partition detached CONCURRENTLY and dropped, then the beat's purge of its objects,
shards and job row. The writer (its own process) is measured solo before, between and after
every case; each case is compared with the solo windows either side of it, its rate taken over a
window as long as a solo one from its start. `--repeats` whole passes (3 by default), each on a
fresh database; the table gives each case's median. Prints a table and writes
bench/results/retention.json.
"""

from __future__ import annotations

import multiprocessing
import queue
import secrets
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from statistics import mean
from typing import Any

import psycopg
from report import bench_parser, parse_bench_args, print_table, write_results
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from control.purge import purge_tick
from postroom.db.migrate import migrate
from postroom.db.models import Job
from postroom.db.session import make_engine, make_sessionmaker
from postroom.deletion import mark_deleted, purge_job
from postroom.domain import DocResult, JobSpec, Label
from postroom.jobs import NewJob, create_job
from postroom.keys import input_shard_key, result_shard_key
from postroom.partitions import (
    SHARED,
    drop_partitions_past_retention,
    ensure_day,
    ensure_job_partition,
    results_part,
)
from postroom.results import upsert_results
from postroom.settings import Settings
from postroom.shards import add_shards, claim_shard, finish_shard
from postroom.storage import Storage
from postroom.tenants import ensure_tenant
from postroom_cli.local import start_moto

SHARD = 1000
SPEC = JobSpec(
    labels=[Label(name="a"), Label(name="b")],
    instructions="Pick one.",
    mode="generative",
    model="tiny",
    revision="r",
    decoding="score",
)


def make_job(sessions: sessionmaker[Session], *, sizes: tuple[int, ...], tenant: str) -> uuid.UUID:
    """A committed job with shards of these sizes (none: completed at once)."""
    job_id = uuid.uuid4()
    with sessions.begin() as session:
        create_job(
            session=session,
            new=NewJob(
                job_id=job_id,
                tenant_id=ensure_tenant(session=session, name=tenant),
                spec=SPEC,
                spill="auto",
                deadline=None,
                metadata=None,
                idempotency_key=None,
                body_hash=None,
                shard_sizes=sizes,
                rejected=(),
                queue="gpu.bench",
            ),
        )
    return job_id


def fill_job(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    docs: int,
    days_ago: int,
    own_partition: bool,
    tenant: str | None = None,
) -> uuid.UUID:
    """A completed job of `docs` results (and its shards and objects), created `days_ago`, its
    rows in a partition of its own or in the day's shared one."""
    job_id = make_job(sessions, sizes=(), tenant=tenant or f"big-{secrets.token_hex(4)}")
    created = datetime.now(UTC) - timedelta(days=days_ago)
    shards = (docs + SHARD - 1) // SHARD
    part = results_part(job_id, own_partition=own_partition)
    engine = sessions.kw["bind"]
    if own_partition:
        ensure_job_partition(engine, created.date(), job_id)
    else:
        ensure_day(engine, created.date())
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                created_at=created,
                total_docs=docs,
                shard_count=shards,
                status="completed",
                own_partition=own_partition,
            )
        )
        add_shards(
            session=session,
            job_id=job_id,
            shards=[(n, min(SHARD, docs - n * SHARD)) for n in range(shards)],
            queue="gpu.bench",
        )
        session.execute(
            text(
                "UPDATE shards SET state = 'done', finished_at = now() - interval '1 hour', "
                "results_written_at = now() WHERE job_id = :j"
            ),
            {"j": job_id},
        )
    for start in range(0, docs, 100_000):  # statements well under the statement timeout
        with sessions.begin() as session:
            session.execute(
                text(
                    "INSERT INTO results (job_id, doc_id, job_created_at, part, shard_no, line, "
                    "label, confidence, distribution, route, model, revision, truncated, "
                    "tokens_in, tokens_out, attempt) SELECT :j, 'doc-' || n, :c, :p, n / 1000, "
                    "n, 'a', 0.9, '{\"a\": 0.9, \"b\": 0.1}'::jsonb, 'gpu', 'tiny', 'r', false, "
                    "100, 1, 1 FROM generate_series(:lo, :hi - 1) AS n"
                ),
                {
                    "j": job_id,
                    "c": created,
                    "p": part,
                    "lo": start,
                    "hi": min(docs, start + 100_000),
                },
            )
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(finished_at=created + timedelta(hours=1))
        )
    with ThreadPoolExecutor(16) as pool:
        for shard in range(shards):
            pool.submit(storage.put_bytes, input_shard_key(job_id, shard), b"{}\n")
            pool.submit(storage.put_bytes, result_shard_key(job_id, shard), b"{}\n")
    return job_id


class Writer:
    """The other job, written as a worker commits (claim, upsert 1,000 results, finish), in a
    process of its own so that it shares no interpreter lock with the purge or the moto server;
    each commit's time (CLOCK_MONOTONIC, the same in every process) goes into a queue."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.commits = context.Queue()
        self.stop = context.Event()
        self.process = context.Process(target=write_loop, args=(url, self.commits, self.stop))
        self.times: list[float] = []

    def start(self) -> None:
        self.process.start()

    def finish(self) -> None:
        self.stop.set()
        self.process.join(120)
        self.drain()

    def drain(self) -> None:
        """What the queue holds now (never waits for more: the writer keeps adding)."""
        while True:
            try:
                self.times.append(self.commits.get(timeout=0.05))
            except queue.Empty:
                return

    def rate(self, start: float, end: float) -> float:
        time.sleep(0.2)  # commits up to `end` reach the queue
        self.drain()
        return sum(SHARD for t in self.times if start <= t <= end) / (end - start)


def write_loop(url: str, commits: Any, stop: Any) -> None:
    sessions = make_sessionmaker(make_engine(Settings(database_url=url)))
    while not stop.is_set():
        job_id = make_job(sessions, sizes=(SHARD,) * 50, tenant="writer")
        with sessions() as session:
            created = session.get_one(Job, job_id).created_at
        for shard in range(50):
            if stop.is_set():
                return
            results = [
                (n, DocResult(id=f"w{n}", label="a", confidence=0.7, distribution={"a": 0.7}))
                for n in range(shard * SHARD, (shard + 1) * SHARD)
            ]
            with sessions.begin() as session:
                claimed = claim_shard(
                    session=session,
                    job_id=job_id,
                    shard_no=shard,
                    worker="bench",
                    lease_seconds=60,
                    route="gpu",
                )
                assert claimed is not None
                fence = {"job_id": job_id, "shard_no": shard, "attempt": claimed.attempt}
                upsert_results(
                    session=session,
                    **fence,
                    route="gpu",
                    model="tiny",
                    revision="r",
                    results=results,
                    job_created_at=created,
                    part=SHARED,  # 50,000 documents: under the own-partition threshold
                )
                finish_shard(session=session, **fence, succeeded=SHARD, failed=0, route="gpu")
            commits.put(time.monotonic())


def timed(writer: Writer, action: Callable[[], object], window: float) -> tuple[float, float]:
    """Seconds the action took and the writer's rows/s from its start over `window` seconds
    (or the action's time, if longer): a window of a second or two holds too few of the
    writer's 1,000-row commits to measure a rate, and what the action set going (autovacuum,
    a purge's S3 deletes) counts in it too."""
    start = time.monotonic()
    action()
    end = time.monotonic()
    time.sleep(max(0.0, start + window - end))
    return end - start, writer.rate(start, max(end, start + window))


def solo(writer: Writer, seconds: float) -> float:
    start = time.monotonic()
    time.sleep(seconds)
    return writer.rate(start, time.monotonic())


Case = tuple[str, float, float, float]  # name, seconds, other job's rows/s, solo either side


def run_once(docs: int, solo_seconds: float) -> tuple[list[Case], list[float], int]:
    """One pass over a fresh database: the cases and the solo windows."""
    name = f"postroom_bench_retention_{secrets.token_hex(3)}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    migrate(url)
    server, endpoint = start_moto()
    settings = Settings(
        database_url=url,
        s3_endpoint_url=endpoint,
        s3_bucket="bench-retention",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        retention_days=30,
        database_statement_timeout_ms=300_000,
    )
    storage = Storage(settings)
    storage.ensure_bucket()
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    shared_docs = min(docs, settings.results_own_partition_docs - 1)
    try:
        t0 = time.monotonic()
        today = fill_job(sessions, storage, docs=docs, days_ago=0, own_partition=True)
        today_shared = fill_job(
            sessions, storage, docs=shared_docs, days_ago=0, own_partition=False
        )
        old = fill_job(sessions, storage, docs=docs, days_ago=40, own_partition=True)
        fill = time.monotonic() - t0
        print(f"filled jobs of {docs:,}, {shared_docs:,} and {docs:,} in {fill:.0f}s")
        writer = Writer(url)
        writer.start()
        solo(writer, 5.0)  # warm-up: connections, first job
        solos = [solo(writer, solo_seconds)]

        def delete(job_id: uuid.UUID, *, own: bool, rows: int) -> None:
            with sessions.begin() as session:
                mark_deleted(session=session, tenant_id=None, job_id=job_id)
            report = purge_job(
                sessions, storage, job_id=job_id, batch_rows=settings.delete_batch_rows
            )
            assert report.done, report
            assert (report.partition_dropped, report.rows) == (own, 0 if own else rows), report

        delete_secs, delete_rate = timed(
            writer, lambda: delete(today, own=True, rows=docs), solo_seconds
        )
        solos.append(solo(writer, solo_seconds))
        shared_secs, shared_rate = timed(
            writer,
            lambda: delete(today_shared, own=False, rows=shared_docs),
            solo_seconds,
        )
        solos.append(solo(writer, solo_seconds))

        def drop_old_day() -> None:
            assert drop_partitions_past_retention(engine, retention_days=30) == 1

        def purge_old() -> None:
            tick = purge_tick(sessions=sessions, storage=storage, settings=settings)
            assert tick.purged >= 1, tick

        drop_secs, drop_rate = timed(writer, drop_old_day, solo_seconds)
        solos.append(solo(writer, solo_seconds))
        purge_secs, purge_rate = timed(writer, purge_old, solo_seconds)
        solos.append(solo(writer, solo_seconds))
        writer.finish()
        with sessions() as session:
            jobs = {"a": today, "b": today_shared, "c": old}
            left = session.execute(
                text("SELECT count(*) FROM jobs WHERE id IN (:a, :b, :c)"), jobs
            ).scalar_one()
            rows_left = session.execute(
                text("SELECT count(*) FROM results WHERE job_id IN (:a, :b, :c)"), jobs
            ).scalar_one()
        assert (left, rows_left) == (0, 0)
    finally:
        engine.dispose()
        server.stop()
        with psycopg.connect(
            "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    # Each case against the mean of the solo windows either side of it: the load of a shared
    # machine drifts over minutes.
    cases = [
        (f"DELETE {docs:,} (own partition)", delete_secs, delete_rate, mean(solos[0:2])),
        (f"DELETE {shared_docs:,} (shared, rows)", shared_secs, shared_rate, mean(solos[1:3])),
        ("retention: day partition dropped", drop_secs, drop_rate, mean(solos[2:4])),
        ("retention: then objects, shards, job", purge_secs, purge_rate, mean(solos[3:5])),
    ]
    return cases, solos, shared_docs


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--solo-seconds", type=float, default=20.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="whole passes, each on a fresh database; the table gives each case's median ratio "
        "(one pass's solo windows alone vary by ±10%% on a 2-core machine)",
    )
    args = parse_bench_args(parser, "retention")
    passes = [run_once(args.docs, args.solo_seconds) for _ in range(args.repeats)]
    shared_docs = passes[0][2]
    names = [case[0] for case in passes[0][0]]
    ratios = {
        n: [case[2] / case[3] for cases, _, _ in passes for case in cases if case[0] == n]
        for n in names
    }
    seconds = {
        n: [case[1] for cases, _, _ in passes for case in cases if case[0] == n] for n in names
    }
    print_table(
        f"{'case':<38} {'time (median)':>13} {'ratio to solo (median)':>23}  every pass",
        [
            f"{n:<38} {statistics.median(seconds[n]):>12.1f}s "
            f"{statistics.median(ratios[n]):>23.2f}  {' '.join(f'{r:.2f}' for r in ratios[n])}"
            for n in names
        ]
        + [
            f"{'solo rows/s, pass ' + str(i + 1):<38} " + " / ".join(f"{s:,.0f}" for s in solos)
            for i, (_, solos, _) in enumerate(passes)
        ],
    )
    write_results(
        args.out,
        {
            "docs": args.docs,
            "shared_docs": shared_docs,
            "repeats": args.repeats,
            "cases": [
                {
                    "case": n,
                    "seconds_median": round(statistics.median(seconds[n]), 2),
                    "vs_solo_median": round(statistics.median(ratios[n]), 3),
                    "vs_solo_each": [round(r, 3) for r in ratios[n]],
                }
                for n in names
            ],
            "passes": [
                {
                    "solo_rows_per_second": [round(s) for s in solos],
                    "cases": [
                        {
                            "case": case,
                            "seconds": round(secs, 2),
                            "other_rows_per_second": round(rate),
                            "solo_either_side_rows_per_second": round(near),
                            "vs_solo": round(rate / near, 3),
                        }
                        for case, secs, rate, near in cases
                    ],
                }
                for cases, solos, _ in passes
            ],
        },
    )


if __name__ == "__main__":
    main()
