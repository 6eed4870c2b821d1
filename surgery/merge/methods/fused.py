"""TIES' sign election and disjoint mean in one pass over memory (numba), for CPU float tensors.

:meth:`~.sparsify.GtaRows.block` computes, per element, τ_i = θ_i − θ0, the weighted and
masked x_i, the elected sign, the agreeing sum (and divisor), λ and θ0 again: about fifty
elementwise torch passes over chunks of the block. :func:`ties_block` does the same
arithmetic on one element at a time, in the same order and in the tensors' dtype, so its
bytes are :meth:`GtaRows.block`'s (tests/unit/merge/test_methods.py compares them bit for bit,
signed zeros, NaN and infinities included):

- x_i = τ_i · w_i without a mask; τ_i · (mask · w_i) with one (``mask_values``: the scale
  is ``w_i`` or ``0 · w_i``); ((τ_i · mask) · f_i) · w_i with an L1 rescale factor f_i;
- S = x_0 + x_1 + … (model order); P = +0 + max(x_0, 0) + max(x_1, 0) + …, N likewise
  with min (NaN propagates, as torch's clamp does); u = [S ≥ 0];
- out = P·u + N·(1 − u), divided (``normalize``) by d = D⁺·u + D⁻·(1 − u) + [d = 0] with
  D⁺ = Σ w_i [x_i > 0], D⁻ = Σ w_i [x_i < 0]; times λ; plus θ0.

numba compiles with IEEE semantics (no fast-math, no contraction of a product into an add
that would round differently: the only products added are exact, by 0 or 1). Where numba
is not installed, or for other dtypes and devices, the torch path runs; the results are the
same bytes either way.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import torch

CHUNK = 2048            # elements per step: the kernel's buffers stay in L1
_lock = threading.Lock()
_kernel: Any = None
_tried = False


def _compile() -> Any:
    import numba

    @numba.njit(cache=True, nogil=True)
    def kernel(base, xs, is_model, masks, mode, factors, weights, normalize, lam, apply_lam, out):
        # chunks of CHUNK elements, each step a branch-free loop over the chunk (vectorized)
        size = out.shape[0]
        zero = base.dtype.type(0)
        one = base.dtype.type(1)
        x = np.empty(CHUNK, base.dtype)
        s = np.empty(CHUNK, base.dtype)
        p = np.empty(CHUNK, base.dtype)
        q = np.empty(CHUNK, base.dtype)
        dp = np.empty(CHUNK, base.dtype)
        dq = np.empty(CHUNK, base.dtype)
        for c in range(0, size, CHUNK):
            m = min(CHUNK, size - c)
            b = base[c:c + m]           # slices: indexing them by k alone lets LLVM vectorize
            dst = out[c:c + m]
            for i in range(len(xs)):
                src = xs[i][c:c + m]
                keep = masks[i][c:c + m] if mode[i] else masks[i]
                w = weights[i]
                if is_model[i]:
                    for k in range(m):
                        x[k] = src[k] - b[k]
                else:
                    for k in range(m):
                        x[k] = src[k]
                if mode[i] == 0:
                    for k in range(m):
                        x[k] = x[k] * w
                elif mode[i] == 1:
                    f = factors[i]
                    for k in range(m):
                        x[k] = ((x[k] * (one if keep[k] else zero)) * f) * w
                else:
                    zw = zero * w
                    for k in range(m):
                        x[k] = x[k] * (w if keep[k] else zw)
                # torch.clamp(x, min=0) / (x, max=0) propagate NaN; a zero's sign never
                # survives the add to +0 (or to a nonzero sum)
                if i == 0:
                    for k in range(m):
                        s[k] = x[k]
                        p[k] = zero + (zero if x[k] <= zero else x[k])
                        q[k] = zero + (zero if x[k] >= zero else x[k])
                else:
                    for k in range(m):
                        s[k] = s[k] + x[k]
                        p[k] = p[k] + (zero if x[k] <= zero else x[k])
                        q[k] = q[k] + (zero if x[k] >= zero else x[k])
                if normalize:
                    if i == 0:
                        for k in range(m):
                            dp[k] = zero + (w if x[k] > zero else zero)
                            dq[k] = zero + (w if x[k] < zero else zero)
                    else:
                        for k in range(m):
                            dp[k] = dp[k] + (w if x[k] > zero else zero)
                            dq[k] = dq[k] + (w if x[k] < zero else zero)
            if normalize:
                for k in range(m):
                    u = one if s[k] >= zero else zero
                    v = one - u
                    d = dp[k] * u
                    d = d + dq[k] * v
                    d = d + (one if d == zero else zero)
                    o = p[k] * u
                    o = o + q[k] * v
                    x[k] = o / d
            else:
                for k in range(m):
                    u = one if s[k] >= zero else zero
                    o = p[k] * u
                    x[k] = o + q[k] * (one - u)
            if apply_lam:
                for k in range(m):
                    dst[k] = x[k] * lam + b[k]
            else:
                for k in range(m):
                    dst[k] = x[k] + b[k]

    return kernel


def kernel() -> Any:
    """The compiled kernel, or None where numba is missing (compiled once per process, from
    numba's on-disk cache after the first)."""
    global _kernel, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _kernel = _compile()
                except Exception:       # no numba, or one that does not import here: the torch path
                    _kernel = None
                _tried = True
    return _kernel


def compiled() -> int:
    """How many specializations (one per dtype and model count) the kernel holds in this
    process, compiled or loaded from numba's disk cache: a one-time cost that ``surgery tune``
    reports with its preparation, not as a trial's merge."""
    k = _kernel
    return len(k.signatures) if k is not None else 0


def usable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`ties_block` takes these tensors (CPU, float32 or float64, one dtype)."""
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and kernel() is not None)


def ties_block(base: torch.Tensor, xs: Sequence[torch.Tensor], is_model: Sequence[bool],
               masks: Sequence[torch.Tensor | None], weights: Sequence[float], factors: Sequence[float], *,
               normalize: bool, lam: float) -> torch.Tensor:
    """θ0 + λ · TIES(x_i) of one block (module docstring); ``xs[i]`` is θ_i's rows where
    ``is_model[i]``, else τ_i's; ``masks[i]`` the kept entries (None: all)."""
    kind = np.float32 if base.dtype == torch.float32 else np.float64

    def flat(x: torch.Tensor) -> np.ndarray:
        return x.contiguous().reshape(-1).numpy()

    empty = np.zeros(1, dtype=np.bool_)
    mask_arrays = tuple(empty if m is None else flat(m if m.dtype == torch.bool else m != 0) for m in masks)
    # 0: x = τ·w; 1: ((τ·mask)·f)·w; 2: τ·(mask·w) (GtaRows.block's three products)
    mode = np.array([0 if m is None else 1 if f != 1.0 else 2 for m, f in zip(masks, factors)], dtype=np.int8)
    out = torch.empty(base.shape, dtype=base.dtype)
    kernel()(flat(base), tuple(flat(x) for x in xs), np.array(list(is_model), dtype=np.bool_), mask_arrays, mode,
             np.array(factors, dtype=kind), np.array(weights, dtype=kind), bool(normalize), kind(lam), lam != 1.0,
             out.reshape(-1).numpy())
    return out
