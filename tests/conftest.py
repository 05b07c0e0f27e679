"""Shared fixtures. Real reference data lives in ../shared/data (read-only); tests that need it skip without it."""

from __future__ import annotations

import pytest
import torch

from shared_data import shared_path

# The test models are tiny: their time is per-op overhead, and a second OpenMP thread only adds barrier waits
# (10x slower when another process holds a core). Multi-process tests set their own threads.
torch.set_num_threads(1)


@pytest.fixture
def shared():
    return shared_path
