"""Tiny Shakespeare in the same wall time: llamalab's ``configs/shakespeare.toml`` (its model sized from the time
budget by the scaling law) against nanoGPT's ``train_shakespeare_char.py`` on the same machine, alternately; the
validation loss per character of each and the ratio (the issue's goal: llamalab <= 0.90x nanoGPT).

Run:   .venv/bin/python bench/shakespeare_nanogpt.py                       (5 minutes of training each)
Smoke: .venv/bin/python bench/shakespeare_nanogpt.py --minutes 0.5
CPU-sized nanoGPT (its README's MacBook settings) as another baseline:
       .venv/bin/python bench/shakespeare_nanogpt.py --nanogpt-set block_size=64 --nanogpt-set batch_size=12 \\
           --nanogpt-set n_layer=4 --nanogpt-set n_head=4 --nanogpt-set n_embd=128 --nanogpt-set dropout=0.0

nanoGPT is not part of llamalab and none of its code is copied here: ``--nanogpt`` names a checkout, or a bare git
directory that is checked out into a temporary folder (default: the read-only mirror
/work/.mirror/karpathy+nanoGPT/repo). Its scripts run there as they are: ``data/shakespeare_char/prepare.py`` on
the same Tiny Shakespeare file ``configs/data/shakespeare.toml`` prepares (read from the prepared manifest; no
download), then ``train.py config/train_shakespeare_char.py --device=cpu --compile=False --dtype=float32``
(on a CPU nanoGPT never autocasts, whatever ``dtype`` says: it trains in fp32; llamalab trains in the config's
``precision.mode``, bf16 where the CPU has native bf16 units, unless ``--precision fp32``). Its schedule is
stretched to the wall time: a calibration run of three iterations gives the seconds per iteration, then
``max_iters`` = ``lr_decay_iters`` = the minutes / that, and ``warmup_iters`` keeps its share of the schedule
(100 of 5,000); a run whose training time misses the minutes by more than 10% (or one iteration) is run again
with its own seconds per iteration, at most twice more. It evaluates at its last iteration only (``eval_interval`` = ``max_iters``, ``eval_iters`` = 1, a
checkpoint written there); its training time is the sum of its logged iteration times up to that checkpoint.

Both are scored on the same held-out characters: the last 10% of the text (nanoGPT's ``val.bin`` splits at
int(0.9 n), llamalab's ``split = "tail"`` at the same character; llamalab's reader drops the file's final newline,
so the held-out text is 111,539 characters, checked here by decoding llamalab's validation tokens). llamalab's
value is the final validation ``loss_per_byte`` of its metrics (nats per byte = per character, the text is ASCII)
over every held-out window (``data.val_batches`` raised to cover them all: windows of 128 tokens, each token
predicted once; the last partial window, under 128 tokens, is left out). nanoGPT's is computed here from its
checkpoint with its own ``model.py``: every held-out character predicted once, in windows of ``block_size``
characters (its own ``estimate_loss`` averages random windows instead). llamalab's ``max_minutes`` counts
training time only; the few seconds it spends measuring throughput to size the model come out of it.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shakespeare.toml"
NANOGPT_MIRROR = "/work/.mirror/karpathy+nanoGPT/repo"
NANOGPT_CONFIG = "config/train_shakespeare_char.py"
ITER_LINE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)

# run inside the nanoGPT checkout: its model scores its checkpoint on the held-out characters, each once
NANOGPT_EVAL = """
import json, sys
import numpy as np, torch
from model import GPT, GPTConfig
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)  # written by the run just made
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
ids = torch.from_numpy(np.fromfile(sys.argv[2], dtype=np.uint16)[: int(sys.argv[3])].astype(np.int64))
block = model.config.block_size
starts = range(0, len(ids) - 1, block)  # windows of block + 1 characters, block apart: each predicted once
windows = [ids[s:s + block + 1] for s in starts]
total, count = 0.0, 0
with torch.no_grad():
    for rows in [windows[i:i + 16] for i in range(0, len(windows), 16)]:
        groups = [torch.stack([w for w in rows if len(w) == n]) for n in sorted({len(w) for w in rows})]
        for batch in groups:
            logits, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            total += float(loss) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
print(json.dumps({"nats_per_char": total / count, "chars_scored": count, "iter_num": ckpt["iter_num"],
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def run(command: list[str], cwd: Path, log: Path) -> tuple[str, float]:
    """(stdout + stderr, wall seconds); a failure stops the benchmark with the log's tail."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout)
    if proc.returncode:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        shown = " ".join(str(c) if len(str(c)) < 100 else "..." for c in command)
        sys.exit(f"{shown} failed (exit {proc.returncode}); {log}:\n{tail}")
    return proc.stdout, wall


def nanogpt_checkout(source: str, work: Path) -> Path:
    """A writable copy of nanoGPT in ``work``: a bare git directory checked out, or a checkout copied."""
    src, dest = Path(source), work / "nanoGPT"
    if (src / "train.py").is_file():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "out*"))
    elif (src / "HEAD").is_file() and (src / "objects").is_dir():
        dest.mkdir()
        subprocess.run(["git", f"--git-dir={src}", f"--work-tree={dest}", "checkout", "-f", "HEAD"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        sys.exit(f"--nanogpt {src}: neither a nanoGPT checkout (train.py) nor a bare git directory")
    for name in ("train.py", "model.py", NANOGPT_CONFIG, "data/shakespeare_char/prepare.py"):
        if not (dest / name).is_file():
            sys.exit(f"--nanogpt {src}: no {name}; is it nanoGPT?")
    return dest


def config_values(path: Path) -> dict:
    """The constant assignments of a nanoGPT config file (read, not executed)."""
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = node.value.value
    return values


def held_out(prepared: Path, text: str) -> tuple[int, int]:
    """(first character, characters) of llamalab's held-out text in ``text``, checked by decoding its tokens;
    it must start where nanoGPT's val.bin does."""
    from llamalab.data.loader import PreparedData
    from llamalab.tokenizer import Tokenizer

    stream = PreparedData(prepared).stream("shakespeare", "validation")
    decoded = Tokenizer(prepared / "tokenizer.model").decode([int(i) for i in stream.read(0, stream.num_tokens)])
    start = int(len(text) * 0.9)  # nanoGPT's prepare.py
    if text[start:start + len(decoded)] != decoded:
        sys.exit(f"llamalab's held-out text is not text[{start:,}:...] as nanoGPT's is; the comparison would be "
                 "on different characters")
    return start, len(decoded)


def ours(args, work: Path, round_: int, train_tokens: int) -> dict:
    out = work / f"llamalab-{round_}"
    command = [sys.executable, "-m", "llamalab", "train", str(CONFIG), "--run.out_dir", str(out),
               "--length.max_minutes", repr(args.minutes), "--data.val_batches", "1000000",
               "--logging.val_every", "0", "--logging.progress", "false", "--logging.tensorboard", "false",
               "--logging.plot", "false", "--checkpoint.every", "0", "--checkpoint.save_final", "false"]
    if args.precision:
        command += ["--precision.mode", args.precision]
    output, wall = run(command, REPO, work / f"llamalab-{round_}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"][-1]
    trained = re.search(r"trained (\d+) steps, ([\d,]+) tokens in (\d+) s", output)
    chose = re.search(r"chose (\S+): .*?, ([\d,]+) parameters", output)
    measured = re.search(r"measured training throughput for ([\d.]+) s", output)
    config = json.loads((out / "config.json").read_text())
    for line in output.splitlines():
        if line.lstrip().startswith(("chose", "note:", "measured", "data-limited", "validation loss")):
            print(f"    llamalab: {line.strip()[:220]}")
    seen = int(trained.group(2).replace(",", ""))
    return {"name": "llamalab", "model": chose.group(1) if chose else "d{dim}l{n_layers}h{n_heads}".format(
                **config["model"]),
            "params": chose.group(2) if chose else "?", "train_s": float(trained.group(3)),
            "measure_s": float(measured.group(1)) if measured else 0.0, "wall_s": wall, "seen": seen,
            "unit": "tokens", "epochs": seen / train_tokens, "nats_per_char": val["loss_per_byte"],
            "precision": re.search(r"precision (\w+)", output).group(1)}


def nanogpt(args, work: Path, checkout: Path, round_: int, val_chars: int) -> dict:
    defaults = config_values(checkout / NANOGPT_CONFIG)
    common = [sys.executable, "train.py", NANOGPT_CONFIG, "--device=cpu", "--compile=False", "--dtype=float32",
              "--log_interval=1", "--eval_iters=1", "--wandb_log=False", *[f"--{kv}" for kv in args.nanogpt_set]]
    # calibration: three iterations; the later two (no evaluation, warmed up) give the seconds per iteration
    output, _ = run([*common, f"--out_dir={work / f'nanogpt-cal-{round_}'}", "--max_iters=2", "--lr_decay_iters=2",
                     "--warmup_iters=0", "--eval_interval=1000000000", "--always_save_checkpoint=False"],
                    checkout, work / f"nanogpt-cal-{round_}.log")
    per_iter = statistics.mean(float(ms) / 1000 for i, _, ms in ITER_LINE.findall(output) if int(i) > 0)
    budget = args.minutes * 60
    out = work / f"nanogpt-{round_}"
    for attempt in range(3):  # a run that missed the wall time by more than 10% (or an iteration) runs again
        iters = max(1, round(budget / per_iter))
        warmup = round(defaults.get("warmup_iters", 100) * iters / defaults.get("max_iters", 5000))
        print(f"    nanoGPT: {per_iter:.2f} s/iteration; stretched to max_iters = lr_decay_iters = {iters}, "
              f"warmup_iters = {warmup}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        output, wall = run([*common, f"--out_dir={out}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                            f"--warmup_iters={warmup}", f"--eval_interval={iters}", "--always_save_checkpoint=True"],
                           checkout, work / f"nanogpt-{round_}.log")
        times = {int(i): float(ms) / 1000 for i, _, ms in ITER_LINE.findall(output)}
        train_s = sum(t for i, t in times.items() if i < iters)  # the updates the checkpoint holds
        steady = [t for i, t in times.items() if 0 < i < iters]  # no evaluation in them
        if abs(train_s - budget) <= max(0.1 * budget, per_iter) or not steady or attempt == 2:
            break
        per_iter = statistics.mean(steady)  # the mean: a busy machine's slow iterations count too
        print(f"    nanoGPT: trained {train_s:.1f} s, not {budget:.0f} s; again", flush=True)
    scored, _ = run([sys.executable, "-c", NANOGPT_EVAL, str(out / "ckpt.pt"),
                     str(checkout / "data" / "shakespeare_char" / "val.bin"), str(val_chars)],
                    checkout, work / f"nanogpt-eval-{round_}.log")
    result = json.loads(scored.strip().splitlines()[-1])
    if result["iter_num"] != iters:
        sys.exit(f"nanoGPT's checkpoint is of iteration {result['iter_num']}, not {iters}")
    batch = int(_setting(args, "batch_size", defaults.get("batch_size", 12)))
    block = int(_setting(args, "block_size", defaults.get("block_size", 1024)))
    train_chars = (checkout / "data" / "shakespeare_char" / "train.bin").stat().st_size // 2
    shape = (f"{_setting(args, 'n_layer', defaults.get('n_layer'))}x{_setting(args, 'n_embd', defaults.get('n_embd'))}"
             f" ({iters} it)")
    return {"name": "nanoGPT", "model": shape, "params": f"{result['params']:,}", "train_s": train_s,
            "measure_s": 0.0, "wall_s": wall, "seen": iters * batch * block, "unit": "chars",
            "epochs": iters * batch * block / train_chars, "nats_per_char": result["nats_per_char"],
            "precision": "fp32"}


def _setting(args, key: str, default):
    for kv in args.nanogpt_set:
        name, _, value = kv.partition("=")
        if name == key:
            return value
    return default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall time of each (default 5)")
    parser.add_argument("--nanogpt", default=NANOGPT_MIRROR, help="nanoGPT checkout or bare git directory")
    parser.add_argument("--rounds", type=int, default=1, help="llamalab then nanoGPT, this many times")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                        help="llamalab's precision.mode (default: the config's)")
    parser.add_argument("--nanogpt-set", action="append", default=[], metavar="KEY=VALUE",
                        help="another nanoGPT setting (its --KEY=VALUE), e.g. n_layer=4")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    from llamalab.config import load_config
    from llamalab.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="shakespeare-nanogpt-"))
    try:
        recipe = load_config(CONFIG).data.recipe
        prepared = Path(prepare(str(REPO / recipe) if not Path(recipe).is_absolute() else recipe))
        manifest = json.loads((prepared / "manifest.json").read_text())
        text_path = Path(manifest["sources"]["shakespeare"]["paths"][0])
        text = text_path.read_text()
        checkout = nanogpt_checkout(args.nanogpt, work)
        shutil.copyfile(text_path, checkout / "data" / "shakespeare_char" / "input.txt")
        run([sys.executable, "data/shakespeare_char/prepare.py"], checkout, work / "nanogpt-prepare.log")
        start, chars = held_out(prepared, text)
        print(f"Tiny Shakespeare ({text_path}, {len(text):,} characters); {args.minutes:g} minutes of training "
              f"each, alternately, {args.rounds} round(s); work folder {work}")
        print(f"held-out: the same {chars:,} characters for both, text[{start:,}:{start + chars:,}] (nanoGPT's "
              f"val.bin is text[{start:,}:], {len(text) - start - chars} more at the end, left out)")
        results = []
        for r in range(1, args.rounds + 1):
            print(f"round {r}: llamalab train {CONFIG.relative_to(REPO)} ...", flush=True)
            results.append(ours(args, work, r, manifest["totals"]["train_tokens"]))
            print(f"round {r}: nanoGPT train.py {NANOGPT_CONFIG} ...", flush=True)
            results.append(nanogpt(args, work, checkout, r, chars))
        print()
        print(f"{'':10}{'model':>22}{'params':>12}{'prec':>6}{'train s':>9}{'+measure':>9}{'wall s':>8}"
              f"{'seen':>19}{'epochs':>8}{'val nats/char':>15}")
        for res in results:
            epochs = f"{res['epochs']:.2f}" if res["epochs"] is not None else "-"
            print(f"{res['name']:10}{res['model']:>22}{res['params']:>12}{res['precision']:>6}{res['train_s']:>9.1f}"
                  f"{res['measure_s']:>9.1f}{res['wall_s']:>8.0f}{res['seen']:>13,} {res['unit']:<5}{epochs:>8}"
                  f"{res['nats_per_char']:>15.4f}")
        ours_loss = [r["nats_per_char"] for r in results if r["name"] == "llamalab"]
        theirs = [r["nats_per_char"] for r in results if r["name"] == "nanoGPT"]
        ratio = sorted(ours_loss)[len(ours_loss) // 2] / sorted(theirs)[len(theirs) // 2]
        print(f"validation loss per character, llamalab / nanoGPT (medians): {ratio:.3f} (goal: <= 0.90)")
        for res in results:
            spent = res["train_s"] + res["measure_s"]
            if abs(spent - args.minutes * 60) > 0.2 * args.minutes * 60:
                print(f"warning: {res['name']} trained {spent:.0f} s, not {args.minutes * 60:.0f} s (the machine's "
                      "load changed between its calibration and its run); the comparison is not at equal time: "
                      "run it again on a quieter machine, or with --rounds 3")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
