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
