import os

import pytest
import torch

# Tests are small: keep CPU threads modest so parallel test processes do not oversubscribe cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
