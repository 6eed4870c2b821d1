"""Tiny TokenFormer checkpoints for the grow tests, built once per session under tmp."""

from __future__ import annotations

import pytest

from make_tokenformer import build_tiny_tokenformer


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Every test in this folder runs on one torch thread (fixture in tests/conftest.py)."""


@pytest.fixture(scope="session")
def tokenformers(tmp_path_factory):
    """{norm_activation_type: folder} of tiny float32 TokenFormers (seed 0)."""
    root = tmp_path_factory.mktemp("tokenformer")
    return {norm: build_tiny_tokenformer(root / norm, norm_activation_type=norm, seed=0)
            for norm in ("l2_norm_gelu", "gelu_l2_norm", "softmax")}
