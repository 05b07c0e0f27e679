"""Data pipeline throughput: preparation (MB of raw input per second, 2 workers) and MixtureLoader tokens/s,
against what training the `small` preset consumes (the loader must be >= 50x faster).

    .venv/bin/python bench/data.py            # prepare configs/data/raw.toml (all of ../shared/data/raw)
    .venv/bin/python bench/data.py --quick    # one source, fewer loader batches
    .venv/bin/python bench/data.py --measure-train   # time small-preset training steps instead of assuming

Preparation uses Meta's tokenizer from ../shared (no tokenizer training), so the number is read + clean +
dedup + tokenize + write; its per-stage split comes from the manifest. Training consumption defaults to 800
tokens/s, what bf16 autocast + torch.compile reached for `small` (4x1024 tokens per step) on the 2-core
reference machine; ``--measure-train`` measures bf16-autocast eager forward+backward+AdamW steps here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "data" / "raw.toml"


def input_bytes(recipe) -> int:
    from llamalab.data.readers import expand_paths

    return sum(p.stat().st_size for s in recipe.sources for p in expand_paths(s.paths))


def bench_prepare(recipe_path: Path, out: Path, workers: int) -> tuple[float, dict]:
    from llamalab.data.prepare import load_manifest, load_recipe, prepare

    size = input_bytes(load_recipe(recipe_path))
    t = time.perf_counter()
    prepare(recipe_path, out, workers=workers, force=True)
    seconds = time.perf_counter() - t
    manifest = load_manifest(out)
    print(f"prepare: {size / 1e6:.2f} MB raw input in {seconds:.1f} s with {workers} workers = "
          f"{size / 1e6 / seconds:.2f} MB/s  (stages: {manifest['timing']}); "
          f"{manifest['totals']['train_tokens']:,} train tokens")
    return size / 1e6 / seconds, manifest


def bench_loader(folder: Path, batch_size: int, seq_len: int, batches: int, repeats: int) -> float:
    from llamalab.data.loader import MixtureLoader

    rates = []
    for r in range(repeats):
        loader = MixtureLoader(folder, batch_size=batch_size, seq_len=seq_len, seed=r)
        next(loader)  # first epoch permutations
        t = time.perf_counter()
        for _ in range(batches):
            next(loader)
        rates.append(batches * batch_size * seq_len / (time.perf_counter() - t))
    rate = statistics.median(rates)
    print(f"loader: {batch_size}x{seq_len} batches, median of {repeats}: {rate:,.0f} tokens/s")
    return rate


def measure_train(batch_size: int, seq_len: int, steps: int) -> float:
    import torch

    from llamalab.model import build_model
    from llamalab.model.args import preset_args

    torch.manual_seed(0)
    args = preset_args("small")
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, args.vocab_size, (batch_size, seq_len + 1))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    rate = batch_size * seq_len / statistics.median(times[1:])
    print(f"train (small, bf16 autocast eager, {batch_size}x{seq_len}): {rate:,.0f} tokens/s")
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one source, few batches")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-tokens-per-s", type=float, default=800.0)
    parser.add_argument("--measure-train", action="store_true")
    args = parser.parse_args(argv)
    if not args.recipe.exists():
        print(f"recipe missing: {args.recipe}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="llamalab-bench-data-") as tmp:
        recipe = args.recipe
        if args.quick:  # only the Wikipedia source of the recipe
            from llamalab.data.prepare import load_recipe

            full = load_recipe(args.recipe)
            wiki = next(s for s in full.sources if s.name == "wikipedia")
            recipe = Path(tmp) / "quick.toml"
            recipe.write_text(
                f'name = "quick"\n[tokenizer]\npath = "{full.tokenizer.path}"\n[dedup]\nexact = true\n'
                f'[[sources]]\nname = "wikipedia"\npaths = {wiki.paths!r}\nformat = "jsonl"\n'
                f'cleaner = "wikipedia"\nproportion = 1.0\n'.replace("'", '"'))
        out = Path(tmp) / "prepared"
        mb_per_s, _ = bench_prepare(recipe, out, args.workers)
        loader_rate = bench_loader(out, batch_size=4, seq_len=1024, batches=50 if args.quick else 500,
                                   repeats=3 if args.quick else 5)
    train_rate = measure_train(4, 1024, 2 if args.quick else 4) if args.measure_train else args.train_tokens_per_s
    ratio = loader_rate / train_rate
    print(f"loader / training consumption (small preset, {train_rate:,.0f} tokens/s): {ratio:,.0f}x "
          f"({'OK' if ratio >= 50 else 'BELOW'} the 50x requirement); preparation {mb_per_s:.2f} MB/s "
          f"on {os.cpu_count()} CPUs")
    return 0 if ratio >= 50 else 1


if __name__ == "__main__":
    raise SystemExit(main())
