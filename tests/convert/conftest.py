"""Fixtures for conversion tests."""

from __future__ import annotations

import pytest
from convert_helpers import random_native

_IMPORTED: dict[str, object] = {}


@pytest.fixture
def native_dir(tmp_path, shared):
    return random_native(tmp_path / "native", shared)


@pytest.fixture
def stories(shared, tmp_path_factory):
    """(shared stories260K folder, its native import from llama2.c); imported once per session."""
    from llamalab.convert.llama2c import import_llama2c

    folder = shared("weights", "stories260K")
    if "stories" not in _IMPORTED:
        _IMPORTED["stories"] = import_llama2c(folder / "stories260K.bin",
                                              tmp_path_factory.mktemp("stories") / "native",
                                              tokenizer=folder / "tok512.bin")
    return folder, _IMPORTED["stories"]


