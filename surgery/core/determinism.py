"""Decompositions whose results do not depend on the thread count.

Multi-threaded LAPACK reduces in a different order on a different number of threads, so a
float32 SVD differs in its last bits between ``OMP_NUM_THREADS=1`` and ``2`` and so would the
files written from it. :func:`svd` runs the decomposition on one intra-op thread and fixes
each singular pair's sign (the largest-magnitude entry of every left singular vector is
positive), so the same matrix always gives the same bytes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, and numpy's BLAS on one thread (both restored
    afterwards; see :func:`numpy_blas_one_thread`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with numpy_blas_one_thread():
            yield
    finally:
        torch.set_num_threads(previous)


# numpy's BLAS (OpenBLAS in its wheels) has one process-wide thread count, unlike torch's
# per-thread one: it is set to 1 while any caller needs it (a count, so that one worker's exit
# never restores the threads under another worker's call) and restored when the last leaves
_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = 1
_blas_controller: Any = None


class _OpenBLAS:
    """The process-wide thread count of numpy's OpenBLAS (its pthreads build: one pool for the
    whole process, set from any thread), through its own C functions."""

    def __init__(self, dynlib: Any, prefix: str, suffix: str):
        self._get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}")
        self._set = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}")

    def get(self) -> int:
        return int(self._get())

    def set(self, n: int) -> None:
        self._set(int(n))


def numpy_blas() -> _OpenBLAS | None:
    """numpy's BLAS when it is an OpenBLAS with one process-wide pool (numpy's own wheels),
    found by threadpoolctl; None otherwise (then :func:`numpy_linalg` is False and the float64
    linear algebra stays in torch)."""
    global _blas_controller
    if _blas_controller is None:
        _blas_controller = False
        try:
            import numpy as np
            from threadpoolctl import ThreadpoolController

            np.ones((2, 2)) @ np.ones((2, 2))          # numpy's BLAS is loaded
            for lc in ThreadpoolController().select(internal_api="openblas").lib_controllers:
                if "numpy" not in str(lc.filepath) or getattr(lc, "threading_layer", "") != "pthreads":
                    continue
                for prefix in ("scipy_", ""):
                    for suffix in ("64_", "", "_64"):
                        if hasattr(lc.dynlib, f"{prefix}openblas_set_num_threads{suffix}"):
                            _blas_controller = _OpenBLAS(lc.dynlib, prefix, suffix)
                            break
                    if _blas_controller:
                        break
        except Exception:            # no threadpoolctl, or a BLAS it does not know
            _blas_controller = False
    return _blas_controller or None


def numpy_linalg() -> bool:
    """True when numpy's BLAS/LAPACK can be held to one thread (so its results do not depend
    on the thread count) and float64 products and ``eigh`` may run there: on this project's
    CPUs OpenBLAS's dgemm is about twice and its dsyevd 1.25x as fast as torch's (MKL) on one
    thread (docs/merge.md, "Threads")."""
    return numpy_blas() is not None


@contextmanager
def numpy_blas_one_thread() -> Iterator[None]:
    """numpy's BLAS on one thread inside the block (a no-op without :func:`numpy_blas`)."""
    global _blas_users, _blas_saved
    ctl = numpy_blas()
    if ctl is None:
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = ctl.get()
            ctl.set(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                ctl.set(_blas_saved)


def svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(m, full_matrices=False)``, thread-count independent and sign-fixed."""
    if m.device.type == "cpu":
        with one_thread():
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    if u.numel():
        idx = u.abs().argmax(dim=0)
        sign = torch.sign(u.gather(0, idx.unsqueeze(0))).squeeze(0)
        sign[sign == 0] = 1
        u, vh = u * sign, vh * sign.unsqueeze(1)
    return u, s, vh
