"""Evaluation tests run tiny models: one thread avoids OpenMP barrier stalls when other jobs load the CPUs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
