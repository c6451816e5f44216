"""Fixtures shared by the family tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than several (and does not spin on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
