"""One torch thread for these tests: their matrices are tiny, and on a shared 2-core machine two
OpenMP threads spin against other processes and make small SVDs 5-10× slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
