"""analyze interference: sign conflicts, cosines, overlaps and ranks against closed forms and
direct float64 computations on small checkpoints written for the test."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from surgery.analyze.interferences import analyze_interference, sign_conflict
from surgery.checkpoint import open_checkpoint
from surgery.core.errors import UsageError


def test_sign_conflict_counts_only_entries_two_models_touch():
    a = torch.tensor([1.0, 1.0, -1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([1.0, -1.0, 0.0, 0.0, -1.0, 3.0])
    c = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    # entries with >= 2 non-zero: 0 (+,+), 1 (+,-), 2 (-,+), 4 (+,-,+) -> 3 of 4 disagree
    assert sign_conflict([a, b, c]) == (3, 4)


def _write(folder, tensors):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return open_checkpoint(folder)


@pytest.fixture
def trio(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(12, 8, generator=g),
            "model.layers.1.mlp.up_proj.weight": torch.randn(10, 8, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(8)}
    shared = torch.randn(12, 1, generator=g) @ torch.randn(1, 8, generator=g)       # a rank-1 common update
    taus = []
    for i in range(3):
        t = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        t["model.layers.0.self_attn.q_proj.weight"] += shared
        taus.append(t)
    b = _write(tmp_path / "base", base)
    models = [_write(tmp_path / f"m{i}", {k: base[k] + t[k] for k in base}) for i, t in enumerate(taus)]
    return b, models, base, taus


def test_interference_report_against_direct_computation(trio):
    base_ck, models, base, taus = trio
    rep = analyze_interference(base_ck, models, energy=0.9)
    rows = {r["name"]: r for r in rep["tensors"]}
    q = "model.layers.0.self_attn.q_proj.weight"
    tq = [(m.get(q) - base_ck.get(q)).double() for m in models]      # what the files hold
    cos = [float((tq[i] * tq[j]).sum() / (tq[i].norm() * tq[j].norm())) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert rows[q]["cosine"] == pytest.approx(sum(cos) / 3, rel=1e-6)
    assert rows[q]["cosine"] > 0.9          # the shared rank-1 update dominates
    assert rows["model.layers.1.mlp.up_proj.weight"]["cosine"] < 0.5
    # the shared direction: every task vector's top subspace is nearly the same -> overlap far above chance
    assert rows[q]["overlap_left"] > 0.9 and rows[q]["overlap_left"] > 3 * rows[q]["overlap_chance"]
    s = torch.linalg.svdvals(tq[0])
    p = s / s.sum()
    eff0 = math.exp(float(-(p * p.log()).sum())) / 8
    assert 0 < rows[q]["effective_rank"] < 1 and rows[q]["ranks"][0] >= 1
    assert abs(rows[q]["effective_rank"] - eff0) < 0.2      # a mean over the three models
    # whole-model pair cosines from summed dot products
    whole = [torch.cat([(m.get(n) - base_ck.get(n)).double().reshape(-1) for n in base_ck.names]) for m in models]
    assert rep["pairs"][0]["cosine"] == pytest.approx(float(whole[0] @ whole[1] / (whole[0].norm() * whole[1].norm())),
                                                      rel=1e-6)
    norm = "model.layers.0.input_layernorm.weight"
    assert rows[norm]["overlap_left"] is None and rows[norm]["sign_conflict"] is not None
    assert [l["layer"] for l in rep["layers"]] == [0, 1]
    bad = sum(sign_conflict([(m.get(n) - base_ck.get(n)) for m in models])[0] for n in base_ck.names)
    both = sum(sign_conflict([(m.get(n) - base_ck.get(n)) for m in models])[1] for n in base_ck.names)
    assert rep["totals"]["sign_conflict"] == pytest.approx(bad / both)


def test_interference_needs_two_models(trio):
    base_ck, models, _, _ = trio
    with pytest.raises(UsageError, match="at least two"):
        analyze_interference(base_ck, models[:1])


def test_interference_cli(cli, trio):
    base_ck, models, _, _ = trio
    res = cli("analyze", "interference", "--base", base_ck.root, *[m.root for m in models], "--json")
    assert res.code == 0, res.stderr
    doc = res.json()
    assert len(doc["pairs"]) == 3 and doc["passed"] is True
    human = cli("analyze", "interference", "--base", base_ck.root, *[m.root for m in models])
    assert "per layer" in human.stdout and "sign conflict" in human.stdout
