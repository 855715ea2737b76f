"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny ops on a 2-core machine, where intra-op threads only contend (a 40-step
    overfit took 128 s with two threads under load, 0.6 s with one). Subprocesses are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
