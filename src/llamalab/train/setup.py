"""A run's resolved facts, computed once from the config before anything trains.

The config is what the user wrote and is never changed: ``precision.mode = "auto"``, ``dp_shard = -1``, a data
recipe and a token budget become a concrete device, precision, layout, prepared folder, model shape, batch
layout and step count here, in one ``RunSetup`` every later stage reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..fs import check_output_folder
from ..hardware import fast_bf16, measure_peak_flops
from ..model import ModelArgs
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
    return RunSetup(world=world, device=device, precision=precision, dims=dims, mesh=mesh, data_dir=data_dir,
                    tokenizer_path=tokenizer_path, args=args, seq_len=seq_len, dp=dims.dp, accum=accum,
                    step_tokens=step_tokens, n_steps=total_steps(cfg, step_tokens), peak_flops=peak,
                    out_dir=out_dir)


def pretraining_source(cfg: Config, world: Distributed) -> tuple[Path, Path | None, ModelArgs]:
    """The prepared data folder, its tokenizer (None when it has none) and ``[model]``'s shape, whose
    ``vocab_size``, when the config leaves it unset, is the tokenizer's or the manifest's."""
    data_dir = prepare_data(cfg, world)
    tokenizer_path = data_dir / "tokenizer.model"
    if tokenizer_path.is_file():
        from ..tokenizer import Tokenizer

        vocab = Tokenizer(tokenizer_path).vocab_size
    else:
        tokenizer_path = None
        vocab = json.loads((data_dir / "manifest.json").read_text()).get("vocab_size")
    return data_dir, tokenizer_path, cfg.model_args(vocab_size=vocab)


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


def total_steps(cfg: Config, tokens_per_step: int) -> int:
    if cfg.length.steps:
        return cfg.length.steps
    if cfg.length.tokens:
        return max(1, math.ceil(cfg.length.tokens / tokens_per_step))
    return TIME_BOUNDED
