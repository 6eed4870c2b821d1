"""One torch thread for these tests: their matrices are tiny, and on a shared 2-core machine two
OpenMP threads spin against other processes and make small SVDs 5-10× slower."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Every test in this folder runs on one torch thread (fixture in tests/conftest.py)."""
