"""Shared fixtures. Real reference data lives in ../shared/data (read-only); tests that need it skip without it."""

from __future__ import annotations

import pytest
import torch

from shared_data import shared_path

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def shared():
    return shared_path
