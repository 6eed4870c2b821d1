"""Order statistics of a tensor given as a stream of chunks, without sorting: two-level
radix selection on float32 bit patterns (histograms of the high and the low 16 bits),
O(numel), any chunking, so tensors larger than memory are handled in row blocks.

- :func:`magnitude_thresholds`: the threshold that keeps the k largest magnitudes (TIES'
  trim, breadcrumbs' outlier cut, SCE's variance selection), with a stated rule for entries
  equal to the threshold: kept lowest flat index first (the order a stable descending sort
  gives), or highest first (the order a stable *ascending* sort leaves at the top).
- :func:`order_values`: the values at given ranks of the ascending order (arcee_fusion's
  quantiles), for values of any sign.
- :func:`sorted_bits` / :func:`sorted_thresholds`: the same thresholds from a tensor's
  magnitudes sorted once (two binary searches per threshold), for a run that trims the same
  task vectors at many densities (``surgery tune``), with :class:`SortedCache` to keep them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

_INF_BITS = 0x7F800000


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    """Non-negative values as float32 int32 bit patterns: same order, exact comparisons."""
    return magnitude.reshape(-1).float().view(torch.int32)


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
    """The kept set of one trimmed tensor: every magnitude whose bits exceed ``bits``, plus,
    of the entries whose bits equal it (in flat order), ``quota`` of them after skipping the
    first ``skip``."""

    bits: int
    quota: int
    skip: int = 0

    def keeper(self) -> "Keeper":
        return Keeper(self.bits, self.quota, self.skip)


def mask_values(keep: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """A bool mask as values of ``dtype``: ``scale`` where kept, 0 elsewhere (0·scale, so a
    negative scale gives −0). ``x * mask_values(keep, x.dtype, w)`` has the bits of
    ``(x * keep) * w``: multiplying by 1 or by 0 is exact, and the scale is rounded to ``dtype``
    as a tensor-scalar product rounds it. On the CPU the conversion is numpy's (a multiply
    by torch's bool mask converts it several times slower)."""
    if keep.device.type != "cpu" or dtype not in _NUMPY_FLOATS:
        return keep.to(dtype).mul_(scale) if scale != 1.0 else keep.to(dtype)
    kind = _NUMPY_FLOATS[dtype]
    out = np.empty(keep.shape, dtype=kind)
    np.multiply(keep.numpy(), kind(scale), out=out)
    return torch.from_numpy(out)


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}

KEEP_ALL = Threshold(-1, 0)
KEEP_NONE = Threshold(0x7FFFFFFF, 0)      # no float32 bit pattern is above it


class Keeper:
    """Applies a :class:`Threshold` to consecutive chunks of the flat tensor (in order)."""

    def __init__(self, bits: int, quota: int, skip: int = 0):
        self.bits, self.left, self.skip = bits, quota, skip

    def apply_(self, flat: torch.Tensor) -> torch.Tensor:
        """Zero the dropped entries of the next chunk of the flat task vector, in place."""
        keep = self(_bits(flat.abs().float()))
        if self.bits < _INF_BITS:          # every dropped entry is finite: a multiply is exact and fast
            return flat.mul_(mask_values(keep, flat.dtype))
        return flat.masked_fill_(keep.logical_not_(), 0)

    def __call__(self, bits: torch.Tensor) -> torch.Tensor:
        """Mask of the kept entries of the next chunk (``bits``: int32 magnitudes, flat)."""
        if bits.device.type == "cpu":     # numpy's integer comparisons: several times torch's on the CPU
            return torch.from_numpy(self._mask(bits.numpy(), lambda m: int(np.count_nonzero(m)), _position_np))
        return self._mask(bits, lambda m: int(torch.count_nonzero(m)), _position)

    def _mask(self, bits: Any, count: Callable[[Any], int], position: Callable[[Any, int], int]) -> Any:
        """The mask of a numpy array or a tensor of bit patterns (the same operators on both)."""
        keep = bits > self.bits
        if self.left == 0:
            return keep
        tied = bits == self.bits
        n = count(tied)
        if self.skip >= n:
            self.skip -= n
            return keep
        if self.skip:
            tied[:position(tied, self.skip) + 1] = False
            n -= self.skip
            self.skip = 0
        if n > self.left:
            tied[position(tied, self.left) + 1:] = False
            n = self.left
        self.left -= n
        keep |= tied
        return keep


def _position_np(mask: np.ndarray, j: int, block: int = 1 << 16) -> int:
    """Flat index of the ``j``-th (1-based) True of a flat numpy bool ``mask``: counted block
    by block up to the block that holds it, which is then scanned."""
    for a in range(0, mask.size, block):
        part = mask[a:a + block]
        c = int(np.count_nonzero(part))
        if j <= c:
            return a + int(np.flatnonzero(part)[j - 1])
        j -= c
    raise IndexError("fewer True entries than asked")


def _position(mask: torch.Tensor, j: int, block: int = 1 << 14) -> int:
    """Flat index of the ``j``-th (1-based) True of ``mask`` (on any device): counts per
    block, then one block scanned."""
    if mask.device.type == "cpu":
        return _position_np(mask.numpy(), j)
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
    """The threshold keeping the ``k`` largest magnitudes, ties lowest flat index first.

    Args:
        chunks: Returns an iterable of the float32 magnitudes (|τ|, any chunking, flat order);
            called up to twice.
        k: How many entries to keep (≥ 1).
    """
    return magnitude_thresholds(lambda: ([c] for c in chunks()), [(0, k, False)])[0]


def magnitude_thresholds(chunks: Callable[[], Iterable[Sequence[torch.Tensor]]],
                         targets: Sequence[tuple[int, int | Callable[[int, int], int], bool]]) -> list[Threshold]:
    """Thresholds keeping the k largest magnitudes of several streams, in two shared passes.

    Args:
        chunks: Returns an iterable over chunks (any chunking, flat order); each chunk is a
            sequence of float32 magnitudes, one per stream (only the streams some target uses
            are read). Called once or twice.
        targets: ``(stream, k, last)``: keep the ``k`` largest magnitudes of that stream; of
            the entries equal to the k-th largest, keep the lowest flat indices first, or the
            highest first when ``last``. ``k`` ≤ 0 keeps nothing, ``k`` ≥ numel everything;
            ``k`` may be a function ``k(numel, zeros)`` of the stream's size and zero count.

    Returns:
        One :class:`Threshold` per target.
    """
    streams = sorted({s for s, _, _ in targets})
    total = dict.fromkeys(streams, 0)
    zeros = dict.fromkeys(streams, 0)
    hi: dict[int, torch.Tensor | None] = dict.fromkeys(streams)
    for parts in chunks():
        for s in streams:
            b = _bits(parts[s])
            total[s] += b.numel()
            zeros[s] += b.numel() - int(torch.count_nonzero(b))
            h = torch.bincount(b >> 16, minlength=1 << 15)      # sign bit is 0
            hi[s] = h if hi[s] is None else hi[s].add_(h)
    out: list[Threshold | None] = [None] * len(targets)
    pending = []
    targets = [(s, k(total[s], zeros[s]) if callable(k) else k, last) for s, k, last in targets]
    for j, (s, k, last) in enumerate(targets):
        nonzero = total[s] - zeros[s]
        if k >= total[s]:
            out[j] = KEEP_ALL
        elif k <= 0:
            out[j] = KEEP_NONE
        elif nonzero <= k:   # common for bf16 fine-tunes: most entries never moved, the k-th largest is 0
            quota = k - nonzero
            out[j] = Threshold(0, quota, zeros[s] - quota if last else 0)
        else:
            b, above = _first_from_top(hi[s].cpu(), k)
            pending.append((j, s, k, last, b, above))
    if pending:
        lo: dict[int, torch.Tensor] = {}
        for parts in chunks():
            for j, s, _, _, b, _ in pending:
                bits = _bits(parts[s])
                h = torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
                lo[j] = h if j not in lo else lo[j].add_(h)
        for j, s, k, last, b, above in pending:
            hist = lo[j].cpu()
            low, above_lo = _first_from_top(hist, k - above)
            quota = k - above - above_lo
            out[j] = Threshold((b << 16) | low, quota, int(hist[low]) - quota if last else 0)
    return out


# ---- thresholds from sorted magnitudes ----------------------------------------------------------

def sorted_bits(chunks: Iterable[torch.Tensor], numel: int) -> torch.Tensor:
    """The float32 bit patterns of non-negative magnitudes given as chunks in flat order
    (``numel`` in all), sorted ascending: an int32 tensor on the CPU (numpy's integer sort)."""
    out = np.empty(numel, dtype=np.int32)
    at = 0
    for c in chunks:
        b = _bits(c).cpu().numpy()
        out[at:at + b.size] = b
        at += b.size
    assert at == numel, (at, numel)
    out.sort()
    return torch.from_numpy(out)


def sorted_thresholds(order: torch.Tensor,
                      targets: Sequence[tuple[int | Callable[[int, int], int], bool]]) -> list[Threshold]:
    """:func:`magnitude_thresholds` of one stream from its :func:`sorted_bits` ``order``: the
    same :class:`Threshold` per ``(k, last)`` target (the same rules), found by binary search."""
    total = order.numel()

    def count_le(v: int) -> int:          # entries whose bits are at most v
        return int(torch.searchsorted(order, torch.tensor([v], dtype=order.dtype), right=True))

    zeros = count_le(0)
    out = []
    for k, last in targets:
        k = k(total, zeros) if callable(k) else k
        nonzero = total - zeros
        if k >= total:
            out.append(KEEP_ALL)
        elif k <= 0:
            out.append(KEEP_NONE)
        elif nonzero <= k:
            quota = k - nonzero
            out.append(Threshold(0, quota, zeros - quota if last else 0))
        else:
            v = int(order[total - k])                 # the k-th largest
            at_most = count_le(v)
            above = total - at_most
            equal = at_most - int(torch.searchsorted(order, torch.tensor([v], dtype=order.dtype)))
            quota = k - above
            out.append(Threshold(v, quota, equal - quota if last else 0))
    return out


class SortedCache:
    """Sorted magnitudes (:func:`sorted_bits`) kept across merges of the same task vectors
    (``surgery tune`` trims them once per trial): entries are admitted while they fit in
    ``max_bytes`` and never evicted, so an entry that does not fit is never computed and its
    thresholds come from the radix passes (an LRU cache walked in tensor order would evict
    every entry before its next use).

    Attributes:
        seconds: Time spent sorting (the one-time cost the cache saves later; summed over threads).
        nbytes: Bytes held now (4 per entry).
        fills: Entries computed so far.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.seconds = 0.0
        self.nbytes = 0
        self.fills = 0
        self._entries: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()       # tensors are merged on several worker threads

    def get(self, key: tuple, numel: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The entry of ``key`` (``compute()`` the first time), or None when it would not fit."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None or self.nbytes + 4 * numel > self.max_bytes:
                return hit
            self.nbytes += 4 * numel         # reserved: another thread's entry cannot take the room
        t0 = time.perf_counter()
        value = compute()
        with self._lock:
            self.seconds += time.perf_counter() - t0
            self._entries[key] = value
            self.fills += 1
        return value


# ---- values of any sign ------------------------------------------------------------------

def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 values as int64 keys in [0, 2^32) with the same order (−0 just below +0)."""
    b = x.reshape(-1).float().view(torch.int32).to(torch.int64)
    return torch.where(b < 0, (~b) & 0xFFFFFFFF, b | 0x80000000)


def _key_value(key: int) -> float:
    b = key & 0x7FFFFFFF if key >= 0x80000000 else (~key) & 0xFFFFFFFF
    return float(torch.tensor([b], dtype=torch.int64).to(torch.int32).view(torch.float32))


def order_values(chunks: Callable[[], Iterable[torch.Tensor]], ranks: Sequence[int]) -> list[float]:
    """The values at 0-based ``ranks`` of the ascending order of a stream of float32 values
    (exactly what ``torch.sort(x).values[rank]`` gives), in two passes over ``chunks()``."""
    hi = _histogram(torch.bincount(_order_keys(c) >> 16, minlength=1 << 16) for c in chunks())
    below = torch.cumsum(hi, 0)
    bins = []
    for r in ranks:
        b = int(torch.searchsorted(below, torch.tensor([r], dtype=below.dtype), right=True))
        bins.append((b, int(below[b - 1]) if b else 0))
    wanted = sorted({b for b, _ in bins})
    lo = {b: torch.zeros(1 << 16, dtype=torch.int64) for b in wanted}
    for c in chunks():
        keys = _order_keys(c)
        top = keys >> 16
        for b in wanted:
            lo[b] += torch.bincount(keys[top == b] & 0xFFFF, minlength=1 << 16).cpu()
    out = []
    for r, (b, before) in zip(ranks, bins):
        cum = torch.cumsum(lo[b], 0)
        low = int(torch.searchsorted(cum, torch.tensor([r - before], dtype=cum.dtype), right=True))
        out.append(_key_value((b << 16) | low))
    return out
