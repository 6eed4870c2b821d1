"""surgery.diff: per-tensor differences, against numbers computed here in numpy float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.diff import diff, diff_checkpoints, tensor_diff


def test_tensor_diff_closed_form():
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    b = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    d = tensor_diff(a, b)
    assert d["norm_a"] == 5.0 and d["norm_b"] == pytest.approx(math.sqrt(26)) and d["norm_diff"] == 1.0
    assert d["rel_change"] == pytest.approx(0.2) and d["max_abs_diff"] == 1.0
    assert d["cosine"] == pytest.approx(25 / (5 * math.sqrt(26)))
    zero = tensor_diff(torch.zeros(3), torch.ones(3))
    assert zero["rel_change"] == math.inf and zero["cosine"] == 0.0
    assert tensor_diff(torch.zeros(3), torch.zeros(3))["rel_change"] == 0.0


def test_diff_checkpoints_against_numpy(fixtures_dir):
    base, ft = fixtures_dir / "llama-tiny" / "base", fixtures_dir / "llama-tiny" / "ft-a"
    rep = diff_checkpoints(open_checkpoint(base), open_checkpoint(ft))
    a = {k: v.double().numpy() for k, v in load_file(str(base / "model.safetensors")).items()}
    b = {k: v.double().numpy() for k, v in load_file(str(ft / "model.safetensors")).items()}
    assert [r["name"] for r in rep["tensors"]] == sorted(a)
    for row in rep["tensors"]:
        x, y = a[row["name"]].ravel(), b[row["name"]].ravel()
        assert row["rel_change"] == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-12)
        assert row["cosine"] == pytest.approx(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), rel=1e-12)
        assert row["max_abs_diff"] == np.abs(y - x).max() and row["changed"] == bool((x != y).any())
    s = rep["summary"]
    assert s["compared"] == len(a) and s["changed"] == sum(bool((a[k] != b[k]).any()) for k in a)
    assert not s["identical"] and diff(base, base).report["summary"]["identical"]


def test_one_sided_mismatched_and_changed_only(fixtures_dir, tmp_path):
    sd = load_file(str(fixtures_dir / "llama-tiny" / "base" / "model.safetensors"))
    names = sorted(sd)
    other = dict(sd)
    del other[names[0]]
    other["extra.weight"] = torch.zeros(2)
    other[names[1]] = torch.zeros(3, dtype=sd[names[1]].dtype)        # another shape: listed, not compared
    other[names[2]] = sd[names[2]].float()                            # another dtype, same values: compared
    save_file(other, str(tmp_path / "o.safetensors"))
    rep = diff(fixtures_dir / "llama-tiny" / "base", tmp_path / "o.safetensors", changed_only=True).report
    assert rep["only_in_a"] == [names[0]] and rep["only_in_b"] == ["extra.weight"]
    assert [m["name"] for m in rep["mismatched"]] == [names[1], names[2]]
    assert rep["tensors"] == [] and rep["summary"]["compared"] == len(names) - 2


# ---- streaming: row blocks give the whole-tensor numbers

def _stream_pair(tmp_path, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(37, 29, generator=g), "v": torch.randn(11, generator=g), "s": torch.tensor(2.5),
         "e": torch.randn(3, 5, 7, generator=g), "z": torch.zeros(0, 4)}
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    for name, sd in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({k: v.to(dtype) for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    return open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")


@pytest.mark.parametrize("block", [1, 29, 100, 10**9])
def test_stream_diff_equals_whole_tensor(tmp_path, block):
    from surgery.diff import stream_diff

    a, b = _stream_pair(tmp_path)
    for name in a.names:
        ta, tb = a.get(name, dtype=torch.float64), b.get(name, dtype=torch.float64)
        got = stream_diff(a, b, name, max_elements=block)
        d = (tb - ta).reshape(-1)
        assert got["norm_diff"] == pytest.approx(float(d.norm()), rel=1e-12, abs=1e-300)
        assert got["norm_a"] == pytest.approx(float(ta.norm()), rel=1e-12, abs=1e-300)
        assert got["max_abs_diff"] == (float(d.abs().max()) if d.numel() else 0.0)
        if ta.numel():
            cos = float(ta.reshape(-1) @ tb.reshape(-1) / (ta.norm() * tb.norm()))
            assert got["cosine"] == pytest.approx(cos, rel=1e-12)


