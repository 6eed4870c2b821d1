"""``surgery fuse --check``: compare the fused checkpoint's logits with PEFT's forward pass
of base + adapter (unmerged), on a short fixed token sequence. Loads both models whole,
which is the point of a check; the fusion itself stays streaming."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.model import load_model, quiet_transformers
from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..core.errors import CheckFailedError, UsageError

PEFT_KINDS = ("LORA", "LOHA", "LOKR", "IA3", "VERA", "HIRA")
# Relative logit tolerance: max|Δ| / max|reference| for each output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _out(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        res = model(input_ids=ids)
    return (res.logits if hasattr(res, "logits") and res.logits is not None else res.last_hidden_state).float()


def check_against_peft(base: Checkpoint, adapter: dict[str, Any], fused_dir: str | Path,
                       out_dtype: torch.dtype, tokens: int = 32) -> dict[str, Any]:
    """Forward pass of PEFT's base + adapter vs the fused checkpoint, both models built from
    their own tensors (:mod:`surgery.checkpoint.model`).

    Raises:
        UsageError: PEFT is not installed, or the adapter is not a PEFT kind with weight 1.
        CheckFailedError: The logits differ by more than the dtype's tolerance.
    """
    if adapter["kind"] not in PEFT_KINDS or adapter["weight"] != 1.0:
        raise UsageError(f"`check` compares with PEFT, which runs one PEFT adapter ({', '.join(PEFT_KINDS)}) at "
                         f"weight 1; {adapter['path']} is {adapter['kind']} at weight {adapter['weight']}.")
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError("`check` needs PEFT (pip install peft).") from None
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        return _compare(base, adapter, fused_dir, out_dtype, tokens, PeftModel)


def _compare(base: Checkpoint, adapter, fused_dir, out_dtype, tokens, PeftModel) -> dict[str, Any]:
    model = load_model(base, head="auto")
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    ids = (torch.arange(tokens) * 7919 % max(vocab - 1, 1) + 1).unsqueeze(0)
    ref = _out(PeftModel.from_pretrained(model, adapter["path"]).eval(), ids)
    del model
    got = _out(load_model(open_checkpoint(str(fused_dir)), head="auto"), ids)
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
