"""Fixtures for conversion tests."""

from __future__ import annotations

import pytest
from convert_helpers import random_native


@pytest.fixture
def native_dir(tmp_path, shared):
    return random_native(tmp_path / "native", shared)
