"""Every PEFT kind surgery fuses, against PEFT itself: ``merge_and_unload()`` tensor by
tensor, and the unmerged forward pass (the adapter's real behaviour) logit by logit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from surgery.fuse import fuse

from adapter_helpers import GPT2, LLAMA, bf16_step, fused_logits, make_adapter, peft_reference

peft = pytest.importorskip("peft")


def _noise_on(*parts):
    def tweak(name, p):
        if p.requires_grad and any(s in name for s in parts):
            p.add_(0.1 * torch.randn_like(p))
    return tweak


CASES = {
    # id: (base, config factory, tweak)
    "lora-rank-alpha-pattern-rslora": ("f32", lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3}, use_rslora=True, init_lora_weights=False), None),
    "dora": ("f32", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True,
                                            init_lora_weights=False), None),
    "gpt2-lora-fan-in-fan-out-lora-bias": (GPT2, lambda: peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True,
        init_lora_weights=False), _noise_on("lora_B.default.bias")),
    "gpt2-dora-bias-all": (GPT2, lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True, bias="all",
        init_lora_weights=False), _noise_on(".bias")),
    "loha": ("f32", lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"],
                                            rank_pattern={"up_proj": 2}, init_weights=False), None),
    "lokr": ("f32", lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"], decompose_both=True,
                                            init_weights=False), None),
    "ia3": ("f32", lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                                          init_ia3_weights=False), None),
    "gpt2-ia3-bias": (GPT2, lambda: peft.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"],
                                                   fan_in_fan_out=True, init_ia3_weights=False), None),
    "vera-saved-projection": ("f32", lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "k_proj", "up_proj"],
                                                             init_weights=False), None),
    "vera-regenerated-projection": ("f32", lambda: peft.VeraConfig(
        r=4, target_modules=["q_proj", "k_proj", "up_proj"], save_projection=False, projection_prng_key=7,
        init_weights=False), None),
    "hira": ("f32", lambda: peft.HiraConfig(r=4, target_modules=["q_proj", "gate_proj"], init_weights=False), None),
}


# Cases over ~3 s on a busy 2-core machine run in the slow tier; lora, loha, ia3 and hira stay fast.
SLOW_CASES = {"dora", "gpt2-dora-bias-all", "gpt2-ia3-bias", "gpt2-lora-fan-in-fan-out-lora-bias", "lokr",
              "vera-regenerated-projection", "vera-saved-projection"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                  for c in sorted(CASES)])
def test_matches_peft(case, tmp_path, llama_f32):
    if case == "hira" and not hasattr(peft, "HiraConfig"):
        pytest.skip("this PEFT has no HiRA (added in peft 0.17)")
    base_id, make_cfg, tweak = CASES[case]
    base = llama_f32 if base_id == "f32" else base_id
    adapter = make_adapter(base, make_cfg(), tmp_path / "adapter", seed=hash(case) % 1000, tweak=tweak)
    out = tmp_path / "fused"
    report = fuse(base, [str(adapter)], out).report
    ref_sd, ref_logits = peft_reference(base, adapter)
    ours = load_file(out / "model.safetensors")
    assert report["tensors_changed"], "the adapter changed nothing"
    base_sd = load_file(base / "model.safetensors")
    for name in report["tensors_changed"]:
        assert name in ref_sd, name
        if base_sd[name].any():    # (IA3 rescaling a zero bias leaves it zero)
            assert not torch.equal(ours[name].float(), base_sd[name].float()), f"{name} unchanged"
        torch.testing.assert_close(ours[name].float(), ref_sd[name].float(), rtol=1e-5,
                                   atol=1e-5 * ref_sd[name].abs().max().item(), msg=lambda m: f"{case} {name}: {m}")
    for name, t in ours.items():            # everything else is the base, byte for byte
        if name not in report["tensors_changed"] and name in base_sd:
            assert torch.equal(t, base_sd[name]), name
    got = fused_logits(out)
    assert (got - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()


@pytest.mark.slow
def test_bf16_base_within_one_rounding_step(tmp_path):
    """On the bf16 fixture every fused tensor is within one bf16 step of PEFT's float32 merge."""
    cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapter = make_adapter(LLAMA, cfg, tmp_path / "adapter", seed=3)
    report = fuse(LLAMA, [str(adapter)], tmp_path / "fused").report
    ref_sd, _ = peft_reference(LLAMA, adapter)
    ours = load_file(tmp_path / "fused" / "model.safetensors")
    assert len(report["tensors_changed"]) == 14
    for name in report["tensors_changed"]:
        assert ours[name].dtype == torch.bfloat16
        err = (ours[name].float() - ref_sd[name]).abs()
        assert bool((err <= bf16_step(ref_sd[name])).all()), name


def test_tied_embedding_lora_unties_and_follows_the_forward_pass(tmp_path):
    """LoRA on GPT-2's tied ``wte``: the adapter's forward pass changes the input embedding only,
    so the head must keep the base embedding. PEFT's merge_and_unload writes the update into the
    shared tensor (head included); surgery writes an explicit lm_head and unties."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], fan_in_fan_out=True,
                          init_lora_weights=False)
    adapter = make_adapter(GPT2, cfg, tmp_path / "adapter", seed=5)
    out = tmp_path / "fused"
    report = fuse(GPT2, [str(adapter)], out).report
    assert report["untied_embeddings"] == {"output": "lm_head.weight", "input": "transformer.wte.weight"}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ours, base = load_file(out / "model.safetensors"), load_file(GPT2 / "model.safetensors")
    assert torch.equal(ours["lm_head.weight"], base["transformer.wte.weight"])
    ref_sd, ref_logits = peft_reference(GPT2, adapter)
    torch.testing.assert_close(ours["transformer.wte.weight"], ref_sd["transformer.wte.weight"], rtol=1e-5, atol=1e-5)
    got = fused_logits(out)
    assert (got - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()


@pytest.mark.slow
def test_modules_to_save_head_on_tied_model(tmp_path, llama_f32):
    """``modules_to_save=["lm_head"]`` on a tied Llama: the saved head is written as lm_head,
    the embedding gets its LoRA, and the logits follow PEFT's forward pass."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"],
                          init_lora_weights=False)
    adapter = make_adapter(llama_f32, cfg, tmp_path / "adapter", seed=9, tweak=_noise_on("modules_to_save"))
    out = tmp_path / "fused"
    report = fuse(llama_f32, [str(adapter)], out).report
    assert "lm_head.weight" in report["tensors_added"]
    assert report["untied_embeddings"]["output"] == "lm_head.weight"
    _, ref_logits = peft_reference(llama_f32, adapter)
    got = fused_logits(out)
    assert (got - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()


def test_two_weighted_adapters_in_one_pass(tmp_path, llama_f32):
    """``A:0.7 B:-0.3`` adds 0.7 ΔA + (−0.3) ΔB, computed here in float64 from the factors."""
    from safetensors.torch import load_file as lf

    cfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)  # noqa: E731
    a = make_adapter(llama_f32, cfg(), tmp_path / "a", seed=1)
    b = make_adapter(llama_f32, cfg(), tmp_path / "b", seed=2)
    fuse(llama_f32, [f"{a}:0.7", f"{b}:-0.3"], tmp_path / "fused")
    ours = lf(tmp_path / "fused" / "model.safetensors")
    base = lf(llama_f32 / "model.safetensors")
    fa, fb = lf(a / "adapter_model.safetensors"), lf(b / "adapter_model.safetensors")
    for layer in (0, 1):
        mod = f"model.layers.{layer}.self_attn.q_proj"
        key = f"base_model.model.{mod}"
        d = lambda f: (f[f"{key}.lora_B.weight"].double() @ f[f"{key}.lora_A.weight"].double()) * 2.0  # noqa: E731
        expect = base[f"{mod}.weight"].double() + 0.7 * d(fa) - 0.3 * d(fb)
        torch.testing.assert_close(ours[f"{mod}.weight"].double(), expect, rtol=1e-6, atol=1e-6)
