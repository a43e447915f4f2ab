"""The weight-import tests run on one torch thread: on the shared 2-core machine two intra-op threads that
compete with other processes make the full-size model's steps many times slower, not faster."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
