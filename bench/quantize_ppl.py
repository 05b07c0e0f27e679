"""Accuracy cost of the fast paths: held-out perplexity in fp32, bf16 and int8 weight-only quantization.

Default: llama2.c's pretrained ``stories260K`` (imported from ../shared/data/weights) on the TinyStories
validation head (../shared/data/corpus/tinystories_valid_head.txt). ``--checkpoint`` takes any native folder
with a tokenizer, ``--text`` any UTF-8 file. The text is split at blank lines, each paragraph tokenized with
BOS, concatenated, and cut into non-overlapping windows of ``--seq-len`` tokens; perplexity is
exp(mean next-token NLL) over all predicted tokens.

Run: .venv/bin/python bench/quantize_ppl.py [--max-tokens 200000]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

import llamalab
from llamalab.inference.quantize import quantize_int8

SHARED = Path(os.environ.get("LLAMALAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        logits = model(x[:, :-1]).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="native folder (default: stories260K from shared data)")
    p.add_argument("--text", default=str(SHARED / "corpus" / "tinystories_valid_head.txt"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=200_000)
    opts = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = opts.checkpoint
        if folder is None:
            from llamalab.convert.llama2c import import_llama2c

            weights = SHARED / "weights" / "stories260K"
            folder = import_llama2c(weights / "stories260K.bin", Path(tmp) / "stories260K", tokenizer=weights / "tok512.bin")
        base = llamalab.load(folder, dtype="fp32")
        tok = base.tokenizer
        ids: list[int] = []
        for para in Path(opts.text).read_text(encoding="utf-8").split("\n\n"):
            if para.strip():
                ids += tok.encode(para.strip(), bos=True)
            if len(ids) >= opts.max_tokens:
                break
        seq = min(opts.seq_len, base.args.max_seq_len)
        n = len(ids) // (seq + 1)
        windows = torch.tensor(ids[: n * (seq + 1)]).view(n, seq + 1)
        print(f"{folder}: {n} windows of {seq} tokens ({n * seq} predicted) from {opts.text}")
        results = {}
        for name in ("fp32", "bf16", "int8 (fp32 activations)", "int8 (bf16 activations)"):
            dtype = "bf16" if "bf16" in name else "fp32"
            model = llamalab.load(folder, dtype=dtype).model
            if name.startswith("int8"):
                quantize_int8(model)
            results[name] = perplexity(model, windows)
            delta = results[name] / results["fp32"] - 1
            print(f"{name:<26} perplexity {results[name]:.4f}  ({delta:+.2%} vs fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
