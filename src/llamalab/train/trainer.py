"""Pretraining loop: the paper's recipe with exact resume, metrics and a timed mode.

``train(cfg)`` runs one process or, under ``torchrun``, one rank (RANK / WORLD_SIZE / LOCAL_RANK from the
environment). ``resolve`` (``setup.py``) turns the config into the run's facts once; the model goes through
``ParallelRun.setup`` whatever the world size (activation checkpointing and compile included); then the loop
below. Each optimizer step takes ``grad_accum`` micro-batches of ``batch.micro_batch`` sequences per
data-parallel rank, so a step always sees ``batch.global_tokens`` tokens whatever the layout.

What is trained -- data, model, final export -- is a task (``PretrainTask`` by default); fine-tuning passes its
own (``train(cfg, task=...)``) and gets this loop's checkpoints, exact resume, metrics and layouts unchanged.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import Config
from ..fs import atomic_write_bytes
from ..model import apply_dropout, build_model
from . import checkpoint as ckpt
from .metrics import MetricsLog, plot_loss_curve
from .optim import Schedule, build_optimizer
from .setup import RunSetup, pretraining_source, resolve


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


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, accumulated in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Progress:
    """Where training stands (restored from a checkpoint) and this session's clock and throughput window."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    elapsed_before: float = 0.0  # training seconds of earlier sessions
    last_ckpt: Path | None = None
    start_step: int = 0
    start_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # validation and checkpoint time, not counted as training time
    window_tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    first_step_end: float = 0.0
    tokens_per_s: float = 0.0
    losses: list[float] = field(default_factory=list)

    def train_seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started - self.paused

    @contextmanager
    def pause(self):
        start = time.perf_counter()
        yield
        spent = time.perf_counter() - start
        self.paused += spent
        self.window_start += spent

    def close_window(self) -> float:
        """Tokens/s since the last call (the span between two logged records)."""
        now = time.perf_counter()
        self.tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_tokens, self.window_start = 0, now
        return self.tokens_per_s


class PretrainTask:
    """What ``train`` trains: pretraining. Another task (``llamalab.finetune.task.FinetuneTask``) replaces any of:

    - ``name(cfg)``: the model's name in the header line and the plot's title;
    - ``source(cfg, world)``: (data path, tokenizer path or None, ModelArgs), read by ``resolve``;
    - ``open_data(cfg, setup)``: (training loader, validation set or None). The loader yields a (B, T+1) token
      tensor or an (inputs, targets) pair whose targets are -100 where no loss is taken, and has
      ``state_dict`` / ``load_state_dict``; a validation set has ``batches()`` and, for bits per byte,
      ``bytes_per_token``;
    - ``build_model(cfg, setup)``: the model ``ParallelRun.setup`` lays out (a meta-device one gets rank 0's
      seeded initial weights there);
    - ``export_final(cfg, setup, run, result)``: what rank 0 writes at the end.
    """

    def name(self, cfg: Config) -> str:
        return cfg.model.preset

    def source(self, cfg: Config, world):
        return pretraining_source(cfg, world)

    def open_data(self, cfg: Config, setup: RunSetup):
        return open_data(cfg, setup)

    def build_model(self, cfg: Config, setup: RunSetup):
        """Seeded initial weights; on the meta device under several ranks (``ParallelRun`` fills the shards)."""
        if setup.world.world_size > 1:
            return build_model(setup.args, device="meta", init=False)
        return build_model(setup.args, device=setup.device, seed=cfg.run.seed)

    def export_final(self, cfg: Config, setup: RunSetup, run, result: TrainResult) -> None:
        export_final(cfg, setup, run, result)


def train(cfg: Config, *, on_step=None, task=None) -> TrainResult:
    """Train as ``cfg`` says; returns a summary. ``on_step(step, record)`` is called after every step; ``task``
    (default ``PretrainTask()``) supplies the data, the model and the final export."""
    task = task or PretrainTask()
    setup = resolve(cfg, source=task.source)
    seed_everything(cfg.run.seed)
    loader, validation = task.open_data(cfg, setup)
    run = build_run(cfg, setup, task.build_model(cfg, setup))
    model = run.module  # plain names over this rank's shards/stages: optimizer, checkpoints, clipping
    optimizer = build_optimizer(model, cfg.optimizer)
    schedule = Schedule(cfg.optimizer.lr, cfg.schedule, setup.n_steps)
    progress = restore(cfg, setup, model, optimizer, loader, schedule)
    log = open_log(cfg, setup, progress.step, task.name(cfg))
    bar = progress_bar(cfg, setup, progress.step)
    budget = cfg.length.max_minutes * 60.0

    def save() -> Path:
        return save_checkpoint(cfg, setup, model, optimizer, schedule, loader, progress)

    record = None
    try:
        while progress.step < setup.n_steps:
            if budget and progress.train_seconds() >= budget:
                setup.world.log(f"time budget of {cfg.length.max_minutes} min reached at step {progress.step}")
                break
            record = train_step(cfg, setup, run, optimizer, schedule, loader, progress, budget)
            if progress.step % cfg.logging.every == 0 or progress.step == setup.n_steps:
                record = with_throughput(record, setup, progress)
                log.log(record)
            update_bar(bar, record, setup, progress, budget)
            if on_step is not None:
                on_step(progress.step, record)
            if progress.bad_in_row >= cfg.run.max_bad_steps:
                stop_diverged(progress, save)
            with progress.pause():
                if validation is not None and cfg.logging.val_every and due(progress, cfg.logging.val_every, setup):
                    validate(run, validation, setup, progress, log, bar)
                if cfg.checkpoint.every and due(progress, cfg.checkpoint.every, setup):
                    progress.last_ckpt = save()
    finally:
        if bar is not None:
            bar.close()
    return finish(cfg, setup, run, validation, log, progress, record, save, task)


def open_data(cfg: Config, setup: RunSetup):
    """(training loader, held-out set or None) for this rank's slice of the data."""
    from ..data.loader import MixtureLoader, ValidationSet

    dp_rank = setup.dims.dp_rank()
    loader = MixtureLoader(setup.data_dir, split="train", batch_size=cfg.batch.micro_batch, seq_len=setup.seq_len,
                           seed=cfg.run.seed, rank=dp_rank, world_size=setup.dp)
    validation = None
    if cfg.data.val_batches:
        try:
            # val_batches counts training global batches (global_tokens / seq_len rows): the same held-out
            # windows whatever the layout (world size, degrees, micro-batch, accumulation)
            validation = ValidationSet(setup.data_dir, setup.seq_len, cfg.batch.micro_batch,
                                       max_batches=cfg.data.val_batches, rank=dp_rank, world_size=setup.dp,
                                       batch_rows=max(1, round(cfg.batch.global_tokens / setup.seq_len)))
        except ValueError as exc:
            setup.world.log(f"no validation: {exc}")
    return loader, validation


def build_run(cfg: Config, setup: RunSetup, model):
    """``model`` laid out by ``llamalab.parallel`` (one process: activation checkpointing and compile only).

    A model on the meta device (shapes only, under several ranks) is sharded first, then rank 0's seeded
    weights fill the shards, so every layout starts from the weights one process would.
    """
    from ..parallel.runtime import ParallelRun

    apply_dropout(model, cfg.model.dropout)
    return ParallelRun.setup(model, setup.dims, setup.mesh, device=setup.device, loss_fn=cross_entropy_loss,
                             autocast=setup.autocast, ac_mode=cfg.activation_checkpoint.mode,
                             compile=cfg.compile.enabled, precision=setup.precision,
                             pp_schedule=cfg.parallel.pp_schedule, pp_microbatches=cfg.parallel.pp_microbatches,
                             seed=cfg.run.seed)


def restore(cfg: Config, setup: RunSetup, model, optimizer, loader, schedule) -> Progress:
    """The progress of the checkpoint ``checkpoint.resume`` names (models, optimizer, loader and schedule loaded
    in place), or a fresh start.

    ``auto`` takes the newest checkpoint that verifies and loads; it starts fresh only when there is none at
    all: checkpoints that are all unusable are an error naming each one and why, never a silent restart.
    """
    found = find_checkpoint(cfg, setup, model, optimizer) if cfg.checkpoint.resume else None
    if found is None:
        return Progress()
    state, loader_state, folder = found
    if loader_state is not None:
        loader.load_state_dict(loader_state)
    schedule.load_state_dict(state.get("schedule", {}))
    setup.world.log(f"resumed from {folder} (step {state['step']}, {state['tokens']:,} tokens)")
    return Progress(step=state["step"], tokens=state["tokens"], skipped=state.get("skipped_steps", 0),
                    elapsed_before=state.get("train_seconds", 0.0), last_ckpt=folder, start_step=state["step"],
                    start_tokens=state["tokens"])


def find_checkpoint(cfg: Config, setup: RunSetup, model, optimizer):
    """(trainer state, loader state, folder) loaded from ``checkpoint.resume``, or None to start fresh."""
    if cfg.checkpoint.resume != "auto":
        folder = Path(cfg.checkpoint.resume)
        if not folder.is_dir():
            raise ckpt.CheckpointError(f"--resume {folder}: no such checkpoint folder")
        return _load(folder, model, optimizer, setup) + (folder,)
    found = ckpt.list_checkpoints(setup.ckpt_root)
    if not found:
        setup.world.log(f"--resume auto: no checkpoint under {setup.ckpt_root}: starting fresh")
        return None
    failures = []
    for _, folder in found:
        try:
            return _load(folder, model, optimizer, setup) + (folder,)
        except ckpt.CheckpointError as exc:
            failures.append(str(exc))
            setup.world.log(f"skipping checkpoint {folder.name}: {exc}")
    raise ckpt.CheckpointError(f"--resume auto: none of the {len(found)} checkpoints under {setup.ckpt_root} can "
                               f"be resumed: {'; '.join(failures)}. Fix or move them away, or train into a new "
                               "run.out_dir")


def _load(folder: Path, model, optimizer, setup: RunSetup) -> tuple[dict, dict | None]:
    ckpt.check_model_args(folder, setup.args.to_dict())
    try:
        return ckpt.load_checkpoint(folder, model, optimizer, rank=setup.world.rank)
    except ckpt.CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(f"{folder}: cannot be loaded into this model and optimizer ({exc})") from exc


def open_log(cfg: Config, setup: RunSetup, step: int, name: str) -> MetricsLog:
    """The metrics sink (cut back to ``step`` on resume; a fresh start clears the previous run's files), the run's
    ``config.json`` and the header line."""
    world = setup.world
    if not cfg.checkpoint.resume and world.is_main:
        clear_previous_run(setup.out_dir, world)
    log = MetricsLog(setup.out_dir, cfg.logging.tensorboard, enabled=world.is_main, resume_step=step,
                     warn=world.log)
    if world.is_main:
        setup.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(setup.out_dir / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        world.log(f"model {name}: {setup.args.num_params() / 1e6:.2f}M parameters, vocab "
                  f"{setup.args.vocab_size}; {setup.step_tokens:,} tokens/step = {cfg.batch.micro_batch} seq x "
                  f"{setup.seq_len} x {setup.accum} accum x {setup.dp} dp; "
                  f"{'time-bounded' if setup.time_bounded else f'{setup.n_steps} steps'}; precision "
                  f"{setup.precision}; activation checkpointing {cfg.activation_checkpoint.mode}; compile "
                  f"{cfg.compile.enabled}; peak {setup.peak_flops / 1e12:.3f} TFLOP/s")
    return log


def clear_previous_run(out_dir: Path, world) -> None:
    """A fresh start in a used ``out_dir``: drop the old run's metrics, events and checkpoints, so the plot and
    ``--resume auto`` never mix two runs (and the old, higher-numbered checkpoints are not kept over new ones)."""
    import shutil

    old = [p for p in (out_dir / "metrics.jsonl", out_dir / "tensorboard", out_dir / "checkpoints") if p.exists()]
    if old:
        world.log(f"starting from scratch in {out_dir}: removing the previous run's "
                  + ", ".join(p.name for p in old) + " (use --resume auto to continue it instead)")
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def progress_bar(cfg: Config, setup: RunSetup, step: int):
    if not (cfg.logging.progress and setup.world.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=None if setup.time_bounded else setup.n_steps, initial=step, unit="step",
                dynamic_ncols=True, file=sys.stderr)


def train_step(cfg: Config, setup: RunSetup, run, optimizer, schedule, loader, progress: Progress,
               budget: float) -> dict:
    """One optimizer step over ``accum`` micro-batches; a non-finite loss or gradient skips the update."""
    time_fraction = min(1.0, progress.train_seconds() / budget) if budget else None
    lr = schedule.apply(optimizer, progress.step, time_fraction)
    batches = [to_device(next(loader), setup.device) for _ in range(setup.accum)]
    tokens = run.loss_tokens(batches)  # the loss is the mean over the global batch's targets not ignored
    loss_sum = torch.zeros((), device=setup.device)
    for batch in batches:
        loss_sum += run.forward_backward(batch, tokens)
    loss_sum = run.mean_over_ranks(loss_sum)
    grad_norm = run.clip_grad_norm(cfg.optimizer.grad_clip)
    loss, norm = loss_sum.item(), float(grad_norm)
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
        progress.bad_in_row = 0
    else:
        progress.skipped += 1
        progress.bad_in_row += 1
        setup.world.log(f"step {progress.step + 1}: non-finite loss or gradient (loss {loss}, grad norm {norm}); "
                        f"update skipped ({progress.bad_in_row} in a row, {progress.skipped} in total)")
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.tokens += setup.step_tokens
    progress.window_tokens += setup.step_tokens
    progress.losses.append(loss)
    if progress.step == progress.start_step + 1:
        progress.first_step_end = progress.train_seconds()
    return {"split": "train", "step": progress.step, "tokens": progress.tokens, "loss": loss if finite else None,
            "lr": lr, "grad_norm": norm if finite else None, "skipped_steps": progress.skipped}


def to_device(batch, device: torch.device):
    """A (B, T+1) token tensor, or an (inputs, targets) pair, on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return tuple(t.to(device, non_blocking=True) for t in batch)


def with_throughput(record: dict, setup: RunSetup, progress: Progress) -> dict:
    tokens_per_s = progress.close_window()
    return {**record, "tokens_per_s": tokens_per_s, "mfu": setup.mfu(tokens_per_s),
            "train_seconds": progress.train_seconds()}


def update_bar(bar, record: dict, setup: RunSetup, progress: Progress, budget: float) -> None:
    if bar is None:
        return
    if budget and setup.time_bounded:  # timed run: the ETA comes from the time left
        per_step = (progress.train_seconds() - progress.elapsed_before) / max(1, progress.step - progress.start_step)
        bar.total = progress.step + max(0, int((budget - progress.train_seconds()) / max(per_step, 1e-9)))
    bar.update(1)
    bar.set_postfix(loss=f"{progress.losses[-1]:.3f}", lr=f"{record['lr']:.2e}",
                    tok_s=f"{progress.tokens_per_s:,.0f}", mfu=f"{100 * setup.mfu(progress.tokens_per_s):.1f}%",
                    refresh=False)


def due(progress: Progress, every: int, setup: RunSetup) -> bool:
    """Whether a periodic validation or checkpoint falls on this step (the last step has its own)."""
    return progress.step % every == 0 and progress.step < setup.n_steps


def stop_diverged(progress: Progress, save) -> None:
    """Too many non-finite steps: the skipped steps changed no weights, so the model is the last good one."""
    progress.last_ckpt = save()
    first = progress.step - progress.bad_in_row + 1
    raise TrainingDiverged(
        f"{progress.bad_in_row} non-finite losses in a row (steps {first}-{progress.step}); stopping. The weights "
        f"are the last finite ones, saved in {progress.last_ckpt}; resume with --resume auto after lowering "
        "optimizer.lr or checking the data.")


def save_checkpoint(cfg: Config, setup: RunSetup, model, optimizer, schedule, loader, progress: Progress) -> Path:
    state = {"step": progress.step, "tokens": progress.tokens, "skipped_steps": progress.skipped,
             "train_seconds": progress.train_seconds(), "schedule": schedule.state_dict(), "config": cfg.to_dict(),
             "model_args": setup.args.to_dict()}
    return ckpt.save_checkpoint(setup.ckpt_root, progress.step, model, optimizer, state, loader.state_dict(),
                                rank=setup.world.rank, keep=cfg.checkpoint.keep)


def validate(run, validation, setup: RunSetup, progress: Progress, log: MetricsLog, bar=None) -> dict:
    stats = evaluate(run, validation, setup)
    log.log({"split": "val", "step": progress.step, "tokens": progress.tokens, **stats})
    if bar is not None:
        per_byte = f", {stats['bpb']:.4f} bits/byte" if "bpb" in stats else ""
        bar.write(f"step {progress.step}: validation loss {stats['loss']:.4f}{per_byte}")
    return stats


@torch.no_grad()
def evaluate(run, validation, setup: RunSetup) -> dict:
    """Mean loss over the held-out batches (their non-ignored targets); bits per byte and nats per byte from the
    set's bytes per token when it has one (instruction data has none: its prompts take no loss).

    Token-weighted over every rank: each rank sums its losses and counts its targets not ignored (padding rows
    count nothing), and the sums are added over all ranks before dividing. Ranks of one tensor- or
    pipeline-parallel group see the same rows, so each data-parallel share is counted equally often."""
    model = run.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in validation.batches():
        batch_total, batch_count = run.eval_loss_sum(to_device(batch, setup.device))
        if batch_count:  # a batch of padding only (a rank past the end of the held-out set) adds nothing
            total, count = total + batch_total, count + batch_count
    stats = torch.tensor([total, count], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats)
    model.train(was_training)
    loss = (stats[0] / stats[1]).item()
    if getattr(validation, "bytes_per_token", None) is None:
        return {"loss": loss}
    per_byte = loss / validation.bytes_per_token
    return {"loss": loss, "bpb": per_byte / math.log(2), "loss_per_byte": per_byte}


def finish(cfg: Config, setup: RunSetup, run, validation, log: MetricsLog, progress: Progress, record, save,
           task: PretrainTask) -> TrainResult:
    """The last record, the final checkpoint and validation, the native export and the summary."""
    trained_seconds = progress.train_seconds()  # the final checkpoint and validation below are not training
    if progress.window_tokens and record is not None:  # a timed run stopped between two records
        log.log({**with_throughput(record, setup, progress), "train_seconds": trained_seconds})
    if progress.last_ckpt is None or progress.last_ckpt.name != ckpt.step_dir_name(progress.step):
        progress.last_ckpt = save()
    result = TrainResult(out_dir=setup.out_dir, steps=progress.step, tokens=progress.tokens,
                         train_loss=progress.losses[-1] if progress.losses else None,
                         skipped_steps=progress.skipped, train_seconds=trained_seconds,
                         peak_flops=setup.peak_flops, checkpoint=progress.last_ckpt, losses=progress.losses)
    if validation is not None:
        stats = validate(run, validation, setup, progress, log)
        result.val_loss, result.val_bpb = stats["loss"], stats.get("bpb")
        result.val_loss_per_byte = stats.get("loss_per_byte")
    summarize_throughput(result, setup, progress)
    log.close()
    if setup.world.is_main:
        task.export_final(cfg, setup, run, result)
        if cfg.logging.plot and log.path.is_file():
            result.plot = plot_loss_curve(log.path, setup.out_dir / "loss.png",
                                          title=f"{cfg.run.name}: {task.name(cfg)}")
    if dist.is_initialized():
        dist.barrier()
    return result


def summarize_throughput(result: TrainResult, setup: RunSetup, progress: Progress) -> None:
    """This session's average throughput and MFU, and the same after its first step (compile, warm-up: 32 s of
    a 40 s GPU run, docs/training.md)."""
    session_tokens = progress.tokens - progress.start_tokens
    session_seconds = result.train_seconds - progress.elapsed_before
    if session_seconds > 0:
        result.tokens_per_s = session_tokens / session_seconds
        result.mfu = setup.mfu(result.tokens_per_s)
    if progress.step > progress.start_step + 1:
        result.steady_tokens_per_s = (session_tokens - setup.step_tokens) / (
            result.train_seconds - progress.first_step_end)
        result.steady_mfu = setup.mfu(result.steady_tokens_per_s)


def export_final(cfg: Config, setup: RunSetup, run, result: TrainResult) -> None:
    """``out_dir/final``, a native folder; several ranks gather it from the last checkpoint's shards."""
    if not cfg.checkpoint.save_final:
        return
    final = setup.out_dir / "final"
    if setup.world.world_size > 1:
        from ..convert.dcp import export_native

        result.final_dir = export_native(result.checkpoint / "dcp", final, args=setup.args,
                                         tokenizer_path=setup.tokenizer_path)
    else:
        from ..checkpoint import save_pretrained

        result.final_dir = save_pretrained(final, run.module, setup.tokenizer_path)
