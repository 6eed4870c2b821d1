"""spectrum / subspace / gain on fixture checkpoints and on tiny synthetic ones with known spectra."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.checkpoint import open_checkpoint
from surgery.core.errors import IncompatibleCheckpointsError, UsageError
from surgery.analyze.gains import analyze_gain, matrix_gain, pair_tensors, proxy_depth, with_depth
from surgery.analyze.spectra import analyze_spectrum
from surgery.analyze.subspaces import (
    analyze_subspace,
    block_importance,
    frozen_rank,
    importance_fraction,
)


def write_ckpt(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def fixture_state(fixtures_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / name / "model.safetensors"))


# ---------------------------------------------------------------- spectrum

def test_spectrum_of_task_vector_matches_float64_reference(fixtures_dir):
    rep = analyze_spectrum(open_checkpoint(fixtures_dir / "llama-tiny/ft-a"),
                           base=open_checkpoint(fixtures_dir / "llama-tiny/base"), energy=0.9, top=3)
    ft, base = fixture_state(fixtures_dir, "llama-tiny/ft-a"), fixture_state(fixtures_dir, "llama-tiny/base")
    matrices = [n for n, t in base.items() if t.ndim == 2]
    assert [r["name"] for r in rep["tensors"]] == sorted(matrices)
    for r in rep["tensors"]:
        d = ft[r["name"]].double() - base[r["name"]].double()
        s = torch.linalg.svdvals(d)
        assert r["sigma_max"] == pytest.approx(float(s[0]), rel=1e-5)
        assert r["frobenius"] == pytest.approx(float(d.norm()), rel=1e-5)
        assert r["stable_rank"] == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-4)
        p = s / s.sum()
        assert r["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-4)
        frac = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert r["energy_rank"] == int((frac < 0.9).sum()) + 1
        assert r["top_singular_values"] == pytest.approx(s[:3].tolist(), rel=1e-5)
    assert rep["of"] == "task_vector"
    assert rep["by_type"]["q"]["count"] == 2 and set(rep["by_depth"]) == {"0", "1"}


def test_spectrum_closed_form_checkpoint(tmp_path):
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    s = torch.tensor([4.0, 2.0, 1.0] + [0.0] * 13, dtype=torch.float64)
    w = (u[:, :16] @ torch.diag(s) @ v.T).float()
    ckpt = write_ckpt(tmp_path / "m", {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": torch.ones(16)})
    rep = analyze_spectrum(open_checkpoint(ckpt), energy=0.95, top=2)
    (r,) = rep["tensors"]
    assert (r["sublayer"], r["depth"]) == ("up", 0)
    assert r["sigma_max"] == pytest.approx(4.0, rel=1e-5)
    assert r["stable_rank"] == pytest.approx(21 / 16, rel=1e-4)
    assert r["energy_rank"] == 2  # 16/21 = 0.76, 20/21 = 0.952
    p = [4 / 7, 2 / 7, 1 / 7]
    assert r["effective_rank"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-4)


def test_spectrum_reports_nonfinite_without_numbers(tmp_path, fixtures_dir):
    state = fixture_state(fixtures_dir, "llama-tiny/base")
    state["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    rep = analyze_spectrum(open_checkpoint(write_ckpt(tmp_path / "bad", state)))
    bad = {r["name"]: r for r in rep["tensors"] if not r["finite"]}
    assert set(bad) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert rep["non_finite"] == sorted(bad)
    for r in bad.values():
        assert r["sigma_max"] is None and r["stable_rank"] is None and r["top_singular_values"] is None
    assert bad["model.layers.1.self_attn.q_proj.weight"]["nonfinite"] == {"nan": 1, "posinf": 0, "neginf": 0}
    assert bad["model.layers.0.mlp.up_proj.weight"]["nonfinite"]["posinf"] == 1
    # the summary of q counts both tensors but averages only the finite one
    assert rep["by_type"]["q"]["count"] == 2
    ok_q = next(r for r in rep["tensors"] if r["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert rep["by_type"]["q"]["sigma_max"]["mean"] == pytest.approx(ok_q["sigma_max"])


def test_spectrum_gpt2_and_bert_types(fixtures_dir):
    gpt2 = analyze_spectrum(open_checkpoint(fixtures_dir / "gpt2-tiny/base"), top=1)
    assert set(gpt2["by_type"]) == {"embed", "pos_embed", "qkv", "o", "up", "down"}
    bert = analyze_spectrum(open_checkpoint(fixtures_dir / "bert-tiny/base"), top=1)
    assert {"q", "k", "v", "o", "up", "down", "embed"} <= set(bert["by_type"])


def test_spectrum_errors(fixtures_dir):
    ckpt = open_checkpoint(fixtures_dir / "llama-tiny/base")
    with pytest.raises(UsageError, match="`energy` must be in") as e:
        analyze_spectrum(ckpt, energy=1.5)
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="`top` must be 0 or more"):
        analyze_spectrum(ckpt, top=-1)
    with pytest.raises(IncompatibleCheckpointsError, match="share no 2-D tensor of the same shape") as e:
        analyze_spectrum(open_checkpoint(fixtures_dir / "llama-wide/base"), base=ckpt)
    assert e.value.exit_code == 3


# ---------------------------------------------------------------- subspace

def test_subspace_identical_task_vectors_overlap_fully(fixtures_dir):
    base, a = open_checkpoint(fixtures_dir / "llama-tiny/base"), open_checkpoint(fixtures_dir / "llama-tiny/ft-a")
    rep = analyze_subspace(base, a, a, rank=4)
    for r in rep["tensors"]:
        assert r["overlap_left"] == pytest.approx(1.0, abs=1e-5)
        assert r["overlap_right"] == pytest.approx(1.0, abs=1e-5)
        assert max(r["left"]["angles_deg"]) < 0.5
        assert r["leakage_a"] == r["leakage_b"]


def test_subspace_fixture_pair_against_reference(fixtures_dir):
    # ft-a and ft-b share a rank-2 component (fixtures/make_fixtures.py): their top subspaces overlap
    # partly. Check every number against a float64 computation written here.
    base, a, b = (open_checkpoint(fixtures_dir / f"llama-tiny/{x}") for x in ("base", "ft-a", "ft-b"))
    rep = analyze_subspace(base, a, b, energy=0.9, frozen_fraction=0.25)
    sb, sa, sbb = (fixture_state(fixtures_dir, f"llama-tiny/{x}") for x in ("base", "ft-a", "ft-b"))
    for r in rep["tensors"]:
        w0 = sb[r["name"]].double()
        ta, tb = sa[r["name"]].double() - w0, sbb[r["name"]].double() - w0
        ua, s_a, vah = torch.linalg.svd(ta, full_matrices=False)
        ub, s_b, vbh = torch.linalg.svd(tb, full_matrices=False)
        ka = int((torch.cumsum(s_a ** 2, 0) / (s_a ** 2).sum() < 0.9).sum()) + 1
        kb = int((torch.cumsum(s_b ** 2, 0) / (s_b ** 2).sum() < 0.9).sum()) + 1
        assert (r["k_a"], r["k_b"]) == (ka, kb)
        cos_l = torch.linalg.svdvals(ua[:, :ka].T @ ub[:, :kb])
        assert r["overlap_left"] == pytest.approx(float((cos_l ** 2).sum()) / min(ka, kb), abs=2e-3)
        cos_r = torch.linalg.svdvals(vah[:ka] @ vbh[:kb].T)
        assert r["overlap_right"] == pytest.approx(float((cos_r ** 2).sum()) / min(ka, kb), abs=2e-3)
        rr = round(0.25 * min(w0.shape))
        assert r["frozen_rank"] == rr
        u0, _, v0h = torch.linalg.svd(w0, full_matrices=False)
        pu = torch.eye(w0.shape[0], dtype=torch.float64) - u0[:, :rr] @ u0[:, :rr].T
        pv = torch.eye(w0.shape[1], dtype=torch.float64) - v0h[:rr].T @ v0h[:rr]
        leak_a = 1 - float((pu @ ta @ pv).norm() ** 2 / ta.norm() ** 2)
        assert r["leakage_a"]["total"] == pytest.approx(leak_a, abs=2e-3)
    mean_overlap = sum(r["overlap_left"] for r in rep["tensors"]) / len(rep["tensors"])
    chance = sum(r["left"]["chance"] for r in rep["tensors"]) / len(rep["tensors"])
    assert mean_overlap > 3 * chance  # the shared component shows


def test_subspace_importance_rule(fixtures_dir):
    base, a, b = (open_checkpoint(fixtures_dir / f"llama-tiny/{x}") for x in ("base", "ft-a", "ft-b"))
    rep = analyze_subspace(base, a, b, rank=2, importance={0: 1.0, 1: 0.0})
    by = {r["name"]: r for r in rep["tensors"]}
    assert by["model.layers.0.self_attn.q_proj.weight"]["frozen_rank"] == round(0.8 * 64)
    assert by["model.layers.1.self_attn.q_proj.weight"]["frozen_rank"] == round(0.1 * 64)
    assert by["model.layers.1.self_attn.q_proj.weight"]["frozen_rule"] == "importance"
    assert by["model.embed_tokens.weight"]["frozen_rule"] == "fixed_fraction"  # no block index
    assert rep["suggested_frozen_ranks"]["model.layers.0.mlp.down_proj.weight"] == round(0.8 * 64)


def test_importance_and_frozen_rank_formulas():
    assert importance_fraction(0.0) == pytest.approx(0.1)
    assert importance_fraction(1.0) == pytest.approx(0.8)
    assert importance_fraction(0.5, mrr=0.2, trr=0.6) == pytest.approx(0.4)
    assert frozen_rank(64, 128, 0.45) == 29
    assert frozen_rank(10, 10, 1.0) == 10
    # block 0 keeps its input (cos 1), block 1 rotates 60° (cos 0.5), block 2 flips it 90° (cos 0)
    x = torch.zeros(1, 3, 4, dtype=torch.float64)
    x[..., 0] = 1.0
    h1 = x.clone()
    h2 = torch.zeros_like(x)
    h2[..., 0], h2[..., 1] = 0.5, math.sqrt(3) / 2
    h3 = torch.zeros_like(x)
    h3[..., 2] = 1.0
    imp = block_importance([x, h1, h2, h3])
    assert imp == pytest.approx({0: 1.0, 1: 0.5, 2: 0.0})
    assert block_importance([x, x, x]) == {0: 0.5, 1: 0.5}


def test_subspace_errors(fixtures_dir):
    base, a = open_checkpoint(fixtures_dir / "llama-tiny/base"), open_checkpoint(fixtures_dir / "llama-tiny/ft-a")
    with pytest.raises(UsageError, match="either `rank` or `energy`"):
        analyze_subspace(base, a, a, rank=2, energy=0.9)
    with pytest.raises(UsageError, match="`rank` must be at least 1"):
        analyze_subspace(base, a, a, rank=0)
    with pytest.raises(UsageError, match="`frozen_fraction` must be in"):
        analyze_subspace(base, a, a, frozen_fraction=1.5)
    with pytest.raises(UsageError, match="`mrr` ≤ `trr`"):
        analyze_subspace(base, a, a, mrr=0.9, trr=0.2)
    with pytest.raises(IncompatibleCheckpointsError, match="share no 2-D tensor") as e:
        analyze_subspace(base, open_checkpoint(fixtures_dir / "llama-wide/base"), a)
    assert e.value.exit_code == 3


# ---------------------------------------------------------------- gain

def test_matrix_gain_closed_form():
    n, c = 32, 0.3
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    g = matrix_gain((c * q).float())
    assert g["sigma_max"] == pytest.approx(c, rel=1e-5)
    assert g["rms"] == pytest.approx(c / math.sqrt(n), rel=1e-5)
    assert g["gain"] == pytest.approx(math.sqrt(n), rel=1e-4)
    bad = torch.ones(4, 4)
    bad[0, 0] = float("-inf")
    assert matrix_gain(bad)["finite"] is False and matrix_gain(bad)["sigma_max"] is None


def test_depth_mapping():
    assert proxy_depth(0, 30, 10) == 0 and proxy_depth(29, 30, 10) == 9 and proxy_depth(15, 30, 10) == 5
    assert proxy_depth(3, 4, 1) == 0
    assert with_depth("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert with_depth("transformer.h.7.attn.c_attn.weight", 0) == "transformer.h.0.attn.c_attn.weight"
    assert with_depth("model.embed_tokens.weight", 5) == "model.embed_tokens.weight"


def test_gain_pairs_across_widths_on_fixtures(fixtures_dir):
    wide, tiny = open_checkpoint(fixtures_dir / "llama-wide/base"), open_checkpoint(fixtures_dir / "llama-tiny/base")
    rep = analyze_gain(wide, vs=tiny, tolerance=0.1)
    assert rep["widths"] == {"target": 128, "proxy": 64}
    assert len(rep["pairs"]) == 15 and not rep["unpaired"] and not rep["proxy_unused"]
    sw, st = fixture_state(fixtures_dir, "llama-wide/base"), fixture_state(fixtures_dir, "llama-tiny/base")
    for p in rep["pairs"]:
        assert p["proxy_name"] == p["name"]
        ref = float(torch.linalg.svdvals(sw[p["name"]].double())[0]) / float(torch.linalg.svdvals(st[p["name"]].double())[0])
        assert p["ratio"] == pytest.approx(ref, rel=2e-4)
        assert p["exponent"] == pytest.approx(math.log(ref) / math.log(2.0), abs=1e-3)
    # Random-init matrices whose both sides double: σ_max ≈ std·(√m + √n) grows by √2 (exponent 0.5).
    qs = rep["pairs_by_type"]["q"]
    assert qs["exponent"]["mean"] == pytest.approx(0.5, abs=0.1)
    assert not rep["within_tolerance"] and "model.layers.0.self_attn.q_proj.weight" in rep["drifted"]
    ok = analyze_gain(wide, vs=tiny, tolerance=0.2, expect_exponent=0.5, ignore_types=["embed"])
    assert ok["within_tolerance"], ok["drifted"]
    emb = next(p for p in ok["pairs"] if p["sublayer"] == "embed")
    assert emb["judged"] is False and emb["within_tolerance"] is False


def _scaled_model(folder: Path, blocks: int, width: int, scale_of_block, nan_block: int | None = None) -> Path:
    tensors = {}
    for layer in range(blocks):
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(layer)))
        w = scale_of_block(layer, blocks) * q
        if layer == nan_block:
            w[0, 0] = float("nan")
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"] = w
    return write_ckpt(folder, tensors, {"hidden_size": width, "model_type": "llama"})


def test_gain_relative_depth_and_exact_ratios(tmp_path):
    # σ_max = (1 + relative depth) · s0 in both models; target twice as wide with s0 = 2 vs 1.
    target = _scaled_model(tmp_path / "t", 5, 32, lambda l, L: 2.0 * (1 + l / (L - 1)))
    proxy = _scaled_model(tmp_path / "p", 3, 16, lambda l, L: 1.0 * (1 + l / (L - 1)))
    t, p = open_checkpoint(target), open_checkpoint(proxy)
    pairs, unpaired, unused = pair_tensors(t, p)
    assert [(a.split(".")[2], b.split(".")[2]) for a, b in pairs] == [("0", "0"), ("1", "0"), ("2", "1"), ("3", "2"), ("4", "2")]
    assert not unpaired and not unused
    rep = analyze_gain(t, vs=p, tolerance=0.01, expect_exponent=1.0)
    exact = {r["name"]: r["ratio"] for r in rep["pairs"]}
    # blocks 0, 2, 4 sit at the same relative depth as proxy blocks 0, 1, 2: ratio exactly 2, exponent 1
    for layer in (0, 2, 4):
        assert exact[f"model.layers.{layer}.self_attn.o_proj.weight"] == pytest.approx(2.0, rel=1e-4)
    assert rep["pairs"][0]["exponent"] == pytest.approx(1.0, abs=1e-4)
    assert set(rep["drifted"]) == {"model.layers.1.self_attn.o_proj.weight", "model.layers.3.self_attn.o_proj.weight"}
    with_exact = analyze_gain(t, vs=p, exact=True)
    assert [r["sigma_max"] for r in with_exact["tensors"]] == pytest.approx([r["sigma_max"] for r in rep["tensors"]], rel=1e-4)


def test_gain_nonfinite_pair_fails(tmp_path):
    target = _scaled_model(tmp_path / "t", 2, 16, lambda l, L: 1.0, nan_block=1)
    proxy = _scaled_model(tmp_path / "p", 2, 16, lambda l, L: 1.0)
    rep = analyze_gain(open_checkpoint(target), vs=open_checkpoint(proxy))
    bad = next(x for x in rep["pairs"] if x["name"].startswith("model.layers.1."))
    assert bad["ratio"] is None and bad["within_tolerance"] is False and bad["reason"] == "non-finite target"
    assert rep["non_finite"] == ["model.layers.1.self_attn.o_proj.weight"]
    assert not rep["within_tolerance"]


def test_gain_errors(fixtures_dir):
    llama, bert = open_checkpoint(fixtures_dir / "llama-tiny/base"), open_checkpoint(fixtures_dir / "bert-tiny/base")
    with pytest.raises(UsageError, match="`tolerance` must be a positive number"):
        analyze_gain(llama, tolerance=0)
    with pytest.raises(IncompatibleCheckpointsError, match="pairs with one of") as e:
        analyze_gain(llama, vs=bert)
    assert e.value.exit_code == 3
