"""numpy's BLAS held to one thread while surgery's float64 linear algebra runs on it
(surgery.core.determinism): process-wide, counted, restored when the last user leaves."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from surgery.core import determinism
from surgery.merge.methods import subspace

pytestmark = pytest.mark.skipif(not determinism.numpy_linalg(), reason="numpy's BLAS cannot be controlled here")


def _threads() -> int:
    return determinism.numpy_blas().get()


def test_one_thread_inside_and_restored_after_the_last_user():
    ctl = determinism.numpy_blas()
    before = ctl.get()
    ctl.set(2)                                # a known starting point, restored by the test
    try:
        inside, release = threading.Event(), threading.Event()
        seen = []

        def user():
            with determinism.numpy_blas_one_thread():
                seen.append(_threads())
                inside.set()
                release.wait()

        t = threading.Thread(target=user)
        t.start()
        inside.wait()
        with determinism.numpy_blas_one_thread():
            seen.append(_threads())
        # the other user is still inside: leaving must not restore the threads under it
        seen.append(_threads())
        release.set()
        t.join()
        assert seen == [1, 1, 1]
        assert _threads() == 2
    finally:
        ctl.set(before)


def test_subspace_linear_algebra_equals_torch_float64_closely():
    """The numpy path's products and eigh give what torch's float64 ones do, to rounding."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(300, 40, generator=g, dtype=torch.float64)
    assert torch.allclose(subspace.matmul64(m.mT, m), m.mT @ m, rtol=1e-13, atol=1e-12)
    u, s, vt = subspace.top_svd(m.float(), 10)
    s_ref = torch.linalg.svdvals(m)[:10]
    assert torch.allclose(s.double(), s_ref, rtol=1e-6)
    p = subspace.polar(m)
    assert torch.allclose(p.mT @ p, torch.eye(40, dtype=torch.float64), atol=1e-12)
    uu, _, vh = torch.linalg.svd(m, full_matrices=False)
    assert torch.allclose(p, uu @ vh, atol=1e-12)
