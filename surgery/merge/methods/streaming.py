"""Row streaming for merge methods that need whole-tensor statistics (norms, cosines, Gram
matrices, thresholds, L1 sums) before they can produce a single output entry.

Such a method makes several passes over one tensor: statistics passes, then the output
pass the engine asks for in row blocks. :class:`Inputs` gives every pass the same row
access: a tensor whose float32 copies (base and every model) fit in
:data:`IN_MEMORY_BYTES` is read once and held for the tensor's passes; a larger one (an
embedding, a 7B model's MLP) is re-read in row blocks on every pass, so peak memory stays a
few MB per model whatever the model size.

Statistics are always accumulated over the same :func:`canonical_blocks` (a function of the
shape only) in float64 with numpy's single-threaded pairwise sums, so a method's output bytes
depend neither on whether the tensor was held or streamed, nor on the row blocks the engine
asks for, nor on the thread count.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ...core.engine import row_ranges, rows_in_blocks
from ..method import TensorContext

SUB_ELEMENTS = 1 << 20        # entries per model in one block of output
STATS_ELEMENTS = 1 << 20      # entries per model in one block of a statistics pass (fixes float64 sums)
IN_MEMORY_BYTES = 64 << 20    # a tensor whose float32 inputs fit here is read once per tensor


def canonical_blocks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """The row blocks every statistics pass over a tensor of ``shape`` walks, in order."""
    return row_ranges(0, shape[0], math.prod(shape[1:]), STATS_ELEMENTS) or [(0, shape[0])]


def as64(x: torch.Tensor) -> np.ndarray:
    """A flat float64 numpy copy of ``x`` (on the CPU)."""
    return x.detach().reshape(-1).to("cpu", dtype=torch.float64).numpy()


def sum64(x: np.ndarray) -> float:
    """Σ x with numpy's pairwise summation (no dependence on the thread count)."""
    return float(np.add.reduce(x)) if x.size else 0.0


class Inputs:
    """Row access to one tensor of the base and of every model, for multi-pass methods.

    Args:
        ctx: The method's :class:`TensorContext` (whole-tensor kind: ``ctx.rows`` is None).
        budget: Hold the tensor in memory when base + models take at most this many bytes in
            float32 (default :data:`IN_MEMORY_BYTES`).

    Attributes:
        shape, numel, n, row_elems: The tensor and the number of models.
        blocks: :func:`canonical_blocks` of the tensor.
        held: Whether the tensor is held in memory (read once).
    """

    def __init__(self, ctx: TensorContext, budget: int | None = None):
        self.ctx = ctx
        self.shape = tuple(ctx.shape)
        self.rows = self.shape[0]
        self.row_elems = math.prod(self.shape[1:])
        self.numel = ctx.numel
        self.n = ctx.n
        self.has_base = ctx.has_base
        self.blocks = canonical_blocks(self.shape)
        budget = IN_MEMORY_BYTES if budget is None else budget
        self.held = self.numel * 4 * (self.n + int(self.has_base)) <= budget
        self._base = self._models = None
        if self.held:
            self._base = ctx.base_rows(0, self.rows) if self.has_base else None
            self._models = [ctx.model_rows(i, 0, self.rows) for i in range(self.n)]

    def base(self, a: int, e: int) -> torch.Tensor | None:
        """Rows of θ0 (read-only: may be a view of the held tensor); None without a base."""
        if not self.has_base:
            return None
        return self._base[a:e] if self.held else self.ctx.base_rows(a, e)

    def model(self, i: int, a: int, e: int) -> torch.Tensor:
        """Rows of θ_i, a fresh float32 copy."""
        return self._models[i][a:e].clone() if self.held else self.ctx.model_rows(i, a, e)

    def model_view(self, i: int, a: int, e: int) -> torch.Tensor:
        """Rows of θ_i to read only (a view of the held tensor: no copy)."""
        return self._models[i][a:e] if self.held else self.ctx.model_rows(i, a, e)

    def tau(self, i: int, a: int, e: int, base: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of τ_i = θ_i − θ0 (fresh); ``base`` saves re-reading θ0's rows."""
        base = self.base(a, e) if base is None else base
        if self.held:                  # one pass, no copy first (the same bytes as copy-then-subtract)
            return self._models[i][a:e] - base
        return self.ctx.model_rows(i, a, e).sub_(base)

    def vectors(self, a: int, e: int, taus: bool, fresh: bool = True) -> list[torch.Tensor]:
        """Rows of every model's τ_i (``taus``; always fresh) or θ_i (fresh copies, or with
        ``fresh=False`` views to read only)."""
        if taus:
            base = self.base(a, e)
            return [self.tau(i, a, e, base) for i in range(self.n)]
        get = self.model if fresh else self.model_view
        return [get(i, a, e) for i in range(self.n)]

    def release(self) -> None:
        """Drop the held tensors (nothing is kept between tensors)."""
        self._base = self._models = None
        self.held = False


def gram64(blocks: Sequence[tuple[int, int]], vectors: Callable[[int, int], list[torch.Tensor]]) -> np.ndarray:
    """The k×k float64 Gram matrix ⟨v_i, v_j⟩ of k flattened tensors given block by block.

    Args:
        blocks: Row blocks in order (:func:`canonical_blocks`).
        vectors: ``vectors(a, e)``: the k tensors' rows ``[a, e)``.
    """
    g = buf = tmp = None
    for a, e in blocks:
        vs = [_flat_numpy(v) for v in vectors(a, e)]
        if g is None:                  # the pieces' float64 buffers, made once for the whole matrix
            g, buf, tmp = np.zeros((len(vs), len(vs))), np.empty((len(vs), PAIRWISE_LEAF)), np.empty(PAIRWISE_LEAF)
        g += _pairwise_products(vs, buf, tmp)
    return g


def _flat_numpy(x: torch.Tensor) -> np.ndarray:
    """``x`` flat on the CPU as float32 or float64 numpy (half types widen exactly to float32)."""
    x = x.detach().reshape(-1).to("cpu")
    return (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()


PAIRWISE_LEAF = 1 << 15       # entries per piece whose float64 products are formed at once (in cache)


def _pairwise_products(vs: Sequence[np.ndarray], buf: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """The k×k matrix of ``sum64(v_i * v_j)`` (float64 products of float32 vectors), with the
    very bits of ``np.add.reduce`` over each whole product vector, without forming the vectors.

    numpy sums a contiguous float64 array pairwise: above 128 entries it splits at
    ``n2 = n // 2 − (n // 2) % 8`` and adds the two halves' sums. Recursing the same way down to
    pieces of at most :data:`PAIRWISE_LEAF` entries, summing each piece with ``np.add.reduce``
    (the same subtree) and adding the halves in the same order (Python floats: the same IEEE
    additions) gives the same floats, while the products of a piece stay in cache (about 3×
    faster than whole-block products for 3 models). ``buf`` (k × :data:`PAIRWISE_LEAF`) and
    ``tmp`` (:data:`PAIRWISE_LEAF`) are float64 work space.
    """
    k, n = len(vs), vs[0].size
    upper = [(i, j) for i in range(k) for j in range(i, k)]
    sums = _piece(vs, upper, buf, tmp, 0, n) if n else [0.0] * len(upper)
    g = np.empty((k, k))
    for (i, j), s in zip(upper, sums):
        g[i, j] = g[j, i] = s
    return g


def _piece(vs: Sequence[np.ndarray], upper: list[tuple[int, int]], buf: np.ndarray, tmp: np.ndarray,
           lo: int, hi: int) -> list[float]:
    """:func:`_pairwise_products`' sums over entries ``[lo, hi)`` (a module function, not a
    recursive closure: a closure that calls itself is a reference cycle, and it would keep the
    block's vectors alive until the garbage collector happens to run)."""
    m = hi - lo
    if m > PAIRWISE_LEAF:
        half = m // 2
        half -= half % 8
        left = _piece(vs, upper, buf, tmp, lo, lo + half)
        return [x + y for x, y in zip(left, _piece(vs, upper, buf, tmp, lo + half, hi))]
    b = buf[:len(vs), :m]
    for i, v in enumerate(vs):
        b[i] = v[lo:hi]                              # float32 → float64, exact
    t = tmp[:m]
    return [float(np.add.reduce(np.multiply(b[i], b[j], out=t))) for i, j in upper]


def row_dots64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per last-dim vector ⟨x, y⟩ in float64 (pairwise sums; shape ``x.shape[:-1]``)."""
    a = x.detach().to("cpu", dtype=torch.float64).numpy()
    b = a if y is x else y.detach().to("cpu", dtype=torch.float64).numpy()
    return torch.from_numpy(np.add.reduce(a * b, axis=-1))


def column_dots64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per position of ``shape[1:]``, Σ over the first dimension of x·y, in float64 (numpy's
    sequential row accumulation: no dependence on the thread count)."""
    a = x.detach().reshape(x.shape[0], -1).to("cpu", dtype=torch.float64).numpy()
    b = a if y is x else y.detach().reshape(y.shape[0], -1).to("cpu", dtype=torch.float64).numpy()
    return torch.from_numpy(np.add.reduce(a * b, axis=0)).reshape(x.shape[1:])


class Streamed:
    """A ``rows(start, stop)`` function for the engine: ``prepare()`` runs once, before the
    first rows (the statistics passes); ``produce(a, e)`` returns output rows, called on
    blocks of about :data:`SUB_ELEMENTS` entries; everything is dropped after the last row."""

    def __init__(self, shape: Sequence[int], prepare: Callable[[], None] | None,
                 produce: Callable[[int, int], torch.Tensor], release: Callable[[], None] | None = None):
        self.shape = tuple(shape)
        self.prepare, self.produce, self.release = prepare, produce, release
        self.ready = prepare is None

    def __call__(self, a: int, e: int) -> torch.Tensor:
        e = min(e, self.shape[0])
        if not self.ready:
            self.prepare()
            self.ready = True
        out = rows_in_blocks(self.shape, a, e, SUB_ELEMENTS, self.produce)
        if e >= self.shape[0] and self.release is not None:
            self.release()
        return out


class OrderedRows:
    """Base of a ``rows(start, stop)`` function whose output depends on state carried through
    the tensor in flat order (tie quotas of a threshold): :meth:`prepare` runs once (the
    statistics passes); :meth:`reset` makes fresh state, :meth:`advance` carries it over rows
    without producing them (a block asked out of order restarts from row 0); :meth:`block`
    produces rows in order. ``one_block`` (rows that are not independent, such as a 1-D
    tensor ranked as one row) produces the whole tensor on every request."""

    one_block = False

    def __init__(self, inputs: Inputs):
        self.inputs = inputs
        self.shape = inputs.shape
        self.blocks = [(0, self.shape[0])] if self.one_block else inputs.blocks
        self.prepared = False
        self.next_row = -1

    def prepare(self) -> None:
        """Statistics passes (once per tensor)."""

    def reset(self) -> None:
        """Fresh per-pass state before row 0."""

    def advance(self, a: int, e: int) -> None:
        """Carry the state over rows ``[a, e)`` without producing them."""

    def block(self, a: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, a: int, e: int) -> torch.Tensor:
        e = min(e, self.shape[0])
        if not self.prepared:
            self.prepare()
            self.prepared = True
        if self.one_block:
            self.reset()
            out = self.block(0, self.shape[0])[a:e]
        else:
            if a != self.next_row:
                self.reset()
                for s, t in self.blocks:
                    if s < a:
                        self.advance(s, min(t, a))
            out = rows_in_blocks(self.shape, a, e, SUB_ELEMENTS, self.block)
        self.next_row = e
        if e >= self.shape[0]:
            self.next_row = -1
            self.inputs.release()       # nothing is held between tensors
            self.drop()
        return out

    def drop(self) -> None:
        """Free what :meth:`prepare` held for the output pass (the tensor is done)."""
