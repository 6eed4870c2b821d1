"""Helpers for the adapter tests: PEFT adapters with random non-zero weights built in tmp
folders, and PEFT's own merge / forward pass as the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LLAMA = FIXTURES / "llama-tiny" / "base"
GPT2 = FIXTURES / "gpt2-tiny" / "base"
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 257, 300, 411, 2, 7, 100, 200, 3, 4]])


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load(path: Path):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base: Path, config, out: Path, seed: int = 0, tweak=None) -> Path:
    """Save a PEFT adapter on ``base`` whose weights are random and non-zero."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_magnitude" in name or "ia3_l" in name or "vera_lambda" in name):
                p.add_(0.2 * torch.randn_like(p))      # move scale vectors off their identity init
            if tweak is not None:
                tweak(name, p)
    model.save_pretrained(out)
    return out


def peft_reference(base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """PEFT's forward logits of base + adapter (unmerged) and its merge_and_unload state dict."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base), str(adapter)).eval()
    with torch.no_grad():
        logits = model(IDS).logits
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, logits


def fused_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(path)(IDS).logits


def bf16_step(ref: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding step (ulp) at each value of ``ref``."""
    exp = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)))
    return torch.pow(2.0, exp - 7)


def make_llama_f32(out: Path) -> Path:
    """A float32 copy of the llama-tiny base (exact upcast) for tight comparisons."""
    from surgery.convert import convert

    convert(LLAMA, out, dtype="float32")
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
