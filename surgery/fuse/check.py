"""``surgery fuse --check``: compare the fused checkpoint's logits with PEFT's forward pass
of base + adapter (unmerged), on a short fixed token sequence. Loads both models whole,
which is the point of a check; the fusion itself stays streaming."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckFailedError, UsageError

PEFT_KINDS = ("LORA", "LOHA", "LOKR", "IA3", "VERA", "HIRA")
# Relative logit tolerance: max|Δ| / max|reference| for each output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _load(path: str | Path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
                                      for a in (cfg.architectures or [])) else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _out(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        res = model(input_ids=ids)
    return (res.logits if hasattr(res, "logits") and res.logits is not None else res.last_hidden_state).float()


def check_against_peft(base_dir: str | Path, adapter: dict[str, Any], fused_dir: str | Path,
                       out_dtype: torch.dtype, tokens: int = 32) -> dict[str, Any]:
    """Forward pass of PEFT's base + adapter vs the fused checkpoint.

    Raises:
        UsageError: PEFT is not installed, or the adapter is not a PEFT kind with weight 1.
        CheckFailedError: The logits differ by more than the dtype's tolerance.
    """
    if adapter["kind"] not in PEFT_KINDS or adapter["weight"] != 1.0:
        raise UsageError(f"--check compares with PEFT, which runs one PEFT adapter ({', '.join(PEFT_KINDS)}) at "
                         f"weight 1; {adapter['path']} is {adapter['kind']} at weight {adapter['weight']}.")
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError("--check needs PEFT (pip install peft).") from None
    if not Path(base_dir).is_dir():
        raise UsageError(f"--check needs a local base folder; {base_dir} is not one.")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _compare(base_dir, adapter, fused_dir, out_dtype, tokens, PeftModel)


def _compare(base_dir, adapter, fused_dir, out_dtype, tokens, PeftModel) -> dict[str, Any]:
    base = _load(base_dir)
    vocab = int(getattr(base.config, "vocab_size", 0) or 256)
    ids = (torch.arange(tokens) * 7919 % max(vocab - 1, 1) + 1).unsqueeze(0)
    ref = _out(PeftModel.from_pretrained(base, adapter["path"]).eval(), ids)
    del base
    got = _out(_load(fused_dir), ids)
    diff = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    tol = TOLERANCE.get(out_dtype, 3e-2)
    report = {"tokens": tokens, "max_abs_diff": diff, "max_abs_reference": scale, "relative_diff": diff / scale,
              "tolerance": tol, "passed": diff / scale <= tol}
    if not report["passed"]:
        raise CheckFailedError(f"the fused checkpoint's logits differ from PEFT's base + adapter forward pass by "
                               f"{diff:.4g} ({diff / scale:.3g} of the largest logit, tolerance {tol:g}); nothing "
                               f"was written.", report=report)
    return report
