"""Which GPUs a host has and how `postroom worker --gpus` splits them between worker processes.

A worker process hosts one engine per served alias on the GPUs it is given (its
`CUDA_VISIBLE_DEVICES`). An alias with `tensor_parallel_size` T and `data_parallel_size` D needs
T x D GPUs per engine, so each process gets the largest such group among its aliases, and the GPUs
asked for must split into whole groups. Anything that does not fit is refused before a process
starts, with what to change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from postroom.errors import PostroomError
from postroom.settings import ModelSpec


class GpuConfigError(PostroomError):
    """A `--gpus` request or a registry entry that the visible GPUs cannot satisfy."""


@dataclass(frozen=True)
class GpuGroup:
    """The GPUs one worker process owns, as it sees them through `CUDA_VISIBLE_DEVICES`."""

    index: int
    gpus: tuple[int, ...]

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(gpu) for gpu in self.gpus)


def visible_gpus(override: str | None = None) -> list[int]:
    """GPU indices this host offers: `override` (POSTROOM_VISIBLE_GPUS) when set, otherwise
    `CUDA_VISIBLE_DEVICES` when set, otherwise what `nvidia-smi` lists (none without it)."""
    declared = override if override is not None else os.environ.get("CUDA_VISIBLE_DEVICES")  # noqa: TID251 - CUDA's own variable
    if declared is not None:
        return _parse_indices(declared, what="visible GPUs")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return _parse_indices(out.replace("\n", ","), what="nvidia-smi")


def gpus_per_engine(spec: ModelSpec) -> int:
    return spec.tensor_parallel_size * spec.data_parallel_size


def plan_groups(
    requested: str, *, visible: list[int], specs: dict[str, ModelSpec]
) -> list[GpuGroup]:
    """Split the GPUs of `--gpus` (`all` or `0,1,…`) into one group per worker process."""
    if not visible:
        raise GpuConfigError(
            "--gpus needs NVIDIA GPUs and this host shows none (no nvidia-smi, or it lists "
            "none, and CUDA_VISIBLE_DEVICES / POSTROOM_VISIBLE_GPUS are unset): run "
            "`postroom worker` without --gpus"
        )
    gpus = list(visible) if requested.strip() == "all" else _parse_indices(requested, what="--gpus")
    missing = [gpu for gpu in gpus if gpu not in visible]
    if missing:
        raise GpuConfigError(
            f"--gpus {requested}: GPU {', '.join(map(str, missing))} is not visible; "
            f"this host shows {', '.join(map(str, visible))}"
        )
    if len(set(gpus)) != len(gpus):
        raise GpuConfigError(f"--gpus {requested}: a GPU is listed twice")
    size = max((gpus_per_engine(spec) for spec in specs.values()), default=1)
    if len(gpus) < size or len(gpus) % size:
        needs = ", ".join(
            f"{alias} needs {gpus_per_engine(spec)} (tensor_parallel_size="
            f"{spec.tensor_parallel_size}, data_parallel_size={spec.data_parallel_size})"
            for alias, spec in specs.items()
            if gpus_per_engine(spec) == size
        )
        raise GpuConfigError(
            f"--gpus {requested} gives {len(gpus)} GPU(s), which do not split into whole groups "
            f"of {size} per worker: {needs}; give a multiple of {size}"
        )
    return [
        GpuGroup(index=n, gpus=tuple(gpus[start : start + size]))
        for n, start in enumerate(range(0, len(gpus), size))
    ]


def check_fits(specs: dict[str, ModelSpec], *, visible: int, device: str) -> None:
    """Refuse, before an engine starts, an alias that needs more GPUs than this process sees."""
    for alias, spec in specs.items():
        need = gpus_per_engine(spec)
        if need == 1:
            continue
        if device != "cuda":
            raise GpuConfigError(
                f"model {alias!r} needs {need} GPUs (tensor_parallel_size="
                f"{spec.tensor_parallel_size}, data_parallel_size={spec.data_parallel_size}) "
                f"but this worker runs on {device}: serve it on a GPU host"
            )
        if need > visible:
            raise GpuConfigError(
                f"model {alias!r} needs {need} GPUs (tensor_parallel_size="
                f"{spec.tensor_parallel_size}, data_parallel_size={spec.data_parallel_size}) "
                f"but this worker sees {visible}: give it more with --gpus or "
                f"CUDA_VISIBLE_DEVICES, or lower the sizes in POSTROOM_MODELS"
            )


def _parse_indices(text: str, *, what: str) -> list[int]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise GpuConfigError(f"{what}: expected GPU indices like 0,1 (or `all`), got {text!r}")
    return [int(part) for part in parts]
