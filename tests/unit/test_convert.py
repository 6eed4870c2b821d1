"""surgery.convert: pickles loaded weights-only, casts and re-sharding, against torch / safetensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import open_checkpoint
from surgery.convert import convert
from surgery.core.errors import UnsafeFormatError


def test_pickle_to_safetensors_same_tensors(fixtures_dir, tmp_path):
    src = tmp_path / "old"
    src.mkdir()
    sd = load_file(str(fixtures_dir / "gpt2-tiny" / "base" / "model.safetensors"))
    torch.save(sd, src / "pytorch_model.bin")
    shutil.copy(fixtures_dir / "gpt2-tiny" / "base" / "config.json", src / "config.json")
    res = convert(src / "pytorch_model.bin", tmp_path / "new")
    got = load_file(str(tmp_path / "new" / "model.safetensors"))
    assert got.keys() == sd.keys() and all(got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]) for k in sd)
    assert (tmp_path / "new" / "config.json").is_file() and res.written.num_tensors == len(sd)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeFormatError, match="could not be loaded weights-only"):
        convert(tmp_path / "evil.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cast_and_reshard(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama-tiny" / "base"
    convert(base, tmp_path / "f32", dtype="float32", shard_size="100KB")
    out = open_checkpoint(tmp_path / "f32")
    ref = load_file(str(base / "model.safetensors"))
    assert len(out.files) > 1 and (tmp_path / "f32" / "model.safetensors.index.json").is_file()
    for k, v in ref.items():
        got = out.get_raw(k)
        assert got.dtype == torch.float32 and torch.equal(got, v.float())  # bf16 -> f32 is exact
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    convert(tmp_path / "f32", tmp_path / "back", dtype="bfloat16")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(back[k], ref[k]) for k in ref)  # and back again, bit for bit
