"""surgery.core.engine.write_checkpoint: the one checkpoint writer (round trip, determinism,
the record, row blocks, atomicity, output policy, dtype and config, verify-before-rename)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import open_checkpoint
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
    with pytest.raises(OutputExistsError, match="already exists; pass `force=True`"):
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


def test_dtype_updates_every_floating_tensor_and_the_config(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")  # bf16, config dtype bfloat16
    out = tmp_path / "f32"
    write_checkpoint([copy_tensor(src, n) for n in src.names], out, donor=src, operation="x", parameters={},
                     inputs=[src], dtype=torch.float32, config_update={"extra_field": 3})
    got = load_file(str(out / "model.safetensors"))
    ref = load_file(str(fixtures_dir / "llama-tiny" / "base" / "model.safetensors"))
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], ref[k].float()) for k in ref)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["extra_field"] == 3
    assert cfg["hidden_size"] == src.config["hidden_size"]


def test_verify_runs_on_the_finished_folder_before_the_rename(fixtures_dir, tmp_path):
    src = open_checkpoint(fixtures_dir / "llama-tiny" / "base")
    seen = {}

    def verify(folder):
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["final_exists"] = (tmp_path / "out").exists()
        return {"ok": True}

    res = write_checkpoint([copy_tensor(src, n) for n in src.names], tmp_path / "out", donor=src, operation="x",
                           parameters={}, inputs=[src], verify=verify)
    assert res.verified == {"ok": True} and not seen["final_exists"]
    assert {"model.safetensors", "config.json", "README.md"} <= set(seen["files"])

    def reject(folder):
        raise Boom("logits differ")

    with pytest.raises(Boom):
        write_checkpoint([copy_tensor(src, n) for n in src.names], tmp_path / "rejected", donor=src, operation="x",
                         parameters={}, inputs=[src], verify=reject)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
