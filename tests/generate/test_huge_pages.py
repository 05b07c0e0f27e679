"""Huge pages under a compiled CPU step's weights and a Decoder's key/value cache: values kept, pages really 2 MiB
(read back from the kernel)."""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

import pytest
import torch
from decode_helpers import PROMPTS

from llamalab.generate import Decoder, generate_tokens
from llamalab.inference.backend import accelerate
from llamalab.inference.backend.huge_pages import HUGE_PAGE, back_with_huge_pages
from llamalab.model import build_model


def _huge_pages_offered() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not switched off."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not setting.exists() or "[never]" in setting.read_text():
        return False
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    return (major, minor) >= (6, 1)


pytestmark = pytest.mark.skipif(not _huge_pages_offered(), reason="needs Linux 6.1+ with transparent huge pages")


def _huge_bytes(start: int, end: int) -> int:
    """AnonHugePages of the mappings overlapping [start, end), from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            low, high = (int(part, 16) for part in head.groups())
            inside = low < end and high > start
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def _process_huge_bytes() -> int:
    return _huge_bytes(0, 2 ** 64)


def test_back_with_huge_pages_keeps_values_and_maps_huge_pages():
    tensor = torch.randn(3 * HUGE_PAGE // 4 + 1000)  # 3 MiB and a bit: one whole 2 MiB page inside at least
    expected = tensor.clone()
    start = tensor.data_ptr()
    assert _huge_bytes(start, start + tensor.nbytes) == 0
    moved = back_with_huge_pages([tensor, tensor[10:]])  # the same storage twice: moved once
    assert moved >= HUGE_PAGE and moved % HUGE_PAGE == 0
    assert _huge_bytes(start, start + tensor.nbytes) >= moved
    assert torch.equal(tensor, expected)
    assert back_with_huge_pages([torch.randn(1000)]) == 0  # no whole huge page inside
    if torch.backends.mkldnn.is_available():  # opaque oneDNN tensors (inductor's packed weights, one thread)
        assert back_with_huge_pages([torch.randn(1024, 1024).to_mkldnn()]) == 0


def test_compiled_step_weights_move_to_huge_pages(tiny_args):
    """A 32000-word vocabulary makes the output layer 8 MiB: compiling the step puts its frozen copy on huge
    pages, and decoding gives the eager tokens."""
    model = build_model(tiny_args(vocab_size=32000, n_layers=1), seed=4).eval()
    prompts = PROMPTS  # three rows, as in the other compiled tests: inductor autotunes each product shape once
    reference = generate_tokens(model, prompts, max_new_tokens=8)
    before = _process_huge_bytes()
    assert generate_tokens(accelerate(model, compile=True), prompts, max_new_tokens=8) == reference
    assert _process_huge_bytes() - before >= 3 * HUGE_PAGE  # output layer (packed) and more


def test_decoder_cache_is_one_block_on_huge_pages(tiny_args):
    """Every layer's keys and values are views of one block (4 MiB here, each layer's part under 2 MiB), the block
    sits on huge pages, and a prefill through it gives the model's own logits."""
    model = build_model(tiny_args(), seed=5).eval()
    decoder = Decoder(model, batch_size=64, cache_len=128)
    storages = {buf.untyped_storage().data_ptr() for cache in decoder.caches for buf in (cache.k, cache.v)}
    assert len(storages) == 1
    block = decoder.caches[0].k.untyped_storage()
    assert decoder.caches[0].k.nbytes < HUGE_PAGE <= block.nbytes() // 2
    assert _huge_bytes(block.data_ptr(), block.data_ptr() + block.nbytes()) >= HUGE_PAGE
    prompts = torch.randint(0, model.args.vocab_size, (64, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cached = decoder.prefill(prompts.tolist())
        direct = model(prompts)[:, -1].float()
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)
