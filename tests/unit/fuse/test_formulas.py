"""HUT, TeRA and curriculum LoRA against their formulas written out here, independently of
surgery's code, on a tiny float32 checkpoint (float64 references)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.fuse import fuse
from surgery.core.errors import InputError

OUT, IN = 6, 8


@pytest.fixture
def tiny_base(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "base"
    d.mkdir()
    tensors = {f"model.layers.{i}.proj.weight": torch.randn(OUT, IN) for i in range(2)}
    tensors["model.layers.0.proj.bias"] = torch.randn(OUT)
    tensors["model.norm.weight"] = torch.ones(IN)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"architectures": ["Tiny"], "tie_word_embeddings": False}))
    return d, tensors


def write_adapter(path, config, tensors):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    return path


def fused(out):
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("form", ["multiplicative", "residual"])
def test_hut(tmp_path, tiny_base, form):
    base_dir, base = tiny_base
    torch.manual_seed(1)
    ten, cfg = {}, {"peft_type": "HUT", "hut_form": form, "scaling": 0.5}
    for i in range(2):
        ten[f"base_model.model.model.layers.{i}.proj.hut_A"] = torch.randn(3, IN)
        ten[f"base_model.model.model.layers.{i}.proj.hut_B"] = torch.randn(OUT, 3)
    ad = write_adapter(tmp_path / "hut", cfg, ten)
    fuse(base_dir, [str(ad)], tmp_path / "out")
    got = fused(tmp_path / "out")
    for i in range(2):
        w = base[f"model.layers.{i}.proj.weight"].double()
        m = ten[f"base_model.model.model.layers.{i}.proj.hut_B"].double() @ \
            ten[f"base_model.model.model.layers.{i}.proj.hut_A"].double()
        expect = w * (0.5 * m) if form == "multiplicative" else w + 0.5 * w * m
        torch.testing.assert_close(got[f"model.layers.{i}.proj.weight"].double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])


def test_hut_unknown_form_refused(tmp_path, tiny_base):
    ad = write_adapter(tmp_path / "hut", {"peft_type": "HUT", "hut_form": "exp"},
                       {"base_model.model.model.layers.0.proj.hut_A": torch.ones(1, IN),
                        "base_model.model.model.layers.0.proj.hut_B": torch.ones(OUT, 1)})
    with pytest.raises(InputError, match="hut_form='exp'; choose one of multiplicative, residual"):
        fuse(tiny_base[0], [str(ad)], tmp_path / "out")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    del cfg["hut_form"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"does not state its HUT form; add \"hut_form\": \"multiplicative\""):
        fuse(tiny_base[0], [str(ad)], tmp_path / "out")


def _tera_reference(core, factors, lams, out_in, s):
    """ΔW[o, i] = s · Σ_r G[r1..rN] Π_k U_k[n_k, r_k] λ_k[r_k], reshaped row-major to [out, in]."""
    t = core.double()
    letters = "abcd"
    upper = "ABCD"
    n = len(factors)
    expr = letters[:n] + "," + ",".join(f"{upper[k]}{letters[k]}" for k in range(n)) + "->" + upper[:n]
    scaled = [factors[k].double() * lams[k].double()[None, :] for k in range(n)]
    return s * torch.einsum(expr, t, *scaled).reshape(out_in)


def test_tera_stored_factors(tmp_path, tiny_base):
    base_dir, base = tiny_base
    torch.manual_seed(2)
    shape, ranks = [2, 3, 2, 4], [2, 2, 2, 3]
    core, factors = torch.randn(ranks), [torch.randn(n, r) for n, r in zip(shape, ranks)]
    ten = {"tera.g.core": core} | {f"tera.g.factor_{k}": f for k, f in enumerate(factors)}
    lams = {}
    for i in range(2):
        lams[i] = [torch.randn(r) for r in ranks]
        for k, lam in enumerate(lams[i]):
            ten[f"base_model.model.model.layers.{i}.proj.tera_lambda_{k}"] = lam
    cfg = {"peft_type": "TERA", "scaling": 0.3,
           "groups": {"g": {"out_in": [OUT, IN], "tensor_shape": shape, "ranks": ranks}}}
    ad = write_adapter(tmp_path / "tera", cfg, ten)
    fuse(base_dir, [str(ad)], tmp_path / "out")
    got = fused(tmp_path / "out")
    for i in range(2):
        expect = base[f"model.layers.{i}.proj.weight"].double() + _tera_reference(core, factors, lams[i], (OUT, IN), 0.3)
        torch.testing.assert_close(got[f"model.layers.{i}.proj.weight"].double(), expect, rtol=1e-5, atol=1e-5)


def _recipe(seed, shape, ranks, std):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks, generator=g) * std
    factors = [torch.randn((n, r), generator=g) * std for n, r in zip(shape, ranks)]
    h = hashlib.sha256(core.numpy().tobytes())
    for f in factors:
        h.update(f.numpy().tobytes())
    return core, factors, h.hexdigest()


def test_tera_generator_recipe_checked_by_hash(tmp_path, tiny_base):
    base_dir, base = tiny_base
    shape, ranks = [6, 8], [3, 4]
    core, factors, digest = _recipe(11, shape, ranks, 0.5)
    lam = [torch.linspace(-1, 1, r) for r in ranks]
    ten = {f"base_model.model.model.layers.0.proj.tera_lambda_{k}": v for k, v in enumerate(lam)}
    group = {"out_in": [OUT, IN], "tensor_shape": shape, "ranks": ranks,
             "generator": {"seed": 11, "distribution": "normal", "std": 0.5, "sha256": digest}}
    ad = write_adapter(tmp_path / "tera", {"peft_type": "TERA", "groups": {"g": group}}, ten)
    fuse(base_dir, [str(ad)], tmp_path / "out")
    expect = base["model.layers.0.proj.weight"].double() + _tera_reference(core, factors, lam, (OUT, IN), 1.0)
    torch.testing.assert_close(fused(tmp_path / "out")["model.layers.0.proj.weight"].double(), expect,
                               rtol=1e-5, atol=1e-5)
    group["generator"]["sha256"] = "0" * 64
    bad = write_adapter(tmp_path / "tera-bad", {"peft_type": "TERA", "groups": {"g": group}}, ten)
    with pytest.raises(InputError, match="generator recipe gives factors with sha256 .* not the recorded 0000"):
        fuse(base_dir, [str(bad)], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_curriculum_lora(tmp_path, tiny_base):
    """W = α₀ W₀ + Σ_{j<stage} α_j (lora_alpha/r) B_j A_j, α = init + 0.2 tanh(logit); bias untouched."""
    base_dir, base = tiny_base
    torch.manual_seed(3)
    r, lora_alpha, stage = 2, 6, 2
    mod = "model.layers.0.proj"
    ten = {f"{mod}.base_weight_scale.logit": torch.tensor(0.7), f"{mod}.weight": torch.zeros(OUT, IN)}
    for j in range(3):
        ten[f"{mod}.adapters.{j}.lora_A"] = torch.randn(r, IN)
        ten[f"{mod}.adapters.{j}.lora_B"] = torch.randn(OUT, r)
        ten[f"{mod}.adapter_scales.{j}.logit"] = torch.tensor(-0.4 + 0.5 * j)
    cfg = {"peft_type": "CURRICULUM_LORA", "r": r, "lora_alpha": lora_alpha, "curriculum_stage": stage,
           "adapter_scale_init": 0.9}
    ad = write_adapter(tmp_path / "cl", cfg, ten)
    fuse(base_dir, [str(ad)], tmp_path / "out")
    got = fused(tmp_path / "out")
    a0 = 1.0 + 0.2 * math.tanh(0.7)
    expect = a0 * base[f"{mod}.weight"].double()
    for j in range(stage):                      # adapter 2 is beyond the stage: not used
        aj = 0.9 + 0.2 * math.tanh(-0.4 + 0.5 * j)
        expect += aj * (lora_alpha / r) * (ten[f"{mod}.adapters.{j}.lora_B"].double() @ ten[f"{mod}.adapters.{j}.lora_A"].double())
    torch.testing.assert_close(got[f"{mod}.weight"].double(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[f"{mod}.bias"], base[f"{mod}.bias"])
    assert torch.equal(got["model.layers.1.proj.weight"], base["model.layers.1.proj.weight"])
