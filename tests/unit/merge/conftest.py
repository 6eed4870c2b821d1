"""The merge tests run their many small decompositions on one thread: on the shared 2-core
machine, multi-threaded LAPACK on 64×64 matrices spins for 100× longer than it computes."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
