"""Streaming writer and engine: round trip, sharding, atomicity, determinism, loadability."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import open_checkpoint
from surgery.checkpoint.writer import parse_size, plan_shards, TensorSpec
from surgery.core.engine import OutputTensor, cast_tensor, copy_tensor, write_checkpoint
from surgery.core.errors import OutputExistsError, UsageError


def _sha_tree(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_round_trip_identical_bytes(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    out = tmp_path / "copy"
    write_checkpoint([copy_tensor(src, n) for n in src.names], out, donor=src, operation="copy", parameters={}, inputs=[src])
    ref = load_file(str(fixtures_dir / "llama-tiny" / "base" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k])
    # computed path (decode + re-encode) must give the same bytes too
    out2 = tmp_path / "computed"
    plan = [OutputTensor(n, src.info(n).shape, src.info(n).dtype, compute=(lambda n=n: src.get(n))) for n in src.names]
    write_checkpoint(plan, out2, donor=src, operation="copy", parameters={}, inputs=[src])
    got2 = load_file(str(out2 / "model.safetensors"))
    assert all(torch.equal(got2[k], ref[k]) for k in ref)


def test_output_loads_in_transformers_and_matches(fixtures_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    out = tmp_path / "out"
    write_checkpoint([cast_tensor(src, n, torch.float32) for n in src.names], out, donor=src, operation="convert",
                     parameters={"dtype": "float32"}, inputs=[src], shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(fixtures_dir / "llama-tiny" / "base", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


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


def test_deterministic_bytes(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "ft-a")
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        write_checkpoint([cast_tensor(src, n, torch.float16) for n in reversed(src.names)], out, donor=src,
                         operation="convert", parameters={"dtype": "float16"}, inputs=[src])
        outs.append(_sha_tree(out))
    assert outs[0] == outs[1]


def test_record_in_metadata_and_card(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    out = tmp_path / "rec"
    write_checkpoint([copy_tensor(src, n) for n in src.names], out, donor=src, operation="demo",
                     parameters={"alpha": 0.5}, inputs=[src], input_roles=["base"],
                     extra_record=lambda: {"lambda": 1.25})
    meta = open_checkpoint(out).metadata
    rec = json.loads(meta["surgery"])
    sha = hashlib.sha256((fixtures_dir / "llama-tiny" / "base" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["format"] == "pt"
    assert rec["operation"] == "demo" and rec["parameters"] == {"alpha": 0.5} and rec["results"] == {"lambda": 1.25}
    assert rec["inputs"] == [{"role": "base", "label": str(fixtures_dir / "llama-tiny" / "base"), "sha256": sha}]
    card = (out / "README.md").read_text()
    assert sha in card and '"alpha": 0.5' in card and "surgery demo" in card


def test_row_blocks_equal_whole(fixtures_dir, tmp_path, monkeypatch):
    import surgery.core.engine as engine

    monkeypatch.setattr(engine, "BLOCK_BYTES", 1024)  # force many row blocks
    src = open_checkpoint(fixtures_dir / "gpt2-tiny" / "base")
    out = tmp_path / "bf16"
    write_checkpoint([cast_tensor(src, n, torch.bfloat16) for n in src.names], out, donor=src, operation="convert",
                     parameters={}, inputs=[src])
    ck = open_checkpoint(out)
    for n in src.names:
        assert torch.equal(ck.get_raw(n), src.get_raw(n).to(torch.bfloat16)), n


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_crash_mid_write_leaves_nothing(fixtures_dir, tmp_path, exc):
    src_dir = tmp_path / "src"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", src_dir)
    before = _sha_tree(src_dir)
    src = open_checkpoint(src_dir)
    calls = []

    def compute(n):
        calls.append(n)
        if len(calls) == 5:
            raise exc("injected")
        return src.get(n)

    plan = [OutputTensor(n, src.info(n).shape, src.info(n).dtype, compute=(lambda n=n: compute(n))) for n in src.names]
    out = tmp_path / "out"
    with pytest.raises(exc):
        write_checkpoint(plan, out, donor=src, operation="x", parameters={}, inputs=[src], shard_size="50KB")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind
    assert _sha_tree(src_dir) == before


def test_crash_with_force_keeps_old_output(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    out = tmp_path / "out"
    write_checkpoint([copy_tensor(src, n) for n in src.names], out, donor=src, operation="x", parameters={}, inputs=[src])
    before = _sha_tree(out)

    def bad():
        raise Boom("x")

    plan = [copy_tensor(src, n) for n in src.names[1:]] + [OutputTensor(src.names[0], src.info(src.names[0]).shape, torch.float32, compute=bad)]
    with pytest.raises(Boom):
        write_checkpoint(plan, out, donor=src, operation="x", parameters={}, inputs=[src], force=True)
    assert _sha_tree(out) == before


def test_existing_output_refused_then_forced(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    plan = lambda: [copy_tensor(src, n) for n in src.names]  # noqa: E731
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        write_checkpoint(plan(), out, donor=src, operation="x", parameters={}, inputs=[src])
    assert (out / "keep.txt").exists()
    write_checkpoint(plan(), out, donor=src, operation="x", parameters={}, inputs=[src], force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_output_may_not_be_input(fixtures_dir, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(fixtures_dir / "llama-tiny" / "base", src_dir)
    src = open_checkpoint(src_dir)
    with pytest.raises(UsageError, match="is the input|contains the input"):
        write_checkpoint([copy_tensor(src, n) for n in src.names], src_dir, donor=src, operation="x",
                         parameters={}, inputs=[src], force=True)


def test_shape_mismatch_is_a_bug_not_silent(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    plan = [OutputTensor("w", (2, 2), torch.float32, compute=lambda: torch.zeros(3))]
    with pytest.raises(ValueError, match="planned"):
        write_checkpoint(plan, tmp_path / "o", donor=src, operation="x", parameters={})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects():
    with pytest.raises(UsageError, match="is not a size"):
        parse_size("five gigs")


def test_get_rows_matches_slice(fixtures_dir):
    ck = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    name = "model.layers.0.mlp.up_proj.weight"
    full = ck.get(name)
    assert torch.equal(ck.get_rows(name, 10, 37, dtype=torch.float32), full[10:37])
