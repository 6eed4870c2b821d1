"""Tiny TokenFormer checkpoints for the grow tests, built once per session under tmp."""

from __future__ import annotations

import pytest
import torch

from surgery.grow.fixture import build_tiny_tokenformer


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tensors here are tiny, and two threads spin against each other
    on a shared 2-core machine (several times slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenformers(tmp_path_factory):
    """{norm_activation_type: folder} of tiny float32 TokenFormers (seed 0)."""
    root = tmp_path_factory.mktemp("tokenformer")
    return {norm: build_tiny_tokenformer(root / norm, norm_activation_type=norm, seed=0)
            for norm in ("l2_norm_gelu", "gelu_l2_norm", "softmax")}
