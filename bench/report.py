"""What every bench script shares at its edges: its arguments (`--out` under bench/results/), a
scratch folder, the printed table and the JSON it writes."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def parse_bench_args(parser: argparse.ArgumentParser, name: str) -> argparse.Namespace:
    """Adds `--out` (default bench/results/NAME.json), last, and parses the command line."""
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    return parser.parse_args()


def scratch_dir(name: str) -> Path:
    """A fresh folder for the run's documents and the stack's logs; kept for reading after."""
    return Path(tempfile.mkdtemp(prefix=f"postroom-{name}-"))


def print_table(head: str, rows: Iterable[str]) -> None:
    print(head)
    for row in rows:
        print(row)


def write_results(out: Path, body: dict[str, Any], *, machine: bool = True, also: str = "") -> None:
    """Writes `body` as JSON after the date (and, for results measured here, this machine) and
    says where: "wrote OUT" plus `also`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d")}
    if machine:
        meta["machine"] = f"{os.cpu_count()} CPUs, no GPU"
    out.write_text(json.dumps({**meta, **body}, indent=2))
    print(f"wrote {out}{also}")
