"""edit extract: truncated SVD per changed tensor against a float64 Eckart–Young reference,
and extract → apply reproduces the edited checkpoint within the truncation error."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import open_checkpoint
from surgery.edit.apply import apply_edits
from surgery.edit.extract import choose_rank, extract_edit
from surgery.edit.format import load_edit
from surgery.core.errors import IncompatibleCheckpointsError, UsageError


def test_choose_rank_closed_form():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert choose_rank(s, rank=2) == 2 and choose_rank(s, rank=10) == 4
    assert choose_rank(s, energy=9 / 14.25) == 1
    assert choose_rank(s, energy=9.01 / 14.25) == 2
    assert choose_rank(s, energy=13 / 14.25) == 2
    assert choose_rank(s, energy=1.0) == 4
    assert choose_rank(torch.zeros(3), energy=0.5) == 0


@pytest.mark.slow
def test_extract_matches_eckart_young(fixtures_dir, tmp_path):
    base, edited = fixtures_dir / "gpt2-tiny" / "base", fixtures_dir / "gpt2-tiny" / "ft-a"
    rep = extract_edit(base, edited, tmp_path / "e.safetensors", rank=3, description="ft-a as an edit",
                       exact=True).report
    e = load_edit(tmp_path / "e.safetensors")
    a, b = load_file(str(base / "model.safetensors")), load_file(str(edited / "model.safetensors"))
    rows = {r["name"]: r for r in rep["tensors"]}
    assert rep["changed"] == len(a) and e.description == "ft-a as an edit"
    for name in ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"]:
        d = b[name].double() - a[name].double()
        sv = torch.linalg.svdvals(d)
        residual = math.sqrt(float((sv[3:] ** 2).sum()))
        te = e.tensors[name]
        assert te.rank == 3 and te.shape == tuple(d.shape)
        assert torch.linalg.matrix_norm(te.delta(torch.float64) - d).item() == pytest.approx(residual, rel=1e-4)
        assert rows[name]["energy"] == pytest.approx(float((sv[:3] ** 2).sum() / (sv ** 2).sum()), rel=1e-5)
        assert rows[name]["rel_change"] == pytest.approx((d.norm() / a[name].double().norm()).item(), rel=1e-5)
    # 1-D tensors are stored dense and exact
    ln = e.tensors["transformer.ln_f.weight"]
    assert not ln.low_rank and torch.equal(ln.dense, b["transformer.ln_f.weight"] - a["transformer.ln_f.weight"])
    assert e.base_sha256["transformer.wte.weight"] == open_checkpoint(base).tensor_sha256("transformer.wte.weight")


@pytest.mark.slow
def test_extract_then_apply_reproduces_edited(fixtures_dir, tmp_path, probe6):
    base, edited = fixtures_dir / "llama-tiny" / "base", fixtures_dir / "llama-tiny" / "ft-b"
    extract_edit(base, edited, tmp_path / "e.safetensors", energy=0.9)
    res = apply_edits(base, [tmp_path / "e.safetensors"], tmp_path / "out", text=probe6, on_collapse="ignore")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = load_file(str(base / "model.safetensors")), load_file(str(edited / "model.safetensors"))
    e = load_edit(tmp_path / "e.safetensors")
    for name in a:
        d = b[name].double() - a[name].double()
        if d.dim() == 2:
            sv = torch.linalg.svdvals(d)
            r = e.tensors[name].rank or sv.numel()
            residual = math.sqrt(float((sv[r:] ** 2).sum()))
        else:
            residual = 0.0
        # output is bf16(base + ΔW_r): truncation error plus at most one bf16 rounding per entry
        rounding = 2 ** -8 * torch.linalg.vector_norm(b[name].double()).item()
        err = torch.linalg.vector_norm(out[name].double() - b[name].double()).item()
        assert err <= residual + rounding, name
        assert out[name].dtype == torch.bfloat16
    assert res.report["edits"][0]["verdict"] in ("ok", "collapsed (ignored)")


@pytest.mark.slow
def test_extract_full_energy_is_exact_for_float32(fixtures_dir, tmp_path, probe6):
    base, edited = fixtures_dir / "gpt2-tiny" / "base", fixtures_dir / "gpt2-tiny" / "ft-b"
    extract_edit(base, edited, tmp_path / "e.safetensors", energy=1.0)
    apply_edits(base, [tmp_path / "e.safetensors"], tmp_path / "out", text=probe6, on_collapse="ignore")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = load_file(str(edited / "model.safetensors"))
    for name in b:
        assert torch.allclose(out[name], b[name], rtol=0, atol=1e-5), name


def test_extract_errors(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama-tiny" / "base"
    with pytest.raises(UsageError, match="give `rank` or `energy`, not both"):
        extract_edit(base, base, tmp_path / "e.safetensors", rank=2, energy=0.5)
    with pytest.raises(UsageError, match="`energy` must be in \\(0, 1\\]"):
        extract_edit(base, base, tmp_path / "e.safetensors", energy=1.5)
    with pytest.raises(UsageError, match="`rank` must be at least 1"):
        extract_edit(base, base, tmp_path / "e.safetensors", rank=0)
    with pytest.raises(UsageError, match="is identical to .*there is no edit to extract"):
        extract_edit(base, base, tmp_path / "e.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match="have different tensors .*extract needs the same architecture"):
        extract_edit(base, fixtures_dir / "gpt2-tiny" / "base", tmp_path / "e.safetensors")
    with pytest.raises(IncompatibleCheckpointsError, match="tensor .model.embed_tokens.weight. is \\(512, 64\\) in .* but \\(512, 128\\)"):
        extract_edit(base, fixtures_dir / "llama-wide" / "base", tmp_path / "e.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_randomized_error_is_exact_and_near_optimal(tmp_path, rank):
    """The randomized SVD's reported error is the true error of what is stored (checked
    against the stored factors in float64), never below the Eckart–Young optimum from the
    exact SVD, and close to it; --exact gives the optimum itself."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    base = {"a.weight": torch.randn(300, 120, generator=g), "b.weight": torch.randn(64, 500, generator=g)}
    # a fine-tune-like delta: a decaying spectrum plus noise
    delta = {}
    for k, w in base.items():
        m, n = w.shape
        u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
        sv = 0.05 * torch.exp(-torch.arange(min(m, n), dtype=torch.float32) / 6) + 1e-4
        delta[k] = (u * sv) @ v.T
    for name, sd in (("base", base), ("ft", {k: base[k] + delta[k] for k in base})):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    reps = {}
    for exact in (False, True):
        out = tmp_path / f"e{int(exact)}.safetensors"
        reps[exact] = {r["name"]: r for r in extract_edit(tmp_path / "base", tmp_path / "ft", out, rank=rank,
                                                          exact=exact).report["tensors"]}
        e = load_edit(out)
        for k in base:
            d = (load_file(str(tmp_path / "ft" / "model.safetensors"))[k].double()
                 - load_file(str(tmp_path / "base" / "model.safetensors"))[k].double())
            sv = torch.linalg.svdvals(d)
            optimal = math.sqrt(float((sv[rank:] ** 2).sum() / (sv ** 2).sum()))
            actual = float(torch.linalg.matrix_norm(e.tensors[k].delta(torch.float64) - d) / d.norm())
            row = reps[exact][k]
            assert row["method"] == ("exact" if exact else "randomized")
            assert row["rel_error"] == pytest.approx(actual, rel=1e-4, abs=1e-7)
            assert row["rel_error"] >= optimal * (1 - 1e-5)
            assert row["rel_error"] <= optimal * (1 + 1e-5 if exact else 1.02)


@pytest.mark.slow
def test_randomized_extract_is_deterministic(fixtures_dir, tmp_path):
    base, edited = fixtures_dir / "llama-tiny" / "base", fixtures_dir / "llama-tiny" / "ft-a"
    a = extract_edit(base, edited, tmp_path / "a.safetensors", rank=2)
    b = extract_edit(base, edited, tmp_path / "b.safetensors", rank=2)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert a.report["max_rel_error"] == max(r["rel_error"] for r in a.report["tensors"])
