"""`postroom worker --gpus`: GPU groups, refusals, and a supervisor that restarts only the child
that died. The children are real `postroom worker` processes on the test stack; this machine has
no GPU, so the host's GPUs are declared with POSTROOM_VISIBLE_GPUS (the setting for hosts without
nvidia-smi) and the children label with the null classifier instead of starting vLLM engines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from postroom.db.models import Worker
from postroom.gpus import GpuConfigError, GpuGroup, check_fits, plan_groups, visible_gpus
from postroom.settings import ModelSpec, Settings
from postroom_cli.local import postroom_command, spawn, stop
from tests.stack import tail
from tests.waiting import wait_until
from worker.supervisor import child_environment

ONE = ModelSpec(path="/m", mode="generative", revision="r")
TP2 = ModelSpec(path="/m", mode="generative", revision="r", tensor_parallel_size=2)
TP2_DP2 = ModelSpec(
    path="/m", mode="generative", revision="r", tensor_parallel_size=2, data_parallel_size=2
)


def test_one_group_per_gpu_and_all_means_every_visible_gpu() -> None:
    groups = plan_groups("all", visible=[0, 1, 2, 3], specs={"a": ONE})
    assert [g.gpus for g in groups] == [(0,), (1,), (2,), (3,)]
    assert [g.index for g in groups] == [0, 1, 2, 3]
    assert plan_groups("3,1", visible=[0, 1, 2, 3], specs={"a": ONE})[0].gpus == (3,)


def test_tensor_parallel_aliases_get_whole_groups() -> None:
    groups = plan_groups("0,1,2,3", visible=[0, 1, 2, 3], specs={"a": ONE, "big": TP2})
    assert [g.gpus for g in groups] == [(0, 1), (2, 3)]
    assert groups[1].cuda_visible_devices == "2,3"
    assert [g.gpus for g in plan_groups("all", visible=[0, 1, 2, 3], specs={"x": TP2_DP2})] == [
        (0, 1, 2, 3)
    ]


@pytest.mark.parametrize(
    ("requested", "visible", "specs", "says"),
    [
        ("0,1,2", [0, 1, 2, 3], {"big": TP2}, "groups of 2 per worker: big needs 2"),
        ("0", [0, 1], {"big": TP2}, "give a multiple of 2"),
        ("all", [0, 1, 2], {"x": TP2_DP2}, "data_parallel_size=2"),
        ("0,5", [0, 1], {"a": ONE}, "GPU 5 is not visible; this host shows 0, 1"),
        ("0,0", [0, 1], {"a": ONE}, "listed twice"),
        ("zero", [0, 1], {"a": ONE}, "expected GPU indices"),
        ("all", [], {"a": ONE}, "this host shows none"),
    ],
)
def test_configurations_that_do_not_fit_are_refused_with_what_to_change(
    requested: str, visible: list[int], specs: dict[str, ModelSpec], says: str
) -> None:
    with pytest.raises(GpuConfigError, match=says):
        plan_groups(requested, visible=visible, specs=specs)


def test_a_worker_refuses_an_alias_that_needs_more_gpus_than_it_sees() -> None:
    check_fits({"a": ONE, "big": TP2}, visible=2, device="cuda")  # fits
    with pytest.raises(GpuConfigError, match=r"'big' needs 2 GPUs .* this worker sees 1"):
        check_fits({"big": TP2}, visible=1, device="cuda")
    with pytest.raises(GpuConfigError, match="runs on cpu"):
        check_fits({"big": TP2}, visible=0, device="cpu")


def test_visible_gpus_follow_the_override_then_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert visible_gpus("2,3") == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpus(None) == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus(None) == []


def test_each_child_gets_its_gpus_and_its_own_metrics_port(settings: Settings) -> None:
    env = child_environment(
        settings.model_copy(update={"worker_metrics_port": 9200}), GpuGroup(1, (2, 3))
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["POSTROOM_WORKER_METRICS_PORT"] == "9201"
    off = child_environment(
        settings.model_copy(update={"worker_metrics_port": 0}), GpuGroup(1, (2,))
    )
    assert off["POSTROOM_WORKER_METRICS_PORT"] == "0"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gpus", "0,1,2"], "give a multiple of 2"),
        ([], "needs 2 GPUs (tensor_parallel_size=2, data_parallel_size=1) but this worker runs on"),
    ],
)
def test_the_worker_command_refuses_what_does_not_fit(
    env: dict[str, str], args: list[str], says: str
) -> None:
    spec = {"path": "/m", "mode": "generative", "revision": "r", "tensor_parallel_size": 2}
    big = {
        "POSTROOM_MODELS": json.dumps({"big": spec}),
        "POSTROOM_MODEL": "big",
        "POSTROOM_WORKER_MODELS": "big",
        "POSTROOM_VISIBLE_GPUS": "0,1,2",
        "POSTROOM_ENGINE_DEVICE": "cpu",
    }
    out = subprocess.run(
        postroom_command("worker", "--models", "big", *args),
        env={**os.environ, **env, **big},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert says in " ".join(out.stderr.replace("│", " ").split())  # rich boxes and wraps it


def _children(sessions: sessionmaker[Session], supervisor: int) -> dict[int, str]:
    """pid -> worker name of each live registered child of `supervisor`."""
    with sessions() as session:
        names = session.scalars(select(Worker.name).where(Worker.name.startswith("gpu@"))).all()
    # Worker names end with the pid (`gpu@host:pid`); rows other tests made by hand may not.
    tails = {name: name.rpartition(":")[2] for name in names}
    pids = {int(tail): name for name, tail in tails.items() if tail.isdigit()}
    return {pid: name for pid, name in pids.items() if _parent(pid) == supervisor}


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def supervised(
    env: dict[str, str], logs_dir: Path, sessions: sessionmaker[Session]
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = logs_dir / "supervisor.log"
    # Its own queue: nothing is published there, so the null-labelling children take no shard
    # of another test.
    proc = spawn(
        postroom_command("worker", "--gpus", "all", "--queues", "supervised-test"),
        env={
            **env,
            "POSTROOM_VISIBLE_GPUS": "0,1",
            "POSTROOM_WORKER_NULL_CLASSIFIER": "true",
            "POSTROOM_WORKER_MODELS": "tiny",
            "POSTROOM_WORKER_METRICS_PORT": "0",
        },
        log=log,
    )
    yield proc, log
    stop(proc)


def test_a_child_that_dies_is_restarted_and_the_other_keeps_running(
    supervised: tuple[subprocess.Popen[bytes], Path], sessions: sessionmaker[Session]
) -> None:
    proc, log = supervised

    names: set[str] = set()

    def two_children() -> dict[int, str] | None:
        children = _children(sessions, proc.pid)
        names.update(children.values())
        return children if len(children) == 2 else None

    try:
        first = wait_until(two_children, timeout=120, what="two children registered", alive=proc)
        victim, survivor = sorted(first)
        os.kill(victim, signal.SIGKILL)

        def replaced() -> dict[int, str] | None:
            now = two_children()
            return now if now and victim not in now else None

        second = wait_until(replaced, timeout=120, what="the dead child restarted", alive=proc)
    except (TimeoutError, RuntimeError) as e:
        pytest.fail(f"{e}\n{tail(log)}")
    assert survivor in second  # the other child was never touched
    assert "exited with -9" in log.read_text()
    # Stopping the supervisor stops every child.
    stop(proc)
    wait_until(lambda: not any(_alive(pid) for pid in second), timeout=60, what="children gone")
    with sessions.begin() as session:  # they registered models the other tests' API serves
        session.execute(delete(Worker).where(Worker.name.in_(names)))
