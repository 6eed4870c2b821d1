"""TIES merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
Models", https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint mean — with
mergekit's semantics (sign elected by the sum of the weighted, trimmed task vectors; ties
go to +; the divisor is the sum of the weights of the agreeing models).

Trimming keeps the ``k = max(1, int(density · numel))`` entries of largest float32
magnitude. Entries whose magnitude equals the k-th largest (common: task vectors of bf16
checkpoints take few distinct values) are kept lowest flat index first — the order a
stable descending sort gives. The threshold is found by a two-level radix selection on
the float32 bit patterns (histograms of the high and low 16 bits), O(numel) with no sort,
and it works on a stream of chunks, so a tensor larger than memory allows is trimmed in
row blocks (:class:`TiesRows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ...core.engine import row_ranges, rows_in_blocks
from ..method import WEIGHT, Batch, Param, TensorContext, flag, unit
from .task_arithmetic import INT8_MASK, LAMBDA

CHUNK = 1 << 23   # elementwise steps run over flat chunks (32 MB in float32): no whole-tensor temporaries
SUB_ELEMENTS = 1 << 20   # row blocks of a streamed tensor hold about this many entries per model
IN_MEMORY_BYTES = 64 << 20   # a tensor whose float32 task vectors (all models) fit here is read once


_INF_BITS = 0x7F800000


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as int32 bit patterns: same order, exact comparisons."""
    return magnitude.reshape(-1).view(torch.int32)


def _histogram(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of per-chunk histograms, summed on the chunks' device and returned on the CPU."""
    total = None
    for h in parts:
        total = h if total is None else total.add_(h)
    return total.cpu()


def _first_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, count strictly above it) for the bin holding the k-th largest entry."""
    from_top = torch.cumsum(hist.flip(0), 0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    b = hist.numel() - 1 - j
    return b, int(from_top[j]) - int(hist[b])


@dataclass
class Threshold:
    """The kept set of one trimmed tensor: every magnitude whose bits exceed ``bits``, plus the
    first ``quota`` entries (in flat order) whose bits equal it."""

    bits: int
    quota: int

    def keeper(self) -> "Keeper":
        return Keeper(self.bits, self.quota)


class Keeper:
    """Applies a :class:`Threshold` to consecutive chunks of the flat tensor (in order)."""

    def __init__(self, bits: int, quota: int):
        self.bits, self.left = bits, quota

    def apply_(self, flat: torch.Tensor) -> torch.Tensor:
        """Zero the dropped entries of the next chunk of the flat task vector, in place."""
        keep = self(_bits(flat.abs().float()))
        if self.bits < _INF_BITS:          # every dropped entry is finite: a multiply is exact and fast
            return flat.mul_(keep)
        return flat.masked_fill_(keep.logical_not_(), 0)

    def __call__(self, bits: torch.Tensor) -> torch.Tensor:
        """Mask of the kept entries of the next chunk (``bits``: int32 magnitudes, flat)."""
        keep = bits > self.bits
        if self.left == 0:
            return keep
        tied = bits == self.bits
        n = int(tied.sum())
        if n > self.left:
            tied[_position(tied, self.left) + 1:] = False
            n = self.left
        self.left -= n
        return keep.logical_or_(tied)


def _position(mask: torch.Tensor, j: int, block: int = 1 << 14) -> int:
    """Flat index of the ``j``-th (1-based) True of ``mask``: counts per block, then one block scanned."""
    whole = mask.numel() // block * block
    counts = mask[:whole].view(-1, block).sum(1)
    if mask.numel() > whole:
        counts = torch.cat([counts, mask[whole:].sum().view(1)])
    counts = counts.cpu()
    before = torch.cumsum(counts, 0)
    b = int(torch.searchsorted(before, torch.tensor([j], dtype=before.dtype)))
    skip = int(before[b - 1]) if b else 0
    return b * block + int(torch.nonzero(mask[b * block:(b + 1) * block])[j - skip - 1])


def magnitude_threshold(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """The threshold keeping the ``k`` largest magnitudes.

    Args:
        chunks: Returns an iterable of the float32 magnitudes (|τ|, any chunking, flat order);
            called up to three times (the nonzero count, then one pass per 16 bits of the
            radix selection).
        k: How many entries to keep (≥ 1).
    """
    nonzero = sum(int(torch.count_nonzero(_bits(c))) for c in chunks())
    if nonzero <= k:        # common for bf16 fine-tunes: most entries never moved, the k-th largest is 0
        return Threshold(0, k - nonzero)
    hi_hist = _histogram((torch.bincount(_bits(c) >> 16, minlength=1 << 15) for c in chunks()))   # sign bit is 0
    hi, above = _first_from_top(hi_hist, k)

    def low_bits(c: torch.Tensor) -> torch.Tensor:
        b = _bits(c)
        return b[(b >> 16) == hi] & 0xFFFF

    lo_hist = _histogram((torch.bincount(low_bits(c), minlength=1 << 16) for c in chunks()))
    lo, above_lo = _first_from_top(lo_hist, k - above)
    return Threshold((hi << 16) | lo, k - above - above_lo)


def kept_count(density: float, numel: int) -> int:
    """``max(1, int(density · numel))``: how many entries trimming keeps (mergekit's count)."""
    return max(1, int(density * numel))


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest.

    ``k = max(1, int(density · numel))`` entries are kept (at least one, as in mergekit);
    equal magnitudes at the threshold are kept lowest flat index first (module docstring).
    Returns a new tensor.
    """
    return trim_(delta.clone(), density)


def trim_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`trim` in place (``delta`` is overwritten and returned)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    flat = delta.view(-1)
    mag = flat.abs().float()
    threshold = magnitude_threshold(lambda: [mag], kept_count(density, flat.numel()))
    del mag
    threshold.keeper().apply_(flat)
    return delta


def trim_argsort_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`trim_` with mergekit 0.1.5's choice among equal magnitudes: the first k entries of
    ``torch.argsort(|τ|, descending=True)`` (not stable on CPU: unspecified, but the same as
    mergekit on the same torch). A sort per tensor: slower, and the whole tensor in memory."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    flat = delta.view(-1)
    order = torch.argsort(flat.abs().float(), descending=True)
    flat[order[kept_count(density, flat.numel()):]] = 0
    return delta


TIE_RULES = ("index", "argsort")


def elect_sign(weighted: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sign (+1/−1) of Σ of the weighted trimmed task vectors per element (0 counts as +)."""
    total = weighted[0].clone()
    for w in weighted[1:]:
        total.add_(w)
    return (total >= 0).to(total.dtype).mul_(2).sub_(1)


def ties_combine_weighted(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Sign election plus disjoint (weighted) mean of already sparsified and weighted task vectors.

    Args:
        weighted: w_i · sparsified τ_i.
        weights: w_i.
        normalize: Divide by the sum of the weights of the models agreeing with the elected
            sign at each element (1 where none agrees).
    """
    shape = weighted[0].shape
    flats = [w.reshape(-1) for w in weighted]
    out = torch.empty_like(flats[0])
    for a in range(0, out.numel(), CHUNK):
        parts = [f[a:a + CHUNK] for f in flats]
        sign = elect_sign(parts)
        mixed = out[a:a + CHUNK].zero_()
        divisor = torch.zeros_like(mixed)
        for wd, w in zip(parts, weights):
            agree = (wd * sign > 0).to(mixed.dtype)     # 1 where nonzero and of the elected sign
            mixed.addcmul_(wd, agree)
            divisor.add_(agree, alpha=float(w))
        if normalize:
            divisor.add_((divisor == 0).to(divisor.dtype))
            mixed.div_(divisor)
    return out.view(shape)


def ties_streamed(base: torch.Tensor, load: Callable[[int], torch.Tensor], n: int, weights: Sequence[float],
                  densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
                  sparsify: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`ties` reading model ``i`` with ``load(i)`` (a fresh tensor it may overwrite), one at a time."""
    sparsify = sparsify or (lambda d, dens, i: trim_(d, dens))
    weighted = []
    for i in range(n):
        d = load(i).sub_(base)
        d = sparsify(d, float(densities[i]), i)
        weighted.append(d.mul_(float(weights[i])))
    mixed = ties_combine_weighted(weighted, weights, normalize)
    del weighted
    return mixed.mul_(lam).add_(base)


def ties(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], lam: float = 1.0, normalize: bool = True,
         sparsify: Callable[[torch.Tensor, float, int], torch.Tensor] | None = None) -> torch.Tensor:
    """θ0 + λ · TIES(τ_1..τ_n).

    Args:
        base: θ0.
        models: θ_i.
        weights: w_i.
        densities: Fraction of each τ_i kept.
        lam: Global scale λ.
        normalize: Disjoint mean (on by default, as in mergekit).
        sparsify: ``sparsify(delta, density, model_index)``; magnitude trimming by default
            (DARE passes its random drop here).
    """
    return ties_streamed(base, lambda i: models[i].clone(), len(models), weights, densities, lam, normalize, sparsify)


class TiesRows:
    """TIES of one tensor of shape ``shape``, produced in row blocks: ``rows(a, e)`` returns
    θ0 + λ · TIES(τ) for rows ``[a, e)`` (the engine's ``OutputTensor.rows`` interface).

    A tensor whose task vectors fit in :data:`IN_MEMORY_BYTES` and is asked for in one call is
    read once. A larger one (an embedding) never holds a whole task vector: each model's
    threshold comes from two radix passes over row blocks (re-read through ``model_rows``),
    then every requested block is trimmed, sign-elected and averaged a few rows at a time.

    Args:
        shape: The tensor's shape (at least 1-D).
        base_rows: ``base_rows(a, e)``: float32 rows of θ0.
        model_rows: ``model_rows(i, a, e)``: a fresh float32 copy of rows of θ_i.
        n, weights, densities, lam, normalize: As in :func:`ties`.
    """

    def __init__(self, shape: Sequence[int], base_rows: Callable[[int, int], torch.Tensor],
                 model_rows: Callable[[int, int, int], torch.Tensor], n: int, weights: Sequence[float],
                 densities: Sequence[float], lam: float = 1.0, normalize: bool = True):
        self.shape = tuple(shape)
        self.rows_total = self.shape[0]
        self.row_elems = 1
        for s in self.shape[1:]:
            self.row_elems *= s
        self.numel = self.rows_total * self.row_elems
        self.base_rows, self.model_rows, self.n = base_rows, model_rows, n
        self.weights, self.densities = [float(w) for w in weights], [float(d) for d in densities]
        self.lam, self.normalize = float(lam), bool(normalize)
        self.keepers: list | None = None
        self.next_row = 0

    def _blocks(self, a: int, e: int) -> list[tuple[int, int]]:
        return row_ranges(a, e, self.row_elems, SUB_ELEMENTS)

    def _tau(self, i: int, a: int, e: int, base: torch.Tensor | None = None) -> torch.Tensor:
        return self.model_rows(i, a, e).sub_(self.base_rows(a, e) if base is None else base)

    def _keepers(self, magnitudes: Callable[[int], Callable[[], Iterable[torch.Tensor]]]) -> list:
        """Per model: True (keep all), False (keep none) or a :class:`Keeper`."""
        out: list = []
        for i, dens in enumerate(self.densities):
            if dens >= 1 or dens <= 0 or self.numel == 0:
                out.append(dens >= 1)
            else:
                out.append(magnitude_threshold(magnitudes(i), kept_count(dens, self.numel)).keeper())
        return out

    def _combine(self, base: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
        for d, keep, w in zip(taus, self.keepers, self.weights):
            if keep is False:
                d.zero_()
            elif keep is not True:
                keep.apply_(d.view(-1))
            d.mul_(w)
        return ties_combine_weighted(taus, self.weights, self.normalize).mul_(self.lam).add_(base)

    def _start(self, a: int) -> None:
        """Thresholds from streamed passes, then the keepers advanced past rows [0, a)."""
        def magnitudes(i: int) -> Callable[[], Iterable[torch.Tensor]]:
            return lambda: (self._tau(i, s, t).abs_() for s, t in self._blocks(0, self.rows_total))
        self.keepers = self._keepers(magnitudes)
        for s, t in self._blocks(0, a):
            for i, keep in enumerate(self.keepers):
                if not isinstance(keep, bool):
                    keep(_bits(self._tau(i, s, t).abs_()))
        self.next_row = a

    def __call__(self, a: int, e: int) -> torch.Tensor:
        e = min(e, self.rows_total)
        whole = a == 0 and e == self.rows_total
        if self.keepers is None and whole and self.numel * 4 * (self.n + 1) <= IN_MEMORY_BYTES:
            base = self.base_rows(0, e)
            taus = [self._tau(i, 0, e, base) for i in range(self.n)]
            def magnitudes(i: int) -> Callable[[], Iterable[torch.Tensor]]:
                mag = [taus[i].abs()]      # once per model, not once per selection pass
                return lambda: mag

            self.keepers = self._keepers(magnitudes)
            try:
                return self._combine(base, taus)
            finally:
                self.keepers = None
        if self.keepers is None or a != self.next_row:
            self._start(a)
        def part(s: int, t: int) -> torch.Tensor:
            base = self.base_rows(s, t)
            return self._combine(base, [self._tau(i, s, t, base) for i in range(self.n)])

        out = rows_in_blocks(self.shape, a, e, SUB_ELEMENTS, part)   # in order: the keepers count ties
        self.next_row = e
        if e == self.rows_total:
            self.keepers = None   # nothing is held between tensors
        return out


# ---- the method ---------------------------------------------------------------------------

def density_param(default: float = 1.0) -> Param:
    """The per-model fraction of each task vector kept, in (0, 1]."""
    return unit("density", default, per_model=True, low_open=True, help="fraction of each task vector kept")


def _merge(ctx: TensorContext):
    weights, densities = ctx.weights(), ctx.weights("density")
    lam, normalize = float(ctx.params["lambda"]), bool(ctx.params["normalize"])
    if ctx.options.get("trim_ties") == "argsort":
        base = ctx.base()
        return ties_streamed(base, ctx.model, ctx.n, weights, densities, lam, normalize,
                             sparsify=lambda d, dens, i: trim_argsort_(d, dens))
    return TiesRows(ctx.shape, ctx.base_rows, ctx.model_rows, ctx.n, weights, densities, lam, normalize)


METHODS = (
    Batch("ties", "https://arxiv.org/abs/2306.01708", "trim each task vector, elect signs, disjoint mean",
          (WEIGHT, density_param(), LAMBDA, flag("normalize", True, "divide by the agreeing models' weights"),
           INT8_MASK), _merge),
)
