"""The merge tests run their many small decompositions on one thread: on the shared 2-core
machine, multi-threaded LAPACK on 64×64 matrices spins for 100× longer than it computes."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Every test in this folder runs on one torch thread (fixture in tests/conftest.py)."""
