"""SCE — Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat
Models", https://arxiv.org/abs/2408.07990), with mergekit 0.1.5's semantics:

1. Select: with ``select_topk`` < 1, the k = int(count_nonzero(v) · select_topk) entries of
   largest variance v across the models' task vectors are kept in every task vector, the
   others zeroed (equal variances at the threshold: lowest flat index first; mergekit's
   ``torch.topk`` leaves that order unspecified);
2. Calculate: model i's weight is mean(τ_i²) over the tensor, divided by the sum over models
   (1/n each when that sum is below 1e-6);
3. Erase: TIES' sign election on the unweighted sum of the task vectors; the output is
   θ0 + Σ_i w_i τ_i [agrees] / max(Σ_i w_i [agrees], 1e-6).

Variance threshold and weights are whole-tensor statistics: the tensor is read in passes
(:mod:`.streaming`), never held whole unless it is small. The variance is computed once per
tensor and kept as int32 bit patterns (4 bytes an entry) for the selection's passes, the
weights pass and the output, unless that takes more than :data:`VARIANCE_CACHE_BYTES`
(then every pass recomputes it from the models' rows, and memory stays flat).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..method import Batch, Param, TensorContext
from .select import Keeper, _bits, magnitude_thresholds, mask_values
from .sparsify import INT8_MASK
from .streaming import Inputs, OrderedRows, as64, sum64

VARIANCE_CACHE_BYTES = 128 << 20    # a tensor's variance bits are kept when they fit (32M entries)


def variance(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Population variance across the models, per entry, float32: what mergekit's
    ``torch.var(torch.stack(taus), dim=0, unbiased=False)`` gives, bit for bit — the same
    Welford recurrence in float64 that torch's CPU kernel runs (mean += δ / k, m2 += δ (x − mean)),
    written out elementwise: no stacked copy and no strided reduction (about 1.5× faster)."""
    xs = [t.to(torch.float64, copy=i > 0) for i, t in enumerate(taus)]     # x.sub_ below: never the caller's
    mean = xs[0]
    m2 = torch.zeros_like(mean)
    for k, x in enumerate(xs[1:], 2):
        delta = x - mean
        mean = mean + delta / k
        m2.addcmul_(delta, x.sub_(mean))
    return m2.div_(len(xs)).to(torch.float32)


def sce_weights(mean_squares: Sequence[float]) -> list[float]:
    """mean(τ_i²) / Σ_j mean(τ_j²); 1/n each when the sum is below 1e-6."""
    total = float(sum(mean_squares))
    if abs(total) < 1e-6:
        return [1.0 / len(mean_squares)] * len(mean_squares)
    return [m / total for m in mean_squares]


def sce_combine(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """θ0 + Σ w_i τ_i [sign τ_i = elected] / max(Σ w_i [sign τ_i = elected], 1e-6)."""
    total = taus[0].clone()
    for t in taus[1:]:
        total.add_(t)
    elected = (total >= 0).to(total.dtype).mul_(2).sub_(1)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for t, w in zip(taus, weights):
        ew = (torch.sign(t) == elected).to(t.dtype).mul_(w)
        merged.add_(t * ew)
        divisor.add_(ew)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)


class SceRows(OrderedRows):
    """SCE of one tensor in row blocks: the variance threshold (radix selection), the weights
    (a float64 pass), then the output."""

    def __init__(self, inputs: Inputs, select_topk: float):
        super().__init__(inputs)
        self.topk = float(select_topk)
        self.threshold = None
        self.keeper: Keeper | None = None
        self.weights: list[float] = []
        self.var_bits: torch.Tensor | None = None     # flat int32 |variance| bits, when cached

    def _taus(self, a: int, e: int) -> list[torch.Tensor]:
        return self.inputs.vectors(a, e, taus=True)

    def _bits(self, taus: list[torch.Tensor], a: int, e: int) -> torch.Tensor:
        if self.var_bits is not None:
            w = self.inputs.row_elems
            return self.var_bits[a * w:e * w]
        return _bits(variance(taus).abs_())

    def _select(self, taus: list[torch.Tensor], a: int, e: int) -> list[torch.Tensor]:
        """The task vectors with the unselected entries zeroed (advances the keeper)."""
        if self.topk >= 1:
            return taus
        if self.keeper is None:
            return [torch.zeros_like(t) for t in taus]
        keep = self.keeper(self._bits(taus, a, e)).view(taus[0].shape)
        values = mask_values(keep, taus[0].dtype)
        return [t.mul_(values) for t in taus]

    def prepare(self) -> None:
        if 0 < self.topk < 1:
            cache = self.inputs.numel * 4 <= VARIANCE_CACHE_BYTES
            flat = torch.empty(self.inputs.numel, dtype=torch.int32) if cache else None
            w = self.inputs.row_elems
            filled = False

            def chunks():
                nonlocal filled
                for a, e in self.blocks:
                    if filled:
                        yield [flat[a * w:e * w].view(torch.float32)]
                        continue
                    bits = _bits(variance(self._taus(a, e)).abs_())
                    if flat is not None:
                        flat[a * w:e * w] = bits
                    yield [bits.view(torch.float32)]
                filled = flat is not None

            def count(total: int, zeros: int) -> int:   # mergekit: int(count_nonzero(var) * select_topk), float32
                return int(torch.tensor(total - zeros) * self.topk)

            self.threshold = magnitude_thresholds(chunks, [(0, count, False)])[0]
            self.var_bits = flat if filled else None
        self.reset()
        sq = [0.0] * self.inputs.n
        for a, e in self.blocks:
            for i, t in enumerate(self._select(self._taus(a, e), a, e)):
                x = as64(t)
                sq[i] += sum64(x * x)
        self.weights = sce_weights([s / self.inputs.numel for s in sq])

    def reset(self) -> None:
        self.keeper = self.threshold.keeper() if self.threshold is not None else None

    def advance(self, a: int, e: int) -> None:
        if self.keeper is None:                 # nothing carried: every entry kept, or none
            return
        self.keeper(self._bits(self._taus(a, e) if self.var_bits is None else [], a, e))

    def block(self, a: int, e: int) -> torch.Tensor:
        base = self.inputs.base(a, e)
        taus = self._select([self.inputs.tau(i, a, e, base) for i in range(self.inputs.n)], a, e)
        return sce_combine(base, taus, self.weights)

    def drop(self) -> None:
        self.var_bits = None


def _merge(ctx: TensorContext) -> SceRows:
    return SceRows(Inputs(ctx), float(ctx.params["select_topk"]))


METHODS = (
    Batch("sce", "https://arxiv.org/abs/2408.07990",
          "keep high-variance entries, weight models by mean square, TIES-style sign erase",
          (Param("select_topk", 1.0, low=0.0, high=1.0, help="fraction of entries kept by variance across models"),
           INT8_MASK), _merge),
)
