"""Decompositions whose results do not depend on the thread count.

Multi-threaded LAPACK reduces in a different order on a different number of threads, so a
float32 SVD differs in its last bits between ``OMP_NUM_THREADS=1`` and ``2`` and so would the
files written from it. :func:`svd` runs the decomposition on one intra-op thread and fixes
each singular pair's sign (the largest-magnitude entry of every left singular vector is
positive), so the same matrix always gives the same bytes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
