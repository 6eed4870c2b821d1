"""Edits <-> PEFT LoRA, checked against peft itself (merge_and_unload) on Linear, Conv1D
(GPT-2, stored [in, out]) and Embedding layers, with rank_pattern / alpha_pattern / rsLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import open_checkpoint
from surgery.edit.format import Edit, TensorEdit, load_edit, save_edit
from surgery.edit.lora import from_peft, to_peft
from surgery.core.errors import IncompatibleCheckpointsError, InputError, UsageError

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.anchor


def _peft_adapter(base_dir, out_dir, targets, **cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False, **cfg))
    pm.save_pretrained(out_dir)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _peft_merge(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize("which,targets,cfg", [
    ("llama-tiny", ["q_proj", "down_proj", "embed_tokens"], {"r": 4, "lora_alpha": 8, "rank_pattern": {"down_proj": 2},
                                                             "alpha_pattern": {"q_proj": 3}}),
    ("gpt2-tiny", ["c_attn", "c_proj", "wte"], {"r": 3, "lora_alpha": 5, "use_rslora": True}),
])
def test_from_peft_equals_peft_merge(fixtures_dir, tmp_path, which, targets, cfg):
    base = fixtures_dir / which / "base"
    merged = _peft_adapter(base, tmp_path / "ad", targets, **cfg)
    rep = from_peft(tmp_path / "ad", tmp_path / "e.safetensors", base=base).report
    e = load_edit(tmp_path / "e.safetensors")
    ckpt = open_checkpoint(base)
    assert rep["base_verified"] and set(e.base_sha256) == set(e.tensors)
    assert len(e.tensors) >= 5
    for name, te in e.tensors.items():
        ref = merged[name].double() - ckpt.get(name, dtype=torch.float64)
        assert te.shape == tuple(ckpt.info(name).shape)  # stored layout, Conv1D included
        assert torch.allclose(te.delta(torch.float64), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item()), name
    layers = {r["name"]: r["layer"] for r in rep["tensors"]}
    if which == "gpt2-tiny":
        assert layers["transformer.h.0.attn.c_attn.weight"] == "conv1d" and layers["transformer.wte.weight"] == "embedding"


@pytest.mark.parametrize("which,names", [
    ("llama-tiny", ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"]),
    ("gpt2-tiny", ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"]),
])
def test_to_peft_loads_in_peft(fixtures_dir, tmp_path, which, names):
    base = fixtures_dir / which / "base"
    ckpt = open_checkpoint(base)
    g = torch.Generator().manual_seed(1)
    tensors, want = {}, {}
    for i, n in enumerate(names):
        rows, cols = ckpt.info(n).shape
        if i == 1:  # a dense delta: exact at full rank
            d = 0.01 * torch.randn(rows, cols, generator=g)
            tensors[n] = TensorEdit(n, dense=d)
        else:
            u, v, s = torch.randn(rows, 2, generator=g), torch.randn(cols, 2, generator=g), torch.tensor([0.02, -0.01])
            tensors[n] = TensorEdit(n, u=u, v=v, s=s)
        want[n] = tensors[n].delta(torch.float64)
    save_edit(Edit(tensors), tmp_path / "e.safetensors")
    rep = to_peft(tmp_path / "e.safetensors", tmp_path / "ad", base=base).report
    merged = _peft_merge(base, tmp_path / "ad")
    for n in names:
        got = merged[n].double() - ckpt.get(n, dtype=torch.float64)
        assert torch.allclose(got, want[n], atol=1e-6), n
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (which == "gpt2-tiny") and rep["r"] == cfg["r"]
    # ...and back: the same deltas
    from_peft(tmp_path / "ad", tmp_path / "back.safetensors", base=base)
    back = load_edit(tmp_path / "back.safetensors")
    for n in names:
        assert torch.allclose(back.tensors[n].delta(torch.float64), want[n], atol=1e-6), n


def test_to_peft_truncates_dense_with_rank(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama-tiny" / "base"
    n = "model.layers.0.mlp.up_proj.weight"
    d = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    save_edit(Edit({n: TensorEdit(n, dense=d)}), tmp_path / "e.safetensors")
    rep = to_peft(tmp_path / "e.safetensors", tmp_path / "ad", base=base, rank=5).report
    sv = torch.linalg.svdvals(d.double())
    assert rep["tensors"][0]["rank"] == 5
    assert rep["tensors"][0]["rel_error"] == pytest.approx(float((sv[5:] ** 2).sum().sqrt() / sv.norm()), rel=1e-4)


def test_lora_errors(fixtures_dir, tmp_path):
    base = fixtures_dir / "llama-tiny" / "base"
    with pytest.raises(InputError, match="has no adapter_config.json"):
        from_peft(tmp_path, tmp_path / "e.safetensors")
    ad = tmp_path / "dora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 2}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 64)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="is a DoRA adapter"):
        from_peft(ad, tmp_path / "e.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(InputError, match="module 'model.layers.0.self_attn.q_proj' has \\['A'\\] but not both LoRA factors"):
        from_peft(ad, tmp_path / "e.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(InputError, match="is a IA3 adapter, not LoRA"):
        from_peft(ad, tmp_path / "e.safetensors")
    # an adapter for another base
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(2, 64),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.ones(192, 2)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleCheckpointsError, match="adapts 'transformer.h.0.attn.c_attn.weight', which .* does not have"):
        from_peft(ad, tmp_path / "e.safetensors", base=base)
    n = "model.norm.weight"
    save_edit(Edit({n: TensorEdit(n, dense=torch.ones(64))}), tmp_path / "v.safetensors")
    with pytest.raises(UsageError, match="1-D delta for 'model.norm.weight', which LoRA cannot express; pass `drop_vectors=True`"):
        to_peft(tmp_path / "v.safetensors", tmp_path / "ad2", base=base)
    with pytest.raises(UsageError, match="has no matrix delta to convert"):
        to_peft(tmp_path / "v.safetensors", tmp_path / "ad2", base=base, drop_vectors=True)
