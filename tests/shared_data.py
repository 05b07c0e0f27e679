"""Where the read-only reference data lives (../shared/data beside the checkout), and a skip when it is absent.

A plain module rather than conftest.py, because several test folders have a conftest.py of their own and
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMALAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path
