"""A run's resolved facts, computed once from the config before anything trains.

The config is what the user wrote and is never changed: ``precision.mode = "auto"``, ``dp_shard = -1``, a data
recipe and a token budget become a concrete device, precision, layout, prepared folder, model shape, batch
layout and step count here, in one ``RunSetup`` every later stage reads.

One exception: a budget-sized model (``[model] size = "budget"``) is chosen here once, before anything is built,
and pinned in the config -- ``[model]`` becomes that fixed shape and a time budget's ``max_minutes`` the training
time left after measuring the throughput -- so the run's ``config.json``, its checkpoints and a resume see an
ordinary fixed-shape config. A resumed run keeps the shape it started with and measures nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import SIZED_BY_BUDGET, Config, ConfigError
from ..fs import check_output_folder
from ..hardware import fast_bf16, measure_peak_flops
from ..model import ModelArgs
from ..model.sizing import (
    Choice,
    DataLimit,
    ScalingLaw,
    candidates,
    choose_for_flops,
    choose_for_time,
    choose_for_tokens,
    flops_per_token,
)
from ..parallel.mesh import ParallelDims
from .metrics import training_flops_per_token

TIME_BOUNDED = 10**12  # the step count of a run bounded by time alone
# all a run folder holds (``adapter``: a LoRA fine-tune's PEFT adapter), with the temporary names of its atomic writes
RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard", "checkpoints", "final", "adapter", "loss.png",
             ".*.tmp-*", ".*.old-*")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            import sys

            print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunSetup:
    world: Distributed
    device: torch.device
    precision: str  # "bf16" or "fp32"
    dims: ParallelDims
    mesh: object | None  # the DeviceMesh under torchrun, None in one process
    data_dir: Path
    tokenizer_path: Path | None
    args: ModelArgs
    seq_len: int
    dp: int  # data-parallel degree
    accum: int  # micro-batches per optimizer step
    step_tokens: int
    n_steps: int
    peak_flops: float
    out_dir: Path
    sizing: Choice | None = None  # how a budget-sized model was chosen (None: a fixed shape, or a resume)
    epochs: float | None = None  # planned (or, timed, predicted) tokens / the training split's tokens

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def time_bounded(self) -> bool:
        return self.n_steps >= TIME_BOUNDED

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mfu(self, tokens_per_second: float) -> float:
        flops = tokens_per_second * training_flops_per_token(self.args, self.seq_len)
        return flops / (self.peak_flops * self.world.world_size)


def resolve(cfg: Config, source=None) -> RunSetup:
    """Everything the run needs to know, from ``cfg`` and the machine (and, under torchrun, the environment).

    ``source(cfg, world) -> (data path, tokenizer path or None, ModelArgs)`` says what is trained on and its
    shape (``RunSetup.data_dir`` is that data path); the default, ``pretraining_source``, is the prepared folder
    and ``[model]`` (fine-tuning reads an instruction file and a checkpoint's shape instead).
    """
    requested = cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    world = init_distributed(torch.device(requested).type)
    device = resolve_device(cfg.run.device, world)
    out_dir = Path(cfg.run.out_dir)
    if world.is_main:
        check_output_folder(out_dir, RUN_FILES, "run folder", hint="choose another run.out_dir")
    precision = cfg.precision.mode
    if precision == "auto":
        precision = "bf16" if fast_bf16(device) else "fp32"
    sizing = size_from_budget(cfg, world, device, precision) if cfg.model.size == "budget" else None
    data_dir, tokenizer_path, args = (source or pretraining_source)(cfg, world)
    seq_len = cfg.data.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise ConfigError(f"data.seq_len: {seq_len} is longer than model.max_seq_len {args.max_seq_len}")
    dims = ParallelDims.from_config(cfg.parallel, world.world_size)
    mesh = dims.build_mesh(device.type) if world.world_size > 1 else None
    per_micro = cfg.batch.micro_batch * seq_len * dims.dp
    accum = max(1, round(cfg.batch.global_tokens / per_micro))
    step_tokens = accum * per_micro
    if cfg.logging.peak_tflops:
        peak = cfg.logging.peak_tflops * 1e12
    else:
        peak = measure_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    n_steps = total_steps(cfg, step_tokens, length_flops_per_token(cfg, args, seq_len))
    planned = n_steps * step_tokens if n_steps < TIME_BOUNDED else (sizing.tokens if sizing else None)
    return RunSetup(world=world, device=device, precision=precision, dims=dims, mesh=mesh, data_dir=data_dir,
                    tokenizer_path=tokenizer_path, args=args, seq_len=seq_len, dp=dims.dp, accum=accum,
                    step_tokens=step_tokens, n_steps=n_steps, peak_flops=peak, out_dir=out_dir, sizing=sizing,
                    epochs=report_epochs(world, data_dir, planned, sizing, cfg.model.dropout))


def pretraining_source(cfg: Config, world: Distributed) -> tuple[Path, Path | None, ModelArgs]:
    """The prepared data folder, its tokenizer (None when it has none) and ``[model]``'s shape, whose
    ``vocab_size``, when the config leaves it unset, is the tokenizer's or the manifest's."""
    data_dir = prepare_data(cfg, world)
    tokenizer_path, vocab = data_vocabulary(data_dir)
    return data_dir, tokenizer_path, cfg.model_args(vocab_size=vocab)


def data_vocabulary(data_dir: Path) -> tuple[Path | None, int | None]:
    """(the prepared folder's tokenizer or None, its vocabulary size: the tokenizer's or the manifest's)."""
    tokenizer_path = data_dir / "tokenizer.model"
    if tokenizer_path.is_file():
        from ..tokenizer import Tokenizer

        return tokenizer_path, Tokenizer(tokenizer_path).vocab_size
    return None, json.loads((data_dir / "manifest.json").read_text()).get("vocab_size")


def train_tokens(data_dir: Path) -> int | None:
    """Tokens in the prepared folder's training split (None: not a prepared folder)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return int(manifest.get("totals", {}).get("train_tokens") or sum(
        s["splits"]["train"]["tokens"] for s in manifest["sources"].values()))


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


def total_steps(cfg: Config, tokens_per_step: int, flops_per_token: float | None = None) -> int:
    """``length.steps``, else ``length.tokens`` (or ``length.flops`` / ``flops_per_token`` tokens) in whole
    steps, else ``TIME_BOUNDED``."""
    if cfg.length.steps:
        return cfg.length.steps
    if cfg.length.tokens:
        return max(1, math.ceil(cfg.length.tokens / tokens_per_step))
    if cfg.length.flops:
        return max(1, math.ceil(cfg.length.flops / flops_per_token / tokens_per_step))
    return TIME_BOUNDED


def length_flops_per_token(cfg: Config, args: ModelArgs, seq_len: int) -> float | None:
    """FLOPs per token as ``length.flops`` counts them: as the scaling sweeps do, N in the law's accounting."""
    if cfg.length.steps or cfg.length.tokens or not cfg.length.flops:
        return None
    return flops_per_token(args, seq_len, ScalingLaw.load(cfg.model.law or None).accounting)


# ------------------------------------------------------------------------------- budget-sized models


def size_from_budget(cfg: Config, world: Distributed, device: torch.device, precision: str) -> Choice | None:
    """Choose a budget-sized model's shape (rank 0; the others receive it), log why, and pin it in ``cfg``.
    A resumed run keeps the shape of the run it continues (None)."""
    data_dir = prepare_data(cfg, world)
    saved = saved_shape(cfg)
    choice = error = None
    if saved is not None:
        shape, where = saved
        world.log(f"model.size = 'budget': resuming, so keeping the shape the run started with "
                  f"(dim {shape['dim']}, n_layers {shape['n_layers']}, n_heads {shape['n_heads']}; from {where}); "
                  "nothing is measured or chosen again")
    else:
        shape = None
        if world.is_main:
            try:
                data = DataLimit(train_tokens(data_dir), cfg.model.max_epochs)
                choice = choose_shape(cfg, world, device, precision, data_vocabulary(data_dir)[1], data)
                shape = {key: getattr(choice.args, key) for key in SIZED_BY_BUDGET}
            except ConfigError as exc:
                error = str(exc)
        if world.world_size > 1:
            shared = [(shape, choice, error)]
            dist.broadcast_object_list(shared, src=0)
            shape, choice, error = shared[0]
        if error:
            raise ConfigError(error)
    cfg.model = dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, **shape}, size="fixed", family=None)
    if choice is not None and choice.seconds is not None:
        cfg.length = dataclasses.replace(cfg.length, max_minutes=choice.seconds / 60.0)
    return choice


def saved_shape(cfg: Config) -> tuple[dict, Path] | None:
    """(dim, n_layers, n_heads; the file they come from) of the run a resume continues: ``run.out_dir``'s
    ``config.json`` for ``--resume auto``, the checkpoint's ``trainer_state.json`` for a path. None when not
    resuming or when there is no such file (a fresh start)."""
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    path = Path(cfg.run.out_dir) / "config.json" if resume == "auto" else Path(resume) / "trainer_state.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    model = (data.get("model") if resume == "auto" else data.get("model_args")) if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return None
    shape = {key: model[key] for key in SIZED_BY_BUDGET if isinstance(model.get(key), int)}
    return (shape, path) if len(shape) == len(SIZED_BY_BUDGET) else None


def choose_shape(cfg: Config, world: Distributed, device: torch.device, precision: str, vocab: int | None,
                 data: DataLimit = DataLimit()) -> Choice:
    """The family shape the law calls compute-optimal for the ``[length]`` budget: steps or tokens (the N whose
    compute-optimal D is that many tokens), flops, or max_minutes (throughput measured here, briefly); for
    flops and time, a larger one where that would make more than ``data.max_epochs`` passes over the data (a
    token budget is the same number of passes whatever the shape)."""
    law = ScalingLaw.load(cfg.model.law or None)
    family = cfg.model.family
    shapes = [(f"model.family.dims[{i}]", cfg.model_args(vocab_size=vocab, shape=family.shape(dim)))
              for i, dim in enumerate(family.dims)]
    seq_len = cfg.data.seq_len or shapes[0][1].max_seq_len
    cands = candidates(shapes, seq_len, law.accounting)
    dp = ParallelDims.from_config(cfg.parallel, world.world_size).dp
    per_micro = cfg.batch.micro_batch * seq_len * dp
    accum = max(1, round(cfg.batch.global_tokens / per_micro))
    length = cfg.length
    if length.steps:
        choice = choose_for_tokens(cands, law, length.steps * accum * per_micro, "length.steps")
    elif length.tokens:
        choice = choose_for_tokens(cands, law, length.tokens)
    elif length.flops:
        choice = choose_for_flops(cands, law, length.flops, data=data)
    else:
        def measure(candidate) -> float:  # data-parallel ranks each train their share at this rate
            return dp * measure_training_throughput(cfg, candidate.args, device, precision, seq_len, accum)

        choice = choose_for_time(cands, law, length.max_minutes * 60.0, measure, data=data)
    for line in describe_choice(choice, law, cfg, cands, device, precision, seq_len, accum, dp):
        world.log(line)
    return choice


def describe_choice(choice: Choice, law: ScalingLaw, cfg: Config, cands, device, precision: str, seq_len: int,
                    accum: int, dp: int) -> list[str]:
    family, pick = cfg.model.family, choice.candidate
    budget = {"length.steps": f"length.steps = {cfg.length.steps:,} ({choice.tokens:,.0f} tokens)",
              "length.tokens": f"length.tokens = {cfg.length.tokens:,}",
              "length.flops": f"length.flops = {cfg.length.flops:.3g}",
              "length.max_minutes": f"length.max_minutes = {cfg.length.max_minutes:g}"}[choice.key]
    lines = [f"model.size = 'budget', sized for {budget}; scaling law {law.describe()}",
             f"  family: dims {', '.join(map(str, family.dims))}; n_layers = max(1, round(dim / "
             f"{family.aspect_ratio:g})), n_heads = dim / {family.head_dim}: {cands[0].params:,} to "
             f"{cands[-1].params:,} parameters ({law.accounting})"]
    if choice.seconds is not None:
        rates = ", ".join(f"{label} {rate:,.0f}" for label, rate in choice.measured)
        lines.append(f"  measured training throughput for {choice.measure_seconds:.1f} s on {device.type} "
                     f"({precision}, {cfg.batch.micro_batch} x {seq_len} tokens x {accum} accum"
                     f"{f' x {dp} dp' if dp > 1 else ''}, eager, random tokens), tokens/s: {rates}; assumed: "
                     "the run trains at these rates, other shapes' FLOP/s interpolated in log N (held flat "
                     f"beyond the measured ones), and the measuring counts against the budget: "
                     f"{choice.seconds:.1f} s of training left (length.max_minutes = {choice.seconds / 60:.3f})")
    tokens = f"{choice.tokens:,.0f} tokens ({choice.tokens / pick.params:.3g} per parameter)"
    if choice.tokens_per_s is not None:
        tokens = f"about {tokens} at a predicted {choice.tokens_per_s:,.0f} tokens/s"
    lines.append(f"  chose {pick.label}: dim {pick.args.dim}, n_layers {pick.args.n_layers}, n_heads "
                 f"{pick.args.n_heads}, {pick.params:,} parameters ({pick.where}); the law's optimum for "
                 f"{choice.flops:.3g} FLOPs is {choice.n_opt:,.0f} parameters; the run trains {tokens}")
    return lines + [f"  note: {note}" for note in choice.notes]


def measure_training_throughput(cfg: Config, args: ModelArgs, device: torch.device, precision: str, seq_len: int,
                                accum: int, seconds: float = 1.0, max_steps: int = 8) -> float:
    """Training tokens/s of ``args`` here: optimizer steps of ``accum`` micro-batches of random tokens in the
    run's precision, AdamW and clipping included, eager; one warm-up step, then timed steps (at least one,
    until ``seconds`` have passed or ``max_steps``)."""
    import torch.nn.functional as F

    from ..model import build_model
    from .optim import build_optimizer

    model = build_model(args, device=device, seed=cfg.run.seed)
    optimizer = build_optimizer(model, cfg.optimizer)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(args.vocab_size, (cfg.batch.micro_batch, seq_len + 1), generator=generator).to(device)

    def step() -> None:
        for _ in range(accum):
            with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                  else contextlib.nullcontext()):
                logits = model(batch[:, :-1])
            (F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()) / accum).backward()
        if cfg.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    start, steps = time.perf_counter(), 0
    while steps < 1 or (steps < max_steps and time.perf_counter() - start < seconds):
        step()
        steps += 1
    sync()
    return steps * accum * cfg.batch.micro_batch * seq_len / (time.perf_counter() - start)


def report_epochs(world: Distributed, data_dir: Path, tokens: float | None, sizing: Choice | None,
                  dropout: float = 0.0) -> float | None:
    """Epochs of the training split the run will see (None when unknown); more than one is logged as a
    data-limited run, with the remedies."""
    available = train_tokens(data_dir) if tokens else None
    if not available:
        return None
    epochs = tokens / available
    if epochs > 1.0:
        planned = "is predicted to train" if sizing is not None and sizing.seconds is not None else "trains"
        law = (" The scaling law that sized this model assumes every training token is new (model.max_epochs "
               "bounds the passes it may choose)." if sizing is not None else "")
        world.log(f"data-limited: this run {planned} {tokens:,.0f} tokens, {epochs:.1f} epochs of the "
                  f"{available:,} training tokens in {data_dir}.{law} Repeating data up to about 4 epochs costs "
                  "little; beyond that each repeat is worth less (Muennighoff et al. 2023, 'Scaling "
                  "Data-Constrained Language Models'). Remedies: more data (data.recipe), regularisation "
                  f"(model.dropout, now {dropout:g}; optimizer.weight_decay), a larger model trained for fewer "
                  "epochs, a shorter run ([length]), or accept the repeats.")
    return epochs
