"""Shared fixtures. Real reference data lives in ../shared/data (read-only); tests that need it skip without it."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from shared_data import shared_path

# The test models are tiny: their time is per-op overhead, and a second OpenMP thread only adds barrier waits
# (10x slower when another process holds a core). Multi-process tests set their own threads.
torch.set_num_threads(1)


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh tmpfs of ``size`` ("3m") mounted under tmp_path -- a real disk that fills up.
    Skips where mounting is not allowed (it needs root)."""
    mounts = []

    def mount(size: str):
        folder = tmp_path / f"tmpfs{len(mounts)}"
        folder.mkdir()
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)
