"""surgery.checkpoint.writer: shard planning, sizes, the index."""

from __future__ import annotations

import json

import pytest
import torch

from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.writer import parse_size, plan_shards, TensorSpec
from surgery.core.engine import copy_tensor, write_checkpoint
from surgery.core.errors import UsageError


def test_sharding_index_and_sizes(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "gpt2-tiny" / "base")
    out = tmp_path / "sharded"
    limit = 60_000
    write_checkpoint([copy_tensor(src, n) for n in src.names], out, donor=src, operation="copy", parameters={},
                     inputs=[src], shard_size=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == src.total_bytes()
    assert sorted(index["weight_map"]) == src.names
    ck = open_checkpoint(out)
    for shard in shards:
        infos = [i for i in ck.tensors.values() if i.file.name == shard]
        size = sum(i.nbytes for i in infos)
        assert size <= limit or len(infos) == 1  # a tensor larger than the limit gets its own shard
        for i in infos:
            assert index["weight_map"][i.name] == shard
    for n in src.names:
        assert torch.equal(ck.get_raw(n), src.get_raw(n))


def test_plan_shards_greedy():
    specs = [TensorSpec(n, (s,), torch.uint8) for n, s in [("a", 40), ("b", 40), ("c", 100), ("d", 10)]]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 90)] == [["a", "b"], ["c"], ["d"]]


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects():
    with pytest.raises(UsageError, match="is not a size"):
        parse_size("five gigs")
