"""Native bf16 is decided from the hardware's flags (or forced), never from a timing race."""

from __future__ import annotations

import pytest
import torch

from llamalab import hardware


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, False),
    ({"avx2", "avx512f", "avx512_bf16"}, True),
    ({"avx2", "amx_bf16", "amx_tile"}, True),
    ({"asimd", "bf16"}, True),
    (set(), False),
])
def test_cpu_bf16_follows_the_flags(monkeypatch, flags, expected):
    monkeypatch.delenv("LLAMALAB_FAST_BF16", raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.fast_bf16("cpu") is expected


@pytest.mark.parametrize("forced", ["0", "1"])
def test_either_branch_can_be_forced(monkeypatch, forced):
    monkeypatch.setenv("LLAMALAB_FAST_BF16", forced)
    assert hardware.fast_bf16(torch.device("cpu")) is (forced == "1")


def test_this_machines_flags_are_read():
    with open("/proc/cpuinfo") as fh:
        text = fh.read()
    assert ("avx2" in text) == ("avx2" in hardware.cpu_flags())
