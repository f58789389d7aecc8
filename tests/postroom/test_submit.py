"""Submission helpers against real S3 (moto server): background shard writes, the label check's
tokenizer (no torch in the API process)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from postroom.keys import input_shard_key
from postroom.settings import Settings
from postroom.shard_writer import ShardWriter
from postroom.storage import Storage
from postroom.tokens import load

LABELS = ["billing", "bills", "bug report", "bugfix", "praise", "question", "refund", "other"]


def test_shards_are_written_in_the_background_with_a_bounded_backlog(storage: Storage) -> None:
    job_id = uuid.uuid4()
    writer = ShardWriter(storage, job_id, in_flight=2)
    for shard_no in range(9):
        writer(shard_no, [{"id": f"{shard_no}-{i}", "text": "t", "line": i} for i in range(3)])
        assert len(writer._futures) <= 2
        if writer.backlogged:
            writer.drain()
    writer.flush()
    assert writer.written == 9
    for shard_no in range(9):
        lines = storage.get_bytes(input_shard_key(job_id, shard_no)).splitlines()
        assert [json.loads(line)["id"] for line in lines] == [f"{shard_no}-{i}" for i in range(3)]
    writer.discard()
    assert (
        list(
            storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"inputs/{job_id}/").get(
                "Contents", []
            )
        )
        == []
    )


def test_a_failed_write_surfaces_at_flush(settings: Settings) -> None:
    missing = Storage(settings.model_copy(update={"s3_bucket": f"missing-{uuid.uuid4().hex[:8]}"}))
    writer = ShardWriter(missing, uuid.uuid4())
    writer(0, [{"id": "1", "text": "t", "line": 1}])
    with pytest.raises(Exception, match="NoSuchBucket"):
        writer.flush()


@pytest.mark.parametrize("alias", ["tiny", "minilm"])
def test_the_label_check_tokenizer_equals_transformers(alias: str, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    path = str(tiny_model_dir) if alias == "tiny" else Settings().model_path(alias)
    fast, slow = load(path), AutoTokenizer.from_pretrained(path)
    for text in [*LABELS, "\n\nLabel: billing", "naïve ünïcode 中文", ""]:
        for special in (False, True):
            assert fast.encode(text, add_special_tokens=special) == slow.encode(
                text, add_special_tokens=special
            )


def test_the_api_checks_labels_without_loading_torch() -> None:
    # A subprocess: this test process has torch loaded already by other tests.
    code = (
        "import sys, api.main\n"
        "from postroom.settings import Settings\n"
        "from postroom.labels import label_collisions\n"
        f"label_collisions(Settings().model_path('minilm'), {tuple(LABELS)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
