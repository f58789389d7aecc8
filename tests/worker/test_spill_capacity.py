"""What a spill worker reports it can finish when full (`capacity_docs_per_s`, which the router
plans deadline spill with): its slots over the seconds a call holds one, counting only the
slots its shards can fill. Against the stand-in managed API, a real HTTP server on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from postroom.domain import DEFAULT_INSTRUCTIONS, JobSpec, Label
from postroom.settings import Settings
from postroom_cli.standin import StandinServer
from worker.loop import LoopThread
from worker.spill import SpillClassifier

SPEC = JobSpec(
    labels=[Label(name="billing"), Label(name="bug")],
    instructions=DEFAULT_INSTRUCTIONS,
    mode="generative",
    model="tiny",
    revision="r",
)


@pytest.fixture
def loop(standin: StandinServer) -> Iterator[LoopThread]:
    standin.set_faults(latency=0.05)
    loop = LoopThread()
    yield loop
    loop.stop()
    standin.set_faults()


def _capacity_after_a_shard(
    loop: LoopThread, settings: Settings, *, shards_at_once: int, docs: int
) -> tuple[float, float]:
    """(reported capacity, seconds a call held a slot) after one shard of `docs` documents."""
    spill = SpillClassifier(loop=loop, settings=settings, shards_at_once=shards_at_once)
    shard = [{"id": f"d{i}", "text": f"my invoice is wrong {i}"} for i in range(docs)]
    results = spill.classify(job_id=uuid.uuid4(), spec=SPEC, shard="s/0", docs=shard)
    assert [r.error for r in results] == [None] * docs
    held = spill._slot_seconds.value
    assert held is not None
    assert held >= 0.05  # the stand-in's latency
    capacity = spill.health()["capacity_docs_per_s"]
    assert capacity is not None
    return capacity, held


def test_capacity_counts_only_the_slots_its_shards_can_fill(
    loop: LoopThread, settings: Settings
) -> None:
    s = settings.model_copy(update={"spill_concurrency": 32})
    # 2 shards of 4 documents at once keep at most 8 calls in flight, not 32
    few, held = _capacity_after_a_shard(loop, s, shards_at_once=2, docs=4)
    assert few == pytest.approx(8 / held, rel=0.02)
    # 16 shards of 4 could fill 64: the 32 slots bound it
    many, held = _capacity_after_a_shard(loop, s, shards_at_once=16, docs=4)
    assert many == pytest.approx(32 / held, rel=0.02)
