"""Fixtures of the adapter tests (helpers live in tests/helpers/adapter_helpers.py)."""

from __future__ import annotations

import pytest
from adapter_helpers import make_llama_f32


@pytest.fixture(scope="session")
def llama_f32(tmp_path_factory):
    """llama-tiny upcast to float32 (exact), shared by the tests of this folder."""
    return make_llama_f32(tmp_path_factory.mktemp("base") / "llama-f32")
