"""The router sends a shard where it finishes sooner: planning (pure) and a tick against real
Postgres and Redis."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from control.route_plans import Spilled, misses_deadline, plan_deadline, plan_take_back
from control.router import route_tick
from postroom.backlog import drain_rates
from postroom.db.models import Job, Shard, Worker
from postroom.policy import claim_best
from postroom.queue import QUEUE_SPILL, Celery, gpu_queue, queue_depth, trim_queue
from postroom.settings import Settings
from postroom.tenants import ensure_tenant

MARGIN = 1.25
SHARDS = [(n, 100) for n in range(8)]


def _old_plan(
    unclaimed: list[tuple[int, int]], *, ahead: int, rate: float, seconds_left: float
) -> tuple[list[int], int]:
    """The rule before spill was measured: spill what the GPUs cannot finish in time."""
    capacity = rate * max(seconds_left, 0.0) - ahead
    kept, spill = 0, list[int]()
    for shard_no, docs in unclaimed:
        if not spill and kept + docs <= capacity:
            kept += docs
        else:
            spill.append(shard_no)
    return spill, kept


# -- planning a deadline


def test_a_deadline_the_gpus_meet_spills_nothing() -> None:
    # 800 docs behind 200 at 100 docs/s: done in 10 s, due in 12 s; spill would be faster still
    spill, kept = plan_deadline(
        SHARDS, ahead=200, rate=100, seconds_left=12, spill_rate=1000, margin=MARGIN
    )
    assert (spill, kept) == ([], 800)


def test_an_unmeetable_deadline_spills_nothing_to_a_slower_spill_route() -> None:
    # The deadline has passed and 4,000 docs wait on GPUs draining 400 docs/s (10 s); spill drains
    # 40 docs/s behind 2,000 docs (50 s): every shard finishes sooner where it is.
    spill, kept = plan_deadline(
        SHARDS,
        ahead=4000,
        rate=400,
        seconds_left=-5,
        spill_ahead=2000,
        spill_rate=40,
        margin=MARGIN,
    )
    assert (spill, kept) == ([], 800)


def test_an_unmeetable_deadline_spills_only_what_spill_finishes_sooner() -> None:
    # GPUs: 100 docs/s behind 1,000 docs (11 s for the first shard). Spill: 25 docs/s, empty, so
    # a shard takes 4 s there and the n-th waits n x 4 s.
    spill, kept = plan_deadline(
        SHARDS, ahead=1000, rate=100, seconds_left=5, spill_rate=25, margin=MARGIN
    )
    # Spill finishes (x 1.25) 5, 10, then 15 s, against GPU finishes 11, 11, 11, 12, … 16 s:
    # shards 0 and 1 spill, 2 to 6 stay, and 7 spills too (15 s against 16 s).
    assert spill == [0, 1, 7]
    assert kept == 500


def test_a_shard_spill_finishes_in_time_spills_though_not_margin_times_sooner() -> None:
    # GPUs: 100 docs/s behind 400, due in 7 s: shards 0-2 finish in 5, 6, 7 s; shard 3 at 8 s.
    # Spill: 20 docs/s behind 40 docs: shard 3 would finish there in 7 s, in time (sooner than
    # 8 s, but not 1.25 x sooner); the next would take 12 s there, too late on both routes.
    spill, kept = plan_deadline(
        SHARDS, ahead=400, rate=100, seconds_left=7, spill_ahead=40, spill_rate=20, margin=MARGIN
    )
    assert spill == [3]
    assert kept == 700


def test_without_a_spill_measurement_what_the_gpus_cannot_finish_spills() -> None:
    for ahead in (0, 150, 400, 2000):
        for seconds_left in (-1.0, 0.0, 2.5, 6.0, 30.0):
            args: dict[str, Any] = {"ahead": ahead, "rate": 100, "seconds_left": seconds_left}
            # However deep the spill backlog is, an unmeasured spill route counts as instant.
            new = plan_deadline(SHARDS, **args, spill_ahead=10**6, spill_rate=None)
            assert new == _old_plan(SHARDS, **args), args
    assert plan_deadline(SHARDS, ahead=50, rate=100, seconds_left=3) == ([2, 3, 4, 5, 6, 7], 200)


def test_a_job_misses_its_deadline_when_either_part_of_its_split_finishes_late() -> None:
    # GPUs: 100 docs/s behind 200; spill: 50 docs/s behind 100; due in 5 s
    args: dict[str, Any] = {"ahead": 200, "rate": 100, "spill_ahead": 100, "spill_rate": 50}
    assert not misses_deadline(kept=300, spilled=100, seconds_left=5, **args)  # 5 s and 4 s
    assert misses_deadline(kept=301, spilled=100, seconds_left=5, **args)  # the GPUs' part
    assert misses_deadline(kept=300, spilled=151, seconds_left=5, **args)  # spill's part
    # Spill not measured yet counts as instant; nothing kept finishes at once
    assert not misses_deadline(kept=0, spilled=10**6, seconds_left=0.5, ahead=10**6, rate=1)
    # A deadline already past is missed by any work
    assert misses_deadline(kept=1, spilled=0, seconds_left=-1, ahead=0, rate=10**6)


# -- taking spilled shards back


def _backlog(job: uuid.UUID, shards: list[tuple[int, int]], home: str | None) -> list[Spilled]:
    return [Spilled(job, shard_no, docs, home) for shard_no, docs in shards]


def test_an_idle_gpu_takes_back_the_end_of_a_slow_spill_backlog() -> None:
    job, other = uuid.uuid4(), uuid.uuid4()
    # Spill works 100 docs and then these 8 shards at 20 docs/s; the GPUs drain 100 docs/s and
    # hold 200 docs. Shard 7 of an `always` job sits between them and must stay.
    backlog = [
        *_backlog(job, SHARDS[:7], "gpu.m"),
        *_backlog(other, [(7, 100)], None),
        *_backlog(job, SHARDS[7:], "gpu.m"),
    ]
    back = plan_take_back(
        backlog,
        running=100,
        spill_rate=20,
        ahead={"gpu.m": 200},
        rates={"gpu.m": 100.0},
        margin=MARGIN,
    )
    # From the end while (GPU finish) x 1.25 < spill finish: shard 7 (50 s on spill, 3 s on the
    # GPUs), past the `always` shard, then shard n < 7 (5 (n + 2) s on spill, 10 - n s on the
    # GPUs behind those taken back) down to shard 1; shard 0 stays (10 s against 10 s x 1.25).
    assert [(s.job_id, s.shard_no) for s in back] == [(job, n) for n in (7, 6, 5, 4, 3, 2, 1)]


def test_nothing_comes_back_without_a_spill_measurement_or_a_gpu_rate() -> None:
    backlog = _backlog(uuid.uuid4(), SHARDS, "gpu.m")
    busy: dict[str, Any] = {"running": 0, "ahead": {"gpu.m": 100}, "margin": MARGIN}
    assert plan_take_back(backlog, spill_rate=None, rates={"gpu.m": 100.0}, **busy) == []
    assert plan_take_back(backlog, spill_rate=1.0, rates={"gpu.other": 100.0}, **busy) == []
    assert plan_take_back(backlog, spill_rate=1.0, rates={"gpu.m": 100.0}, **busy)


@pytest.mark.parametrize("spill_rate", [None, 1.0, 1000.0])
def test_while_spill_is_down_every_shard_with_a_home_comes_back(spill_rate: float | None) -> None:
    job, stays = uuid.uuid4(), uuid.uuid4()
    backlog = [*_backlog(job, SHARDS[:4], "gpu.m"), *_backlog(stays, [(0, 100)], None)]
    # GPUs far behind and slower than spill: with spill up, nothing would come back …
    busy: dict[str, Any] = {"running": 0, "ahead": {"gpu.m": 10**6}, "rates": {"gpu.m": 1.0}}
    up = plan_take_back(backlog, spill_rate=spill_rate, margin=MARGIN, **busy)
    assert up == []
    # … with spill down, every shard that has a GPU queue to go to does, from the end
    down = plan_take_back(backlog, spill_rate=spill_rate, margin=MARGIN, spill_down=True, **busy)
    assert [(s.job_id, s.shard_no) for s in down] == [(job, n) for n in (3, 2, 1, 0)]


@pytest.mark.parametrize("spill_rate", [None, 1.0, 1000.0])
def test_an_idle_unmeasured_gpu_takes_back_one_shard_to_measure_itself(
    spill_rate: float | None,
) -> None:
    # Back from an outage: the GPUs did nothing for a whole window, so they have no rate.
    job = uuid.uuid4()
    backlog = [*_backlog(job, SHARDS, "gpu.m"), *_backlog(uuid.uuid4(), [(0, 100)], None)]
    common: dict[str, Any] = {"running": 0, "spill_rate": spill_rate, "margin": MARGIN}
    back = plan_take_back(backlog, ahead={}, rates={}, **common)
    assert [(s.job_id, s.shard_no) for s in back] == [(job, 7)]
    # Once it has work it waits for a measurement
    assert plan_take_back(backlog, ahead={"gpu.m": 100}, rates={}, **common) == []


@pytest.mark.parametrize("seconds_left", [0.0, 6.0, 15.0])
@pytest.mark.parametrize("spill_rate", [5.0, 20.0, 60.0, 150.0, 400.0])
@pytest.mark.parametrize("ahead", [0, 300, 1500, 6000])
def test_plan_then_take_back_with_the_same_numbers_moves_nothing(
    spill_rate: float, ahead: int, seconds_left: float
) -> None:
    job = uuid.uuid4()
    running = 200
    # Given a job due now (or soon) whose shards the router splits between the routes …
    spill, kept = plan_deadline(
        SHARDS,
        ahead=ahead,
        rate=100,
        seconds_left=seconds_left,
        spill_ahead=running,
        spill_rate=spill_rate,
        margin=MARGIN,
    )
    if spill_rate >= 60.0 and ahead >= 1500:
        assert spill, "a fast enough spill route takes shards"
    spilled = [(n, d) for n, d in SHARDS if n in spill]
    # … the next tick, with the same numbers, takes none of them back
    back = plan_take_back(
        _backlog(job, spilled, "gpu.m"),
        running=running,
        spill_rate=spill_rate,
        ahead={"gpu.m": ahead + kept},
        rates={"gpu.m": 100.0},
        margin=MARGIN,
    )
    assert back == []


@pytest.mark.parametrize("spill_rate", [5.0, 20.0, 60.0, 150.0])
@pytest.mark.parametrize("ahead", [0, 300, 1500])
def test_take_back_then_plan_with_the_same_numbers_moves_nothing(
    spill_rate: float, ahead: int
) -> None:
    job = uuid.uuid4()
    running = 100
    backlog = _backlog(job, SHARDS, "gpu.m")
    # Given the GPUs take back the end of a spill backlog …
    back = plan_take_back(
        backlog,
        running=running,
        spill_rate=spill_rate,
        ahead={"gpu.m": ahead},
        rates={"gpu.m": 100.0},
        margin=MARGIN,
    )
    if spill_rate <= 20.0:
        assert back, "a slow spill route gives shards back"
    taken = sorted((s.shard_no, s.docs) for s in back)
    left = sum(s.docs for s in backlog if s not in back)
    # … the next tick, with the same numbers and the deadline past, spills none of them again
    spill, kept = plan_deadline(
        taken,
        ahead=ahead,
        rate=100,
        seconds_left=-1,
        spill_ahead=running + left,
        spill_rate=spill_rate,
        margin=MARGIN,
    )
    assert (spill, kept) == ([], sum(d for _, d in taken))


# -- a tick against Postgres and Redis


def _add_job(session: Session, *, tenant_id: uuid.UUID, model: str, **values: Any) -> uuid.UUID:
    job_id = uuid.uuid4()
    values.setdefault("status", "running")
    session.add(Job(id=job_id, tenant_id=tenant_id, spec={}, model=model, **values))
    session.flush()
    return job_id


def _add_shards(
    session: Session, job_id: uuid.UUID, shard_nos: range, *, docs: int = 100, **values: Any
) -> None:
    values.setdefault("state", "queued")
    rows = [{"job_id": job_id, "shard_no": n, "doc_count": docs, **values} for n in shard_nos]
    session.execute(insert(Shard).values(rows))


def _queues(sessions: sessionmaker[Session], job_id: uuid.UUID) -> dict[int, str]:
    with sessions() as session:
        rows = session.execute(
            select(Shard.shard_no, Shard.queue, Shard.enqueued_at).where(Shard.job_id == job_id)
        ).all()
    assert all(enqueued is not None for _, _, enqueued in rows)  # every move was published
    return {shard_no: queue for shard_no, queue, _ in rows}


def _decisions(decision: str, reason: str) -> float:
    labels = {"decision": decision, "reason": reason}
    return REGISTRY.get_sample_value("postroom_router_decisions_total", labels) or 0.0


def _take_backs() -> float:
    return _decisions("take_back", "gpu sooner")


def _add_worker(
    session: Session, name: str, *, route: str, models: list[str], stats: dict[str, Any]
) -> None:
    values = {"route": route, "models": models, "stats": stats, "heartbeat_at": datetime.now(UTC)}
    stmt = insert(Worker).values(name=name, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=[Worker.name], set_=values))


def _router_note(sessions: sessionmaker[Session], job_id: uuid.UUID) -> str | None:
    with sessions() as session:
        return session.scalar(select(Job.router_note).where(Job.id == job_id))


@dataclass
class Scene:
    """A tick's world of one test: a private database (the tick decides for every job, so other
    tests' jobs would be routed too), a model alias and its GPU queue, a tenant, and the names of
    a GPU and a spill worker (registered by the test that wants them)."""

    sessions: sessionmaker[Session]
    settings: Settings
    celery: Celery
    alias: str
    tenant_id: uuid.UUID
    now: datetime

    @property
    def home(self) -> str:
        return gpu_queue(self.alias)

    @property
    def gpu(self) -> str:
        return f"gpu@router-test:{self.alias}"

    @property
    def spill(self) -> str:
        return f"spill@router-test:{self.alias}"

    def job(self, session: Session, **values: Any) -> uuid.UUID:
        values.setdefault("model", self.alias)
        return _add_job(session, tenant_id=self.tenant_id, **values)

    def tick(self) -> list[Any]:
        return route_tick(sessions=self.sessions, celery=self.celery, settings=self.settings)


@pytest.fixture
def scene(
    private_db: tuple[sessionmaker[Session], Settings], celery: Celery, broker: redis.Redis
) -> Iterator[Scene]:
    sessions, settings = private_db
    alias = f"router-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        tenant_id = ensure_tenant(session=session, name=f"t-{alias}")
    prefix = settings.broker_key_prefix
    spill_before = queue_depth(broker, QUEUE_SPILL, prefix=prefix)
    world = Scene(sessions, settings, celery, alias, tenant_id, datetime.now(UTC))
    yield world
    # The database goes with private_db; the doorbells the ticks rang stay in the shared broker.
    for key in broker.scan_iter(match=f"{prefix}*{world.home}*"):
        broker.delete(key)
    spilled = queue_depth(broker, QUEUE_SPILL, prefix=prefix) - spill_before
    trim_queue(broker, QUEUE_SPILL, spilled, prefix=prefix)


def test_an_idle_gpu_takes_back_unclaimed_auto_shards_from_a_slow_spill_queue(
    scene: Scene, broker: redis.Redis
) -> None:
    sessions, home, now = scene.sessions, scene.home, scene.now
    with sessions.begin() as session:
        # Given a live GPU worker for the model, which finished 100,000 docs in the window …
        _add_worker(session, scene.gpu, route="gpu", models=[scene.alias], stats={})
        _add_worker(session, scene.spill, route="spill", models=[], stats={})
        history = scene.job(session, status="completed")
        done = {"state": "done", "finished_at": now}
        _add_shards(session, history, range(1), docs=100_000, queue=home, route="gpu", **done)
        # … a spill route that finished 20 docs in the window …
        _add_shards(
            session, history, range(1, 2), docs=20, queue=QUEUE_SPILL, route="spill", **done
        )
        # … an `auto` job past its deadline, 4 shards waiting in spill and one a spill worker holds
        auto = scene.job(session, deadline=now - timedelta(seconds=1))
        _add_shards(session, auto, range(4), queue=QUEUE_SPILL, enqueued_at=now)
        _add_shards(
            session,
            auto,
            range(4, 5),
            queue=QUEUE_SPILL,
            state="running",
            enqueued_at=now,
            lease_until=now + timedelta(minutes=5),
        )
        # … and an `always` job waiting in spill too
        always = scene.job(session, spill="always")
        _add_shards(session, always, range(2), queue=QUEUE_SPILL, enqueued_at=now)
    before = _take_backs()
    # When the router ticks
    decisions = scene.tick()
    # Then the unclaimed `auto` shards go back to the GPU queue, with a message there each
    assert [(d.job_id, d.action, d.shards) for d in decisions] == [
        (auto, "take_back", [0, 1, 2, 3])
    ]
    assert _queues(sessions, auto) == {0: home, 1: home, 2: home, 3: home, 4: QUEUE_SPILL}
    assert _queues(sessions, always) == {0: QUEUE_SPILL, 1: QUEUE_SPILL}
    assert queue_depth(broker, home, prefix=scene.settings.broker_key_prefix) == 4
    assert _take_backs() == before + 1
    # And the next tick, with the same numbers, leaves them there (no ping-pong) although the
    # job's deadline has passed
    assert [d for d in scene.tick() if d.job_id in (auto, always)] == []
    assert _queues(sessions, auto) == {0: home, 1: home, 2: home, 3: home, 4: QUEUE_SPILL}


def test_deadline_work_waits_for_the_gpus_while_no_spill_worker_is_live(scene: Scene) -> None:
    sessions, home, now = scene.sessions, scene.home, scene.now
    with sessions.begin() as session:
        # Given a live GPU worker that drains ~100 docs/s, no spill worker at all …
        _add_worker(session, scene.gpu, route="gpu", models=[scene.alias], stats={})
        history = scene.job(session, status="completed")
        done = {"state": "done", "route": "gpu", "finished_at": now, "queue": home}
        _add_shards(session, history, range(1), docs=6000, **done)
        # … and a job of 8 x 100 docs due in 2 s, which the GPUs cannot finish in time
        job = scene.job(session, deadline=now + timedelta(seconds=2))
        _add_shards(session, job, range(8), queue=home, enqueued_at=now)
    held = _decisions("hold", "spill down")
    # When the router ticks, nothing spills: there is nobody to run it there
    assert scene.tick() == []
    assert set(_queues(sessions, job).values()) == {home}
    note = _router_note(sessions, job) or ""
    assert note.startswith("deadline at risk:"), note
    assert "no spill worker sent a heartbeat" in note
    assert _decisions("hold", "spill down") == held + 1
    # Once a spill worker is live, the next tick spills what the GPUs cannot finish, and the
    # note is cleared
    with sessions.begin() as session:
        _add_worker(session, scene.spill, route="spill", models=[], stats={})
    decisions = scene.tick()
    assert [(d.job_id, d.action) for d in decisions] == [(job, "spill")]
    assert 0 < len(decisions[0].shards) < 8
    assert QUEUE_SPILL in set(_queues(sessions, job).values())
    assert _router_note(sessions, job) is None


def test_spilled_shards_go_back_to_live_gpus_while_every_spill_breaker_is_open(
    scene: Scene,
) -> None:
    sessions, home, now = scene.sessions, scene.home, scene.now
    spills = [f"{scene.spill}:{n}" for n in range(2)]
    open_breaker = {"spill": {"breaker_open": True}}
    with sessions.begin() as session:
        # Given a live GPU worker, and two live spill workers whose breakers are open …
        _add_worker(session, scene.gpu, route="gpu", models=[scene.alias], stats={})
        for name in spills:
            _add_worker(session, name, route="spill", models=[], stats=open_breaker)
        # … an `auto` job with 3 shards waiting in spill, an `always` job, and an `auto` job whose
        # model has no live GPU worker
        auto = scene.job(session)
        _add_shards(session, auto, range(3), queue=QUEUE_SPILL, enqueued_at=now)
        always = scene.job(session, spill="always")
        _add_shards(session, always, range(1), queue=QUEUE_SPILL, enqueued_at=now)
        orphan = scene.job(session, model=f"{scene.alias}-dead")
        _add_shards(session, orphan, range(1), queue=QUEUE_SPILL, enqueued_at=now)
    before = _decisions("take_back", "spill down")
    # When the router ticks, the `auto` job's shards go back to its GPUs, the others stay
    decisions = scene.tick()
    assert [(d.job_id, d.action, sorted(d.shards)) for d in decisions] == [
        (auto, "take_back", [0, 1, 2])
    ]
    assert "breakers are open" in decisions[0].reason
    assert _queues(sessions, auto) == {0: home, 1: home, 2: home}
    assert _queues(sessions, always) == {0: QUEUE_SPILL}
    assert _queues(sessions, orphan) == {0: QUEUE_SPILL}
    assert _decisions("take_back", "spill down") == before + 1
    # And once one breaker closes, spill is up again: nothing more moves
    with sessions.begin() as session:
        _add_worker(session, spills[0], route="spill", models=[], stats={"spill": {}})
        _add_shards(session, auto, range(3, 4), queue=QUEUE_SPILL, enqueued_at=now)
    assert [d for d in scene.tick() if d.job_id == auto] == []


def test_a_spill_route_sent_little_is_planned_at_the_capacity_its_workers_report(
    scene: Scene,
) -> None:
    sessions, home, now = scene.sessions, scene.home, scene.now
    with sessions.begin() as session:
        # Given GPUs that drained 1,000 docs/s (100 s of work waiting) and a spill route that
        # finished only the 20 docs it was sent, but whose worker reports 500 docs/s when full …
        _add_worker(session, scene.gpu, route="gpu", models=[scene.alias], stats={})
        report = {"spill": {"breaker_open": False, "capacity_docs_per_s": 500.0}}
        _add_worker(session, scene.spill, route="spill", models=[], stats=report)
        history = scene.job(session, status="completed")
        done = {"state": "done", "finished_at": now, "started_at": now - timedelta(seconds=60)}
        _add_shards(session, history, range(1), docs=60_000, queue=home, route="gpu", **done)
        _add_shards(
            session, history, range(1, 2), docs=20, queue=QUEUE_SPILL, route="spill", **done
        )
        busy = scene.job(session)
        _add_shards(session, busy, range(1), docs=100_000, queue=home, enqueued_at=now)
        # … and 4 shards of an `auto` job waiting in spill (400 docs: under a second there at
        # 500 docs/s, 400 s at the measured 1 doc/s; 100 s behind the GPUs' backlog)
        auto = scene.job(session)
        _add_shards(session, auto, range(4), queue=QUEUE_SPILL, enqueued_at=now)
    # When the router ticks, they stay on spill
    assert [d for d in scene.tick() if d.job_id == auto] == []
    assert set(_queues(sessions, auto).values()) == {QUEUE_SPILL}
    # And without the report, the drain rate alone (20 docs over the window) makes the GPUs look
    # sooner even 100 s behind: all four go back there
    with sessions.begin() as session:
        _add_worker(session, scene.spill, route="spill", models=[], stats={})
    assert [(d.job_id, d.action, sorted(d.shards)) for d in scene.tick()] == [
        (auto, "take_back", [0, 1, 2, 3])
    ]


def test_a_route_that_started_within_the_window_is_measured_from_its_start(
    sessions: sessionmaker[Session],
) -> None:
    fresh, steady = (gpu_queue(f"rate-{uuid.uuid4().hex[:8]}") for _ in range(2))
    now = datetime.now(UTC)
    with sessions.begin() as session:
        tenant_id = ensure_tenant(session=session, name=f"t-{uuid.uuid4().hex[:8]}")
        job = _add_job(session, tenant_id=tenant_id, model="m", status="completed")
        done = {"state": "done", "route": "gpu", "finished_at": now - timedelta(seconds=1)}
        # 1,000 docs done by a GPU that started 10 s ago; 1,200 by one busy the whole minute
        _add_shards(
            session,
            job,
            range(2),
            docs=500,
            queue=fresh,
            started_at=now - timedelta(seconds=10),
            **done,
        )
        _add_shards(
            session,
            job,
            range(2, 4),
            docs=600,
            queue=steady,
            started_at=now - timedelta(seconds=300),
            **done,
        )
    try:
        with sessions() as session:
            rates, _ = drain_rates(session=session, now=now, window=60.0)
        assert rates[fresh] == pytest.approx(100.0)
        assert rates[steady] == pytest.approx(20.0)
    finally:
        with sessions.begin() as session:
            session.execute(delete(Job).where(Job.id == job))


@pytest.mark.parametrize("policy", ["auto", "never"])
def test_a_job_that_misses_its_deadline_anyway_does_not_make_the_next_one_miss_too(
    scene: Scene, policy: str
) -> None:
    sessions, home, now = scene.sessions, scene.home, scene.now
    report = {"spill": {"breaker_open": False, "capacity_docs_per_s": 10.0}}
    with sessions.begin() as session:
        # Given GPUs that drain ~100 docs/s and a spill route that finishes 10 docs/s …
        _add_worker(session, scene.gpu, route="gpu", models=[scene.alias], stats={})
        _add_worker(session, scene.spill, route="spill", models=[], stats=report)
        history = scene.job(session, status="completed")
        done = {"state": "done", "route": "gpu", "finished_at": now, "queue": home}
        _add_shards(session, history, range(1), docs=6000, **done)
        # … a job of 800 docs due in 2 s (8 s on the GPUs, 80 s on spill: lost either way, and if
        # it may not spill at all) …
        lost = scene.job(
            session,
            deadline=now + timedelta(seconds=2),
            created_at=now,
            shard_count=8,
            spill=policy,
        )
        _add_shards(session, lost, range(8), queue=home, enqueued_at=now)
        # … and a later one of 500 due in 10 s: in time only if the lost job does not go first
        later = scene.job(
            session,
            deadline=now + timedelta(seconds=10),
            created_at=now + timedelta(seconds=1),
            shard_count=5,
        )
        _add_shards(session, later, range(5), queue=home, enqueued_at=now)
    held = _decisions("hold", "deadline lost")
    # When the router ticks, nothing spills: spill would not save the first, the second needs
    # no help once the first runs after it
    assert scene.tick() == []
    assert set(_queues(sessions, lost).values()) == {home}
    assert set(_queues(sessions, later).values()) == {home}
    with sessions() as session:
        flags = dict(session.execute(select(Job.id, Job.deadline_lost)).tuples().all())
    assert (flags[lost], flags[later]) == (True, False)
    note = _router_note(sessions, lost) or ""
    # "due in" counts down from the scene's `now`: a slow tick on a busy machine reads 1s
    assert re.match(r"deadline lost: due in [12]s;", note), note
    assert ("may not spill" in note) == (policy == "never"), note
    assert _router_note(sessions, later) is None
    assert _decisions("hold", "deadline lost") == held + 1
    # And the claim policy takes the later job's shards first
    with sessions.begin() as session:
        got = claim_best(
            session=session,
            queue=home,
            worker=scene.gpu,
            lease_seconds=60,
            route="gpu",
            settings=scene.settings,
        )
    assert got is not None
    assert got[0] == later
    # Once the deadline is within reach again (here: moved out), the verdict is taken back
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == lost).values(deadline=now + timedelta(seconds=60))
        )
    scene.tick()
    assert _router_note(sessions, lost) is None
    with sessions() as session:
        assert session.scalar(select(Job.deadline_lost).where(Job.id == lost)) is False
