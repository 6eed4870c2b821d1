"""Arcee Fusion (mergekit's ``arcee_fusion``; https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration):
take the model's value only where the change from the base is important, with mergekit
0.1.5's semantics. Per entry, importance = |θ1 − θ0| · KL(p ‖ q) of its row, with
p = softmax(θ1 row) + 1e-8 and q = softmax(θ0 row) + 1e-8 (rows along the last dimension; a
1-D tensor is one row). With q1, median, q3 the quartiles of the importance (values at
positions ⌊q · (N − 1)⌋ of its ascending order), entries with
importance ≥ median + 1.5 (q3 − q1) take θ1, the others keep θ0.

mergekit estimates the quartiles of a tensor with more than 1,000,000 entries from 1,000,000
entries drawn at random with torch's global RNG, so its output on such tensors is not
reproducible; here the quartiles are exact, always (``numpy.partition`` of a tensor held in
memory, radix selection over row blocks of a larger one; no sort and no sample). On smaller tensors the two agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..method import Batch, TensorContext
from .select import order_values
from .streaming import Inputs, OrderedRows


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax θ1 ‖ softmax θ0) of every row (last dimension, kept), float32 as mergekit."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(model: torch.Tensor, base: torch.Tensor, kl: torch.Tensor | None = None) -> torch.Tensor:
    """|θ1 − θ0| · KL(softmax θ1 ‖ softmax θ0) per row (last dimension), float32 as mergekit
    (``kl``: the rows' :func:`row_kl`, when already known)."""
    return (model - base).abs() * (row_kl(model, base) if kl is None else kl)


def fusion_threshold(q1: float, median: float, q3: float) -> float:
    """median + 1.5 (q3 − q1) in float32."""
    q = torch.tensor([q1, median, q3], dtype=torch.float32)
    return float(q[1] + 1.5 * (q[2] - q[0]))


def quartile_ranks(numel: int) -> list[int]:
    """⌊q · (N − 1)⌋ for q = 1/4, 1/2, 3/4, exactly."""
    return [(numel - 1) // 4, (numel - 1) // 2, 3 * (numel - 1) // 4]


class FusionRows(OrderedRows):
    """Quartiles of the importance from two radix passes, then the output row blocks.

    A tensor held in memory (:class:`.streaming.Inputs`) computes its importance once, over
    the canonical blocks, and keeps it for both passes and the output (the importance of a
    row depends on that row only, so the values are those of any blocking); a streamed one
    keeps each row's KL divergence (one float per row) from the first pass, so later passes
    only form |θ1 − θ0| · KL, the same floats without the softmaxes."""

    def __init__(self, inputs: Inputs):
        self.one_block = len(inputs.shape) == 1       # a 1-D tensor is one softmax row
        super().__init__(inputs)
        self.threshold = 0.0
        self.cached: torch.Tensor | None = None
        self.kl: torch.Tensor | None = None           # per-row KL of a streamed tensor, rows [0, kl_rows)
        self.kl_rows = 0

    def _importance(self, a: int, e: int) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[a:e]
        model, base = self.inputs.model_view(0, a, e), self.inputs.base(a, e)
        if e <= self.kl_rows:
            return importance(model, base, self.kl[a:e])
        kl = row_kl(model, base)
        if a == self.kl_rows and not self.one_block:          # the first pass walks the rows in order
            if self.kl is None:
                self.kl = torch.empty((self.shape[0], 1), dtype=kl.dtype, device=kl.device)
            self.kl[a:e] = kl
            self.kl_rows = e
        return importance(model, base, kl)

    def prepare(self) -> None:
        ranks = quartile_ranks(self.inputs.numel)
        if self.inputs.held:
            self.cached = torch.cat([self._importance(a, e) for a, e in self.blocks])
            # one introselect for the three ranks (numpy's partition: exact order statistics,
            # the values at these ranks of the ascending order, as the radix passes find them;
            # three torch.kthvalue calls took 3x as long)
            flat = self.cached.reshape(-1).cpu().numpy()
            values = [float(v) for v in np.partition(flat, ranks)[ranks]]
        else:
            values = order_values(lambda: (self._importance(a, e) for a, e in self.blocks), ranks)
        self.threshold = fusion_threshold(*values)

    def block(self, a: int, e: int) -> torch.Tensor:
        base, model = self.inputs.base(a, e), self.inputs.model_view(0, a, e)
        mask = self._importance(a, e) >= self.threshold
        return base + (model - base) * mask

    def drop(self) -> None:
        self.cached = self.kl = None
        self.kl_rows = 0


def _merge(ctx: TensorContext) -> FusionRows:
    return FusionRows(Inputs(ctx))


METHODS = (
    Batch("arcee_fusion", "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
          "take the model's entries whose change × row KL divergence is an upper outlier (above median + 1.5 IQR)",
          (), _merge, min_models=1, max_models=1),
)
