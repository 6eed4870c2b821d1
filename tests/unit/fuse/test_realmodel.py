"""The benchmark workload's SmolLM2-135M LoRA (r=16, all projections) against PEFT's
merge_and_unload: every fused tensor within one bf16 rounding step. Skipped until
``python benchmarks/workload.py`` has built the adapter (the test never builds it)."""

from __future__ import annotations

import pytest
import torch

from adapter_helpers import bf16_step, quiet_transformers

peft = pytest.importorskip("peft")




@pytest.mark.realmodel
def test_workload_lora_matches_peft_within_one_bf16_step(tmp_path, one_thread):
    from workload import paths

    p = paths()
    base, lora = p["base"], p["lora"]
    if not (lora / "adapter_model.safetensors").is_file() or not (base / "model.safetensors").is_file():
        pytest.skip("the benchmark workload's LoRA is not built (python benchmarks/workload.py)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.fuse import fuse
    from surgery.checkpoint import open_checkpoint

    report = fuse(base, [str(lora)], tmp_path / "fused").report
    assert len(report["tensors_changed"]) == 30 * 7
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    # PEFT merges bf16 weights on CPU through float32 and rounds back to bf16.
    merged = PeftModel.from_pretrained(model, str(lora)).merge_and_unload().state_dict()
    ours, orig = open_checkpoint(str(tmp_path / "fused")), open_checkpoint(str(base))
    moved = 0
    for name in report["tensors_changed"]:
        got, ref = ours.get(name), merged[name].float()
        assert bool(((got - ref).abs() <= bf16_step(ref)).all()), name
        moved += int(not torch.equal(ours.get_raw(name), orig.get_raw(name)))
    assert moved == len(report["tensors_changed"])          # the adapter's B matrices are non-zero
    for name in ours.names:
        if name not in report["tensors_changed"]:
            assert ours.tensor_sha256(name) == orig.tensor_sha256(name)
