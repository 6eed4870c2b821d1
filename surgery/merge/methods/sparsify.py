"""The generalized task-arithmetic family (mergekit 0.1.5's ``generalized_task_arithmetic.py``
and ``sparsify.py``): one computation, different arguments, for ``ties``, ``dare_linear``,
``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della`` and ``della_linear``.

Per tensor, for every model i:

1. τ_i = θ_i − θ0, sparsified by a :class:`Sparsify` rule (none, ``magnitude``, ``random``,
   ``outliers``, ``della``);
2. with ``rescale``, multiplied by ‖τ_i‖₁ / ‖kept τ_i‖₁ (mergekit's L1 rescale; skipped
   when either norm is below 1e-7, or nothing was dropped);
3. multiplied by w_i; then either summed (divided by Σ w_i with ``normalize``, by 1 when
   |Σ w_i| < 1e-8) or sign-elected as in TIES (sign of Σ w_i τ_i per entry, 0 counts as +;
   disjoint sum divided, with ``normalize``, by the weights of the agreeing models);
4. θ0 + λ · that.

Which entries survive:

- ``magnitude`` (TIES): the k = max(1, int(density · numel)) largest |τ|; of the entries
  equal to the k-th largest, the lowest flat indices (a stable descending sort; mergekit's
  ``torch.argsort`` is not stable, so its choice among them is unspecified).
- ``outliers`` (Model Breadcrumbs): with n = numel, keep = int(density · n),
  top = int(gamma · n) and bottom = max(0, n − keep − top), the entries at positions
  [bottom, bottom + keep) of the ascending order of |τ|; equal magnitudes are ordered by flat
  index (a stable ascending sort; mergekit's ``torch.sort`` is not stable either).
- ``random`` (DARE): each entry kept with probability ``density``.
- ``della`` (DELLA): per row (a 1-D tensor is one row) entries are ranked by |τ| (equal
  magnitudes by index), rank r of m (0-based) is kept with probability
  density − ε + 2ε · r/(m − 1) (density when m = 1, where mergekit fails).

Random draws are made by flat position (:func:`uniforms`): entry e of tensor T, model i, is
kept when u_e, the e-th output of a SplitMix64 stream keyed by (seed, T, i), cut to 24 bits,
is below its probability; a counter-based draw any entry of which is computed directly in
unsigned 64-bit integer arithmetic (numpy on the CPU, int64 tensor ops elsewhere), so a merge is reproducible bit for bit from ``--seed`` on any device, in any
tensor order and whatever the row blocks. mergekit draws from torch's global RNG, so its
random methods agree with these in distribution (kept fraction, rescaling, sign election),
not entry by entry.

Everything streams (:class:`GtaRows`): thresholds come from radix-selection passes
(:mod:`.select`) and the L1 sums from a float64 pass over the canonical blocks, then the
output is produced in row blocks; a small tensor is read once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..method import Param, TensorContext, flag, unit
from . import fused
from .select import Threshold, _bits, magnitude_thresholds, mask_values, sorted_bits, sorted_thresholds
from .streaming import Inputs, OrderedRows, as64, sum64
from .task_arithmetic import INT8_MASK, LAMBDA  # noqa: F401  (the family's shared declarations)

COMBINE_CHUNK = 1 << 18  # TIES' combine: flat chunks whose temporaries stay in cache (1 MB in float32)
UNIFORM_BITS = 24        # resolution of a draw: u = r / 2^24, r an integer
RESCALE_EPS = 1e-7       # mergekit's: no rescale when either L1 norm is below this
KINDS = ("none", "magnitude", "random", "outliers", "della")


# ---- seeded draws by flat position ------------------------------------------------------------

def drop_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The 63-bit key of one model's draws on one tensor, from the user seed, the tensor name
    and the model index."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _xor_shift_(z: torch.Tensor, s: int) -> torch.Tensor:
    """z ^= z >>> s (logical shift of the 64-bit pattern; torch's >> is arithmetic)."""
    return z.bitwise_xor_((z >> s).bitwise_and_((1 << (64 - s)) - 1))


_U64 = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_CPU_CHUNK = 1 << 16        # entries per piece of a CPU draw (its uint64 temporaries stay in cache)


def _on_cpu(device: str | torch.device) -> bool:
    return torch.device(device).type == "cpu"


def _mixed(seed: int, tensor_name: str, model_index: int, start: int, stop: int) -> np.ndarray:
    """SplitMix64's outputs z_e for the flat entries ``[start, stop)`` before its last
    xor-shift, as uint64 on the CPU (numpy's unsigned integers: logical shifts and wrapping
    products without the masking int64 tensors need; several times faster than the tensor ops)."""
    golden, mix1, mix2 = _U64
    key = np.uint64(drop_seed(seed, tensor_name, model_index))
    z = np.arange(start + 1, stop + 1, dtype=np.uint64)
    tmp = np.empty(min(len(z), _CPU_CHUNK), dtype=np.uint64)
    for a in range(0, len(z), _CPU_CHUNK):
        c = z[a:a + _CPU_CHUNK]
        t = tmp[:len(c)]
        c *= golden
        c += key
        np.right_shift(c, np.uint64(30), out=t)
        c ^= t
        c *= mix1
        np.right_shift(c, np.uint64(27), out=t)
        c ^= t
        c *= mix2
    return z


def _mixed_torch(seed: int, tensor_name: str, model_index: int, start: int, stop: int,
                 device: str | torch.device) -> torch.Tensor:
    """:func:`_mixed` in int64 tensor ops on ``device`` (the same bit patterns)."""
    z = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device)
    z.mul_(_GOLDEN).add_(_signed(drop_seed(seed, tensor_name, model_index)))
    z = _xor_shift_(z, 30).mul_(_MIX1)
    return _xor_shift_(z, 27).mul_(_MIX2)


def draw_bits(seed: int, tensor_name: str, model_index: int, start: int, stop: int,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """The integers r_e in [0, 2^24) of the flat entries ``[start, stop)`` (int64): the top 24
    bits of SplitMix64's e-th output for the key k = :func:`drop_seed` — z = k + (e + 1) ·
    0x9E3779B97F4A7C15, z = (z ^ z >>> 30) · 0xBF58476D1CE4E5B9, z = (z ^ z >>> 27) ·
    0x94D049BB133111EB, z ^= z >>> 31, all mod 2^64; r_e = z >>> 40. Integer ops only, so the
    same on every device and for any split of the range. SplitMix64's last step, z ^= z >>> 31,
    leaves the top 33 bits as they are, so it is skipped."""
    if _on_cpu(device):
        z = _mixed(seed, tensor_name, model_index, start, stop)
        z >>= np.uint64(64 - UNIFORM_BITS)
        return torch.from_numpy(z.view(np.int64))
    z = _mixed_torch(seed, tensor_name, model_index, start, stop, device)
    return (z >> (64 - UNIFORM_BITS)).bitwise_and_((1 << UNIFORM_BITS) - 1)


def uniforms(seed: int, tensor_name: str, model_index: int, numel: int, start: int, stop: int,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """The uniform draws u_e = r_e / 2^24 of the flat entries ``[start, stop)`` of a tensor with
    ``numel`` entries (float64, exact; :func:`draw_bits`)."""
    del numel                      # the draw of an entry depends on its position only
    return draw_bits(seed, tensor_name, model_index, start, stop, device).to(torch.float64).mul_(2.0 ** -UNIFORM_BITS)


def keep_mask(seed: int, tensor_name: str, model_index: int, numel: int, start: int, stop: int,
              density: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """Which of the flat entries ``[start, stop)`` DARE keeps: u_e < ``density`` (bool), compared
    exactly as r_e < ⌈density · 2^24⌉ (on the CPU as z < ⌈density · 2^24⌉ · 2^40 on the unsigned
    64-bit z of :func:`draw_bits`, the same test without the shift)."""
    del numel
    limit = math.ceil(density * (1 << UNIFORM_BITS))
    if limit >= 1 << UNIFORM_BITS:
        return torch.ones(stop - start, dtype=torch.bool, device=device)
    if _on_cpu(device):
        return torch.from_numpy(_mixed(seed, tensor_name, model_index, start, stop)
                                < np.uint64(limit << (64 - UNIFORM_BITS)))
    return draw_bits(seed, tensor_name, model_index, start, stop, device) < limit


# ---- how each model's task vector is sparsified --------------------------------------------

@dataclass(frozen=True)
class Sparsify:
    """One model's sparsification rule (module docstring).

    Attributes:
        kind: ``none``, ``magnitude``, ``random``, ``outliers`` or ``della``.
        density: Fraction kept (1 or more: nothing is dropped, whatever the kind).
        gamma: ``outliers``: fraction of the largest magnitudes removed.
        epsilon: ``della``: half-width of the keep probabilities around ``density``.
    """

    kind: str = "none"
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.density < 1

    def targets(self, numel: int) -> list[tuple[int, bool]]:
        """The (k, last) selections the rule needs from the magnitudes."""
        if not self.active:
            return []
        if self.kind == "magnitude":
            return [(kept_count(self.density, numel), False)]
        if self.kind == "outliers":
            keep, top = int(self.density * numel), int(self.gamma * numel)
            bottom = max(0, numel - keep - top)
            return [(numel - bottom, True), (numel - bottom - keep, True)]
        return []


def kept_count(density: float, numel: int) -> int:
    """``max(1, int(density · numel))``: how many entries magnitude trimming keeps (mergekit's count)."""
    return max(1, int(density * numel))


def della_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of every entry of ``magnitudes`` (rows along dim 1; a 1-D
    tensor is one row), float64: density − ε + 2ε · rank / (m − 1), ranks 0-based in a stable
    ascending sort of the row."""
    x = magnitudes if magnitudes.dim() >= 2 else magnitudes.unsqueeze(0)
    m = x.shape[1]
    if m < 2:
        return torch.full(magnitudes.shape, float(density), dtype=torch.float64, device=magnitudes.device)
    order = torch.sort(x, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    shape = [1] * x.dim()
    shape[1] = m
    ranks.scatter_(1, order, torch.arange(m, device=x.device).view(shape).expand_as(order))
    probs = ranks.to(torch.float64).mul_(2 * epsilon / (m - 1)).add_(density - epsilon)
    return probs.reshape(magnitudes.shape)


def della_limits(m: int, density: float, epsilon: float) -> torch.Tensor:
    """⌈p_r · 2^24⌉ for every rank r of a row of m (int64), p_r the probability of
    :func:`della_probabilities` (computed the same way, in float64): u_e = r_e / 2^24 < p_r
    exactly when the integer draw r_e is below it."""
    p = torch.arange(m, dtype=torch.float64).mul_(2 * epsilon / (m - 1)).add_(density - epsilon)
    return p.mul_(float(1 << UNIFORM_BITS)).ceil_().to(torch.int64)


def row_order(magnitudes: torch.Tensor) -> torch.Tensor:
    """The indices of a stable ascending sort of every row of the 2-D ``magnitudes`` (int64).

    Non-negative float32 values order as their bit patterns, so on the CPU each entry becomes
    the unique integer key bits · 2^s + column (2^s ≥ the row length) and the keys are sorted
    with numpy's vectorized integer sort, which needs no stability: equal magnitudes are
    ordered by column, as a stable sort orders them (several times faster than torch's stable
    sort of the floats)."""
    m = magnitudes.shape[1]
    if magnitudes.dtype != torch.float32 or not _on_cpu(magnitudes.device) or m > 1 << 32:
        return torch.sort(magnitudes, dim=1, stable=True).indices
    shift = max(1, (m - 1).bit_length())
    keys = magnitudes.contiguous().numpy().view(np.int32).astype(np.int64)
    keys <<= shift
    keys |= np.arange(m, dtype=np.int64)
    keys.sort(axis=1)
    keys &= (1 << shift) - 1
    return torch.from_numpy(keys)


def della_keep(magnitudes: torch.Tensor, density: float, epsilon: float, *, seed: int, tensor_name: str,
               model_index: int, start: int) -> torch.Tensor:
    """Which entries DELLA keeps of ``magnitudes`` (|τ| of the flat entries from ``start``;
    rows along dim 1, a 1-D tensor is one row): u_e < :func:`della_probabilities`, decided on
    the integer draws in rank order — each row's draws are gathered in ascending order of
    magnitude, compared with :func:`della_limits` and scattered back (no float64 ranks or
    probabilities)."""
    x = magnitudes if magnitudes.dim() >= 2 else magnitudes.reshape(1, -1)
    rows, m = x.shape[0], x.shape[1]
    if m < 2:
        return keep_mask(seed, tensor_name, model_index, 0, start, start + x.numel(), density,
                         x.device).view(magnitudes.shape)
    draws = draw_bits(seed, tensor_name, model_index, start, start + x.numel(), x.device).view(rows, m)
    order = row_order(x).to(x.device)
    kept = draws.gather(1, order) < della_limits(m, density, epsilon).to(x.device)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).scatter_(1, order, kept).view(magnitudes.shape)


class _Masker:
    """The kept entries of one model's τ, block by block in row order."""

    def __init__(self, rule: Sparsify, thresholds: list[Threshold], *, seed: int, name: str, index: int,
                 numel: int, row_elems: int):
        self.rule, self.seed, self.name, self.index = rule, seed, name, index
        self.numel, self.row_elems = numel, row_elems
        self.keepers = [t.keeper() for t in thresholds]

    def __call__(self, tau: torch.Tensor, a: int) -> torch.Tensor | None:
        """Bool mask of the kept entries of rows ``a..`` (``tau`` holds them); None keeps all."""
        r = self.rule
        if not r.active:
            return None
        start = a * self.row_elems
        if r.kind == "random":
            keep = keep_mask(self.seed, self.name, self.index, self.numel, start, start + tau.numel(), r.density,
                             tau.device)
            return keep.view(tau.shape)
        if r.kind == "della":
            return della_keep(tau.abs(), r.density, r.epsilon, seed=self.seed, tensor_name=self.name,
                              model_index=self.index, start=start)
        bits = _bits(tau.abs().float())
        keep = self.keepers[0](bits)
        if r.kind == "outliers":
            keep.logical_and_(self.keepers[1](bits).logical_not_())
        return keep.view(tau.shape)


# ---- combining the sparsified task vectors ---------------------------------------------------

def _indicator(compare: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = 1.0 where ``x`` compares true with 0 (``compare``: ge, gt, lt or eq), else 0.0
    (numpy's comparison on the CPU: several times torch's)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):   # numpy has no bfloat16
        getattr(np, {"ge": "greater_equal", "gt": "greater", "lt": "less", "eq": "equal"}[compare])(
            x.numpy(), 0, out=out.numpy(), casting="unsafe")
        return out
    return out.copy_(getattr(torch, compare)(x, 0))


def ties_combine_weighted(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Sign election plus disjoint (weighted) mean of already sparsified and weighted task vectors.

    The elected sign is that of S = Σ_i wd_i (summed in model order; 0 counts as +). The
    models agreeing with it at an element are those whose wd_i is nonzero and of that sign,
    so the sum of the agreeing wd_i is P = Σ max(wd_i, 0) where S ≥ 0 and N = Σ min(wd_i, 0)
    where S < 0 — each summed in model order from +0, the bits of Σ wd_i · agree_i (the
    dropped terms are zeros) — and the divisor likewise. The choice is P · u + N · (1 − u)
    with u = [S ≥ 0]: products by 1 and 0 are exact, and adding the other side's ±0 changes
    nothing (for finite values). Computed over flat chunks whose temporaries stay in cache.

    Args:
        weighted: w_i · sparsified τ_i.
        weights: w_i.
        normalize: Divide by the sum of the weights of the models agreeing with the elected
            sign at each element (1 where none agrees).
    """
    shape = weighted[0].shape
    flats = [w.reshape(-1) for w in weighted]
    numel = flats[0].numel()
    out = torch.empty_like(flats[0])
    size = min(COMBINE_CHUNK, numel)

    def buffer() -> torch.Tensor:
        return torch.empty(size, dtype=out.dtype, device=out.device)

    total, pos, neg, tmp, up, down = (buffer() for _ in range(6))
    dpos, dneg = (buffer(), buffer()) if normalize else (None, None)
    for a in range(0, numel, COMBINE_CHUNK):
        e = min(numel, a + COMBINE_CHUNK)
        parts = [f[a:e] for f in flats]
        m = e - a
        s, p, q, t, u, v = total[:m], pos[:m], neg[:m], tmp[:m], up[:m], down[:m]
        s.copy_(parts[0])
        p.zero_()
        q.zero_()
        for j, x in enumerate(parts):
            if j:
                s.add_(x)
            p.add_(torch.clamp(x, min=0, out=t))
            q.add_(torch.clamp(x, max=0, out=t))
        _indicator("ge", s, u)
        torch.sub(1, u, out=v)
        o = torch.mul(p, u, out=out[a:e])
        o.addcmul_(q, v)
        if normalize:
            dp, dq = dpos[:m].zero_(), dneg[:m].zero_()
            for x, w in zip(parts, weights):
                dp.add_(_indicator("gt", x, t), alpha=float(w))
                dq.add_(_indicator("lt", x, t), alpha=float(w))
            d = dp.mul_(u).addcmul_(dq, v)
            d.add_(_indicator("eq", d, t))          # 1 where no model agrees
            o.div_(d)
    return out.view(shape)


def linear_combine(weighted: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Σ w_i τ_i of already weighted task vectors, divided by Σ w_i with ``normalize`` (by 1
    when |Σ w_i| < 1e-8, as mergekit does)."""
    mixed = weighted[0].clone()
    for w in weighted[1:]:
        mixed.add_(w)
    if normalize:
        total = float(sum(weights))
        mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    return mixed


def l1_factor(total: float, kept: float) -> float:
    """mergekit's L1 rescale factor ‖τ‖₁ / ‖kept τ‖₁ (1 when either is below 1e-7)."""
    return 1.0 if total < RESCALE_EPS or kept < RESCALE_EPS else total / kept


# ---- the streamed computation --------------------------------------------------------------

class GtaRows(OrderedRows):
    """θ0 + λ · combine(w_i · rescale(sparsify(τ_i))) of one tensor, produced in row blocks
    (the engine's ``rows(start, stop)`` interface; module docstring for the math).

    Statistics passes (thresholds, L1 sums) walk the canonical blocks of :class:`Inputs`;
    output blocks are produced in any order asked (a block out of order restarts the
    threshold keepers, whose ties are counted in flat order).

    Args:
        inputs: Row access to the base and the models.
        rules: One :class:`Sparsify` per model.
        weights: w_i.
        consensus: TIES' sign election (else a weighted sum).
        normalize, lam, rescale: mergekit's parameters.
        seed, name: Select the random draws.
    """

    def __init__(self, inputs: Inputs, rules: Sequence[Sparsify], weights: Sequence[float], *, consensus: bool,
                 normalize: bool, lam: float, rescale: bool, seed: int, name: str):
        self.rules = list(rules)
        # DELLA ranks whole rows; a 1-D tensor is one row, so it is handled in one block
        self.one_block = len(inputs.shape) == 1 and any(r.kind == "della" and r.active for r in self.rules)
        super().__init__(inputs)
        self.weights = [float(w) for w in weights]
        self.consensus, self.normalize, self.lam, self.rescale = consensus, normalize, float(lam), rescale
        self.seed, self.name = seed, name
        self.thresholds: list[list[Threshold]] = [[] for _ in self.rules]
        self.factors = [1.0] * len(self.rules)
        self.maskers: list[_Masker] = []
        self.cached: dict[int, torch.Tensor] | None = None

    def _maskers(self) -> list[_Masker]:
        inp = self.inputs
        return [_Masker(rule, self.thresholds[i], seed=self.seed, name=self.name, index=i, numel=inp.numel,
                        row_elems=inp.row_elems) for i, rule in enumerate(self.rules)]

    def prepare(self) -> None:
        inp = self.inputs
        targets = [(i, k, last) for i, rule in enumerate(self.rules) for k, last in rule.targets(inp.numel)]
        if targets:
            found = self._thresholds(targets)
            for (i, _, _), t in zip(targets, found):
                self.thresholds[i].append(t)
        active = [i for i, r in enumerate(self.rules) if r.active]
        live = active if self.rescale else []
        # the L1 pass of a held tensor keeps its masks (one byte per entry): drawn, ranked and
        # counted once; without it the output pass makes them from the τ it computes anyway
        hold = inp.held and live
        if hold:
            self.cached = {i: torch.empty(self.shape, dtype=torch.bool, device=inp.ctx.device) for i in active}
        if live:
            maskers = self._maskers()
            total, kept = dict.fromkeys(live, 0.0), dict.fromkeys(live, 0.0)
            for a, e in self.blocks:
                base = inp.base(a, e)
                for i in live:
                    tau = inp.tau(i, a, e, base).abs_()      # the masks depend on |τ| only
                    mask = maskers[i](tau, a)
                    if hold:
                        self.cached[i][a:e] = mask
                    mags = as64(tau)
                    total[i] += sum64(mags)
                    # the same float64 copy times the 0/1 mask: exactly the kept magnitudes
                    kept[i] += sum64(np.multiply(mags, mask.reshape(-1).cpu().numpy(), out=mags))
            for i in live:
                self.factors[i] = l1_factor(total[i], kept[i])

    def _thresholds(self, targets: list[tuple[int, int, bool]]) -> list[Threshold]:
        """The :class:`Threshold` of every ``(model, k, last)`` target: from the run's
        :class:`~.select.SortedCache` (``options["sorted_cache"]``) where it holds (or admits)
        the model's sorted |τ|, else from the radix passes over the canonical blocks."""
        inp = self.inputs
        cache = inp.ctx.options.get("sorted_cache")
        orders: dict[int, torch.Tensor] = {}
        if cache is not None:
            for i in sorted({i for i, _, _ in targets}):
                order = cache.get((inp.ctx.name, inp.shape, inp.has_base, i), inp.numel,
                                  lambda i=i: sorted_bits((inp.tau(i, a, e).abs_() for a, e in self.blocks), inp.numel))
                if order is not None:
                    orders[i] = order
        rest = [t for t in targets if t[0] not in orders]
        radix = iter([])
        if rest:
            streams = sorted({i for i, _, _ in rest})

            def chunks():
                for a, e in self.blocks:
                    base = inp.base(a, e)
                    yield {i: inp.tau(i, a, e, base).abs_() for i in streams}

            radix = iter(magnitude_thresholds(chunks, rest))
        return [sorted_thresholds(orders[i], [(k, last)])[0] if i in orders else next(radix)
                for i, k, last in targets]

    def reset(self) -> None:
        self.maskers = self._maskers()

    def advance(self, a: int, e: int) -> None:
        if self.cached is not None:
            return
        inp = self.inputs
        base = inp.base(a, e)
        for i, rule in enumerate(self.rules):
            if rule.active and rule.kind in ("magnitude", "outliers"):
                self.maskers[i](inp.tau(i, a, e, base).abs_(), a)

    def drop(self) -> None:
        self.cached = None

    def _mask(self, i: int, tau: torch.Tensor, a: int, e: int) -> torch.Tensor | None:
        if self.cached is not None:
            return self.cached[i][a:e] if i in self.cached else None
        return self.maskers[i](tau, a)

    def block(self, a: int, e: int) -> torch.Tensor:
        inp = self.inputs
        base = inp.base(a, e)
        # TIES in one pass (:mod:`.fused`) where the run asks for it (tune's repeated in-memory
        # merges; a one-off merge gains nothing from it and would pay numba's start and memory):
        # a model whose mask needs no τ (none, or cached) goes in as θ_i's rows, read in place
        fuse = self.consensus and base is not None and bool(inp.ctx.options.get("fused"))
        xs, is_model = [], []
        for i, rule in enumerate(self.rules):
            if fuse and (self.cached is not None or not rule.active):
                xs.append(inp.model_view(i, a, e))
                is_model.append(True)
            else:
                xs.append(inp.tau(i, a, e, base))
                is_model.append(False)
        masks = [self._mask(i, x, a, e) for i, x in enumerate(xs)]   # θ_i's rows are never looked at
        if fuse and fused.usable(base, *xs):
            return fused.ties_block(base, xs, is_model, masks, self.weights, self.factors,
                                    normalize=self.normalize, lam=self.lam)
        weighted = []
        for i, (x, model, mask) in enumerate(zip(xs, is_model, masks)):
            tau = x - base if model else x
            if mask is None:
                weighted.append(tau.mul_(self.weights[i]))
            elif self.factors[i] != 1.0:
                weighted.append(tau.mul_(mask_values(mask, tau.dtype)).mul_(self.factors[i]).mul_(self.weights[i]))
            else:                       # one pass: τ · (mask · w) has the bits of (τ · mask) · w
                weighted.append(tau.mul_(mask_values(mask, tau.dtype, self.weights[i])))
        combine = ties_combine_weighted if self.consensus else linear_combine
        mixed = combine(weighted, self.weights, self.normalize)
        if self.lam != 1.0:
            mixed.mul_(self.lam)
        return mixed.add_(base)


# ---- declarations shared by the family -------------------------------------------------------

def density_param(default: float = 1.0) -> Param:
    """The per-model fraction of each task vector kept, in (0, 1]."""
    return unit("density", default, per_model=True, low_open=True, help="fraction of each task vector kept",
                search=(0.1, 1.0))


def rescale_param(default: bool) -> Param:
    return flag("rescale", default, "rescale each sparsified task vector to its L1 norm before the merge")


def normalize_param(default: bool) -> Param:
    return flag("normalize", default, "divide by the sum of the (agreeing) models' weights")


def gta_rows(ctx: TensorContext, rules: Sequence[Sparsify], *, consensus: bool) -> GtaRows:
    """The family's per-tensor function body: GtaRows over ``ctx`` with its parameters."""
    p = ctx.params
    return GtaRows(Inputs(ctx), rules, ctx.weights(), consensus=consensus, normalize=bool(p["normalize"]),
                   lam=float(p["lambda"]), rescale=bool(p.get("rescale", False)), seed=ctx.seed, name=ctx.name)


def row_inputs(shape: Sequence[int], base_rows: Callable[[int, int], torch.Tensor] | None,
               model_rows: Callable[[int, int, int], torch.Tensor], n: int, *, seed: int = 0,
               name: str = "tensor", device: str = "cpu", options: dict | None = None) -> Inputs:
    """:class:`Inputs` over row-reading functions (for callers without a merge context)."""
    ctx = TensorContext(name=name, shape=tuple(shape), n=n, layer=None, depth=0.0, seed=seed, params={},
                        model_params=[{} for _ in range(n)], rows=None, device=device, _base_rows=base_rows,
                        _model_rows=model_rows, options=dict(options or {}))
    return Inputs(ctx)


def whole(rules: Sequence[Sparsify], base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], *,
          consensus: bool, normalize: bool = False, lam: float = 1.0, rescale: bool = False, seed: int = 0,
          name: str = "tensor", fused: bool = False) -> torch.Tensor:
    """The family's computation on in-memory tensors (tests, notebooks): the same bytes as a merge
    (float64 inputs compute in float64), with TIES' one-pass kernel where ``fused`` (:mod:`.fused`)."""
    shape = tuple(base.shape) or (1,)
    flat = [x.reshape(shape) for x in (base, *models)]
    inputs = row_inputs(shape, lambda a, e: flat[0][a:e].clone(), lambda i, a, e: flat[i + 1][a:e].clone(),
                        len(models), seed=seed, name=name, device=str(base.device), options={"fused": fused})
    rows = GtaRows(inputs, rules, weights, consensus=consensus, normalize=normalize, lam=lam, rescale=rescale,
                   seed=seed, name=name)
    return rows(0, shape[0]).reshape(base.shape)
