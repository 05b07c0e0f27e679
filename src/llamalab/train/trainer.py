"""Pretraining loop: the paper's recipe with exact resume, metrics and a timed mode.

``train(cfg)`` runs one process or, under ``torchrun``, one rank (RANK / WORLD_SIZE / LOCAL_RANK from the
environment). Each optimizer step takes ``grad_accum`` micro-batches of ``batch.micro_batch`` sequences per
data-parallel rank, so a step always sees ``batch.global_tokens`` tokens whatever the layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..fs import atomic_write_bytes, check_output_folder
from ..hardware import fast_bf16, measure_peak_flops
from ..model import ModelArgs, build_model
from ..parallel.activation_checkpoint import apply_activation_checkpointing
from . import checkpoint as ckpt
from .metrics import MetricsLog, plot_loss_curve, training_flops_per_token
from .optim import Schedule, build_optimizer


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None = None
    val_bpb: float | None = None
    val_loss_per_byte: float | None = None
    tokens_per_s: float = 0.0  # this session's average, the first step's compile and warm-up included
    mfu: float = 0.0
    steady_tokens_per_s: float | None = None  # after this session's first step (None: it ran only one)
    steady_mfu: float | None = None
    peak_flops: float = 0.0
    skipped_steps: int = 0
    train_seconds: float = 0.0
    plot: Path | None = None
    final_dir: Path | None = None
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """Read torchrun's environment; start a process group only when there are several ranks."""
    world = Distributed(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    if world.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return world


def resolve_device(name: str, world: Distributed | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{world.local_rank if world else 0}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(cfg: Config, device: torch.device) -> None:
    """Turn ``precision.mode = "auto"`` into bf16 or fp32 for this device (in place)."""
    if cfg.precision.mode == "auto":
        cfg.precision.mode = "bf16" if fast_bf16(device) else "fp32"


def autocast_context(cfg: Config, device: torch.device):
    if cfg.precision.mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, accumulated in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def prepare_data(cfg: Config, world: Distributed) -> Path:
    """The prepared folder of ``[data]``: ``prepared`` as is, or the ``recipe`` (default: the built-in corpus)
    prepared by rank 0 first -- a no-op when it is already up to date."""
    if cfg.data.recipe and not Path(cfg.data.recipe).is_file():
        raise ConfigError(f"data.recipe: {cfg.data.recipe}: no such recipe file")
    if cfg.data.prepared and not cfg.data.recipe:
        folder = Path(cfg.data.prepared)
        if not (folder / "manifest.json").is_file():
            why = "does not exist" if not folder.exists() else "is not a prepared data folder (no manifest.json)"
            raise ConfigError(f"data.prepared: {folder} {why}; write one with `llamalab data prepare RECIPE "
                              f"--output {folder}` or set data.recipe")
        return folder
    from ..data.prepare import prepare

    folder = None
    if world.is_main:
        folder = Path(prepare(cfg.data.recipe or None, output=cfg.data.prepared or None))
    if world.world_size > 1:
        shared = [str(folder) if world.is_main else None]
        dist.broadcast_object_list(shared, src=0)
        folder = Path(shared[0])
    return folder


def batch_layout(cfg: Config, seq_len: int, world: Distributed) -> tuple[int, int, int]:
    """(data-parallel degree, gradient-accumulation steps, tokens per optimizer step)."""
    from ..parallel.mesh import ParallelDims

    dp = ParallelDims.from_config(cfg.parallel, world.world_size).dp
    per_micro = cfg.batch.micro_batch * seq_len * dp
    accum = max(1, round(cfg.batch.global_tokens / per_micro))
    return dp, accum, accum * per_micro


def total_steps(cfg: Config, tokens_per_step: int) -> int:
    if cfg.length.steps:
        return cfg.length.steps
    if cfg.length.tokens:
        return max(1, math.ceil(cfg.length.tokens / tokens_per_step))
    return 10**12  # time-bounded only


def parallelize(model, cfg: Config, dims, mesh, device: torch.device):
    """Apply the ``[parallel]`` layout (``llamalab.parallel``) to the fully initialised model; one process keeps
    the model as it is. Returns the ``ParallelRun`` the loop trains through."""
    from ..parallel.runtime import ParallelRun

    return ParallelRun.setup(model, dims, mesh, device=device, loss_fn=cross_entropy_loss,
                             autocast=lambda: autocast_context(cfg, device),
                             ac_mode=cfg.activation_checkpoint.mode, compile=cfg.compile.enabled,
                             precision=cfg.precision.mode, pp_schedule=cfg.parallel.pp_schedule,
                             pp_microbatches=cfg.parallel.pp_microbatches, seed=cfg.run.seed)


@torch.no_grad()
def evaluate(model, validation, cfg: Config, device: torch.device, run=None) -> dict:
    """Mean loss over the held-out batches; bits per byte and nats per byte from the set's bytes per token.

    Under a parallel layout ``run`` (a ``ParallelRun``) computes each batch's loss sum.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in validation.batches():
        batch = batch.to(device, non_blocking=True)
        if run is not None and run.mesh is not None:
            batch_total, batch_count = run.eval_loss_sum(batch)
            total, count = total + batch_total, count + batch_count
            continue
        with autocast_context(cfg, device):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    stats = torch.tensor([total, count], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats)
    model.train(was_training)
    loss = (stats[0] / stats[1]).item()
    per_byte = loss / validation.bytes_per_token
    return {"loss": loss, "bpb": per_byte / math.log(2), "loss_per_byte": per_byte}


RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard", "checkpoints", "final", "loss.png", ".*.tmp-*",
             ".*.old-*")  # all a run folder holds, with the temporary names of its atomic writes


def clear_previous_run(out_dir: Path, world: Distributed) -> None:
    """A fresh start in a used ``out_dir``: drop the old run's metrics, events and checkpoints, so the plot and
    ``--resume auto`` never mix two runs (and the old, higher-numbered checkpoints are not kept over new ones)."""
    import shutil

    old = [p for p in (out_dir / "metrics.jsonl", out_dir / "tensorboard", out_dir / "checkpoints") if p.exists()]
    if old:
        _log(f"starting from scratch in {out_dir}: removing the previous run's "
             + ", ".join(p.name for p in old) + " (use --resume auto to continue it instead)", world)
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def restore(cfg: Config, ckpt_root: Path, model, optimizer, args: ModelArgs, world: Distributed):
    """(trainer state, loader state, folder) of the checkpoint ``checkpoint.resume`` names, or None to start fresh.

    ``auto`` takes the newest checkpoint that verifies and loads; it starts fresh only when there is none at
    all: checkpoints that are all unusable are an error naming each one and why, never a silent restart.
    """
    if cfg.checkpoint.resume != "auto":
        folder = Path(cfg.checkpoint.resume)
        if not folder.is_dir():
            raise ckpt.CheckpointError(f"--resume {folder}: no such checkpoint folder")
        return _load(folder, model, optimizer, args, world) + (folder,)
    found = ckpt.list_checkpoints(ckpt_root)
    if not found:
        _log(f"--resume auto: no checkpoint under {ckpt_root}: starting fresh", world)
        return None
    failures = []
    for _, folder in found:
        try:
            restored = _load(folder, model, optimizer, args, world) + (folder,)
        except ckpt.CheckpointError as exc:
            failures.append(str(exc))
            _log(f"skipping checkpoint {folder.name}: {exc}", world)
            continue
        return restored
    raise ckpt.CheckpointError(f"--resume auto: none of the {len(found)} checkpoints under {ckpt_root} can be "
                               f"resumed: {'; '.join(failures)}. Fix or move them away, or train into a new "
                               "run.out_dir")


def _load(folder: Path, model, optimizer, args: ModelArgs, world: Distributed) -> tuple[dict, dict | None]:
    ckpt.check_model_args(folder, args.to_dict())
    try:
        return ckpt.load_checkpoint(folder, model, optimizer, rank=world.rank)
    except ckpt.CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{folder}: cannot be loaded into this model and optimizer ({exc})") from exc


def _log(msg: str, world: Distributed) -> None:
    if world.is_main:
        print(msg, file=sys.stderr, flush=True)


def train(cfg: Config, *, on_step=None) -> TrainResult:
    """Train as ``cfg`` says; returns a summary. ``on_step(step, record)`` is called after every step."""
    requested = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    world = init_distributed(torch.device(requested).type)
    device = resolve_device(cfg.run.device, world)
    out_dir = Path(cfg.run.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if world.is_main:
        check_output_folder(out_dir, RUN_FILES, "run folder", hint="choose another run.out_dir")
    resolve_precision(cfg, device)
    seed_everything(cfg.run.seed)

    from ..data.loader import MixtureLoader, ValidationSet

    data_dir = prepare_data(cfg, world)
    tokenizer_path = data_dir / "tokenizer.model"
    vocab = None
    if tokenizer_path.is_file():
        from ..tokenizer import Tokenizer

        vocab = Tokenizer(tokenizer_path).vocab_size
    else:
        vocab = json.loads((data_dir / "manifest.json").read_text()).get("vocab_size")
    args: ModelArgs = cfg.model_args(vocab_size=vocab)
    seq_len = cfg.data.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len: {seq_len} is longer than model.max_seq_len {args.max_seq_len}")
    dp, accum, step_tokens = batch_layout(cfg, seq_len, world)
    n_steps = total_steps(cfg, step_tokens)
    from ..parallel.mesh import ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world.world_size)
    mesh = dims.build_mesh(device.type) if world.world_size > 1 else None
    dp_rank = dims.dp_rank()

    loader = MixtureLoader(data_dir, split="train", batch_size=cfg.batch.micro_batch, seq_len=seq_len,
                           seed=cfg.run.seed, rank=dp_rank, world_size=dp)
    validation = None
    if cfg.data.val_batches:
        try:
            validation = ValidationSet(data_dir, seq_len, cfg.batch.micro_batch, max_batches=cfg.data.val_batches,
                                       rank=dp_rank, world_size=dp)
        except ValueError as exc:
            _log(f"no validation: {exc}", world)

    if world.world_size > 1:  # shapes only; parallelize shards them, then rank 0's seeded weights fill the shards
        model = build_model(args, device="meta", init=False)
    else:
        model = build_model(args, device=device, seed=cfg.run.seed)
    run = parallelize(model, cfg, dims, mesh, device)
    model = run.module  # plain names over this rank's shards/stages: optimizer, checkpoints, clipping
    if world.world_size == 1:
        apply_activation_checkpointing(model, cfg.activation_checkpoint.mode)
        if cfg.compile.enabled:
            model.compile()
    optimizer = build_optimizer(model, cfg.optimizer)
    schedule = Schedule(cfg.optimizer.lr, cfg.schedule, n_steps)

    step, tokens, skipped, elapsed_before = 0, 0, 0, 0.0
    last_ckpt: Path | None = None
    restored = restore(cfg, ckpt_root, model, optimizer, args, world) if cfg.checkpoint.resume else None
    if restored is not None:
        state, loader_state, last_ckpt = restored
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        step, tokens = state["step"], state["tokens"]
        schedule.load_state_dict(state.get("schedule", {}))
        skipped, elapsed_before = state.get("skipped_steps", 0), state.get("train_seconds", 0.0)
        _log(f"resumed from {last_ckpt} (step {step}, {tokens:,} tokens)", world)

    start_tokens, start_step = tokens, step
    flops_per_token = training_flops_per_token(args, seq_len)
    if cfg.logging.peak_tflops:
        peak = cfg.logging.peak_tflops * 1e12
    else:
        peak = measure_peak_flops(torch.bfloat16 if cfg.precision.mode == "bf16" else torch.float32, device)

    def mfu_at(tokens_per_second: float) -> float:
        return tokens_per_second * flops_per_token / (peak * world.world_size)

    if not cfg.checkpoint.resume and world.is_main:
        clear_previous_run(out_dir, world)
    log = MetricsLog(out_dir, cfg.logging.tensorboard, enabled=world.is_main, resume_step=step,
                     warn=lambda m: _log(m, world))
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        _log(f"model {cfg.model.preset}: {args.num_params() / 1e6:.2f}M parameters, vocab {args.vocab_size}; "
             f"{step_tokens:,} tokens/step = {cfg.batch.micro_batch} seq x {seq_len} x {accum} accum x {dp} dp; "
             f"{'time-bounded' if n_steps >= 10**12 else f'{n_steps} steps'}; precision {cfg.precision.mode}; "
             f"activation checkpointing {cfg.activation_checkpoint.mode}; compile {cfg.compile.enabled}; "
             f"peak {peak / 1e12:.3f} TFLOP/s", world)

    def trainer_state() -> dict:
        return {"step": step, "tokens": tokens, "skipped_steps": skipped, "train_seconds": train_seconds(),
                "schedule": schedule.state_dict(), "config": cfg.to_dict(), "model_args": args.to_dict()}

    def save() -> Path:
        return ckpt.save_checkpoint(ckpt_root, step, model, optimizer, trainer_state(), loader.state_dict(),
                                    rank=world.rank, keep=cfg.checkpoint.keep)

    time_budget = cfg.length.max_minutes * 60.0
    run_start = time.perf_counter()
    paused = 0.0  # validation and checkpoint time, not counted as training time

    def train_seconds() -> float:
        return elapsed_before + time.perf_counter() - run_start - paused

    bar = None
    if cfg.logging.progress and world.is_main:
        from tqdm import tqdm

        bar = tqdm(total=None if n_steps >= 10**12 else n_steps, initial=step, unit="step", dynamic_ncols=True,
                   file=sys.stderr)

    model.train()
    losses: list[float] = []
    window_tokens, window_start = 0, time.perf_counter()
    tokens_per_s = mfu = 0.0
    bad_in_row = 0
    val_stats: dict | None = None
    loss_value: float | None = None
    try:
        while step < n_steps:
            if time_budget and train_seconds() >= time_budget:
                _log(f"time budget of {cfg.length.max_minutes} min reached at step {step}", world)
                break
            time_fraction = min(1.0, train_seconds() / time_budget) if time_budget else None
            lr = schedule.apply(optimizer, step, time_fraction)
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                batch = next(loader).to(device, non_blocking=True)
                loss_sum += run.forward_backward(batch, accum)
            loss_sum = run.mean_over_ranks(loss_sum / accum)
            grad_norm = run.clip_grad_norm(cfg.optimizer.grad_clip)
            loss_value, norm_value = loss_sum.item(), float(grad_norm)
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                skipped += 1
                bad_in_row += 1
                _log(f"step {step + 1}: non-finite loss or gradient (loss {loss_value}, grad norm {norm_value}); "
                     f"update skipped ({bad_in_row} in a row, {skipped} in total)", world)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            window_tokens += step_tokens
            losses.append(loss_value)
            if step == start_step + 1:
                first_step_end = train_seconds()

            record = {"split": "train", "step": step, "tokens": tokens, "loss": loss_value if finite else None,
                      "lr": lr, "grad_norm": norm_value if finite else None, "skipped_steps": skipped}
            if step % cfg.logging.every == 0 or step == n_steps:
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                mfu = mfu_at(tokens_per_s)
                record.update(tokens_per_s=tokens_per_s, mfu=mfu, train_seconds=train_seconds())
                log.log(record)
                window_tokens, window_start = 0, now
            if bar is not None:
                if time_budget and n_steps >= 10**12:  # timed run: the ETA comes from the time left
                    per_step = (train_seconds() - elapsed_before) / max(1, step - start_step)
                    bar.total = step + max(0, int((time_budget - train_seconds()) / max(per_step, 1e-9)))
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                mfu=f"{100 * mfu:.1f}%", refresh=False)
            if on_step is not None:
                on_step(step, record)

            if bad_in_row >= cfg.run.max_bad_steps:
                # The skipped steps changed no weights, so the model is the last good one: save it.
                last_ckpt = save()
                raise TrainingDiverged(
                    f"{bad_in_row} non-finite losses in a row (steps {step - bad_in_row + 1}-{step}); stopping. "
                    f"The weights are the last finite ones, saved in {last_ckpt}; resume with --resume auto after "
                    "lowering optimizer.lr or checking the data.")
            pause_start = time.perf_counter()
            if validation is not None and cfg.logging.val_every and step % cfg.logging.val_every == 0 \
                    and step < n_steps:
                val_stats = evaluate(model, validation, cfg, device, run)
                log.log({"split": "val", "step": step, "tokens": tokens, **val_stats})
                if bar is not None:
                    bar.write(f"step {step}: validation loss {val_stats['loss']:.4f}, "
                              f"{val_stats['bpb']:.4f} bits/byte")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < n_steps:
                last_ckpt = save()
            paused += time.perf_counter() - pause_start
            window_start += time.perf_counter() - pause_start
    finally:
        if bar is not None:
            bar.close()
    trained_seconds = train_seconds()  # the final checkpoint and validation below are not training
    if window_tokens and step > start_step:  # a timed run stopped between two records: log its last step
        now = time.perf_counter()
        tokens_per_s = window_tokens / max(now - window_start, 1e-9)
        mfu = mfu_at(tokens_per_s)
        log.log({**record, "tokens_per_s": tokens_per_s, "mfu": mfu, "train_seconds": trained_seconds})

    if last_ckpt is None or last_ckpt.name != ckpt.step_dir_name(step):
        last_ckpt = save()
    result = TrainResult(out_dir=out_dir, steps=step, tokens=tokens, train_loss=loss_value, skipped_steps=skipped,
                         train_seconds=trained_seconds, peak_flops=peak, checkpoint=last_ckpt, losses=losses)
    if validation is not None:
        val_stats = evaluate(model, validation, cfg, device, run)
        log.log({"split": "val", "step": step, "tokens": tokens, **val_stats})
        result.val_loss, result.val_bpb = val_stats["loss"], val_stats["bpb"]
        result.val_loss_per_byte = val_stats["loss_per_byte"]
    session_seconds = result.train_seconds - elapsed_before
    if session_seconds > 0:
        result.tokens_per_s = (tokens - start_tokens) / session_seconds
        result.mfu = mfu_at(result.tokens_per_s)
    if step > start_step + 1:  # the first step compiles and warms up: 32 s of a 40 s GPU run (docs/training.md)
        result.steady_tokens_per_s = (tokens - start_tokens - step_tokens) / (result.train_seconds - first_step_end)
        result.steady_mfu = mfu_at(result.steady_tokens_per_s)
    log.close()
    if world.is_main:
        if cfg.checkpoint.save_final and world.world_size > 1:  # gather the shards from the last checkpoint
            from ..convert.dcp import export_native

            result.final_dir = export_native(last_ckpt / "dcp", out_dir / "final", args=args,
                                             tokenizer_path=tokenizer_path if tokenizer_path.is_file() else None)
        elif cfg.checkpoint.save_final:
            from ..checkpoint import save_pretrained

            result.final_dir = save_pretrained(out_dir / "final", model,
                                               tokenizer_path if tokenizer_path.is_file() else None)
        if cfg.logging.plot and log.path.is_file():
            result.plot = plot_loss_curve(log.path, out_dir / "loss.png", title=f"{cfg.run.name}: {cfg.model.preset}")
    if dist.is_initialized():
        dist.barrier()
    return result
