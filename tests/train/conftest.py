"""A tiny prepared data folder (written with the data package's own shard writer) and configs for it."""

from __future__ import annotations

import pytest
from train_helpers import tiny_overrides, write_prepared

from llamalab.config import load_config


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture
def make_config(prepared, tmp_path):
    """``make_config(*overrides)``: the ``tiny`` model on the tiny data, 8 steps, quiet, in tmp_path/run."""

    def make(*overrides, out="run"):
        return load_config(None, tiny_overrides(prepared, tmp_path / out) + list(overrides))

    return make
