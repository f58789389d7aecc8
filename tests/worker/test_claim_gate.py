"""worker.runtime.ClaimGate: a worker about to exit gives back every shard it holds
(worker/self_check.py), which is only all of them if no other thread is half-way through a claim
(committed, not yet held) or starts one after. Pure threads; no service is involved."""

from __future__ import annotations

import threading

from worker.runtime import ClaimGate

DEADLINE = 10.0


def test_close_waits_for_the_claim_under_way_and_then_nothing_is_claimed() -> None:
    gate = ClaimGate()
    inside, finish, closed = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def claimer() -> None:
        with gate() as open_:
            seen.append(open_)
            inside.set()
            finish.wait(DEADLINE)

    def closer() -> None:
        seen.append(gate.close(timeout=DEADLINE))
        closed.set()

    threads = [threading.Thread(target=claimer), threading.Thread(target=closer)]
    threads[0].start()
    assert inside.wait(DEADLINE)
    threads[1].start()
    # The closer must not return while a claim is under way (it could miss the shard's hold).
    assert not closed.wait(0.3)
    finish.set()
    assert closed.wait(DEADLINE)
    for thread in threads:
        thread.join(DEADLINE)
    assert seen == [True, True]
    with gate() as open_:
        assert open_ is False  # closed: a doorbell now claims nothing


def test_close_says_when_a_claim_outlived_its_timeout() -> None:
    gate = ClaimGate()
    with gate() as open_:
        assert open_ is True
        assert gate.close(timeout=0.05) is False
    with gate() as open_:
        assert open_ is False
