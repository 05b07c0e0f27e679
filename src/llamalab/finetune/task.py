"""Supervised fine-tuning as a task of the one training loop (``train(cfg, task=FinetuneTask(cfg))``).

The task supplies what differs from pretraining -- the base checkpoint's shape and tokenizer, the instruction
data with masked targets, the model (the base's weights, frozen under LoRA) and the exports -- and the loop
keeps everything else: accumulation, clipping, the schedule, checkpoints with exact resume, metrics, the
progress bar, the plot and the torchrun layouts (LoRA: one process, DDP or FSDP).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import TOKENIZER_NAME, load_model, read_config
from ..config import Config, ConfigError
from ..errors import UserError
from ..train.trainer import PretrainTask
from .data import SKIPPED_SHOWN, InstructionLoader, InstructionValidation, load_instructions
from .lora import apply_lora, quantize_base, split_adapters, trainable_parameters
from .peft_export import merge_adapter, write_adapter


class FinetuneTask(PretrainTask):
    """``[finetune]`` and ``[lora]`` of ``cfg``: full fine-tuning writes ``out_dir/final`` (native) as
    pretraining does; LoRA writes ``out_dir/adapter`` (PEFT) and, with ``finetune.merge``, ``out_dir/final``
    (the base with the adapters folded in)."""

    def __init__(self, cfg: Config):
        ft = cfg.finetune
        for key, what in (("base", "the native checkpoint folder to start from"), ("data", "a JSON/JSONL file")):
            if not getattr(ft, key):
                raise ConfigError(f"finetune.{key}: required ({what})")
        if cfg.model.overrides:
            raise ConfigError(f"model: {', '.join(sorted(cfg.model.overrides))} set, but a fine-tuned model has "
                              "the shape of finetune.base; remove the [model] keys")
        if ft.method == "lora" and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
            raise ConfigError("parallel: LoRA fine-tuning runs in one process or data-parallel (dp_shard, "
                              "dp_replicate); tensor and pipeline parallelism are for finetune.method = 'full'")
        self.base = Path(ft.base)
        self.loader: InstructionLoader | None = None

    def name(self, cfg: Config) -> str:
        return f"{self.base} ({cfg.finetune.method} fine-tuning)"

    def source(self, cfg: Config, world):
        """The data file, the base's tokenizer and the base's shape."""
        args, _ = read_config(self.base)
        tokenizer = self.base / TOKENIZER_NAME
        if not tokenizer.is_file():
            raise UserError(f"finetune.base: {self.base} has no {TOKENIZER_NAME}; the instruction data is encoded "
                            "with the base model's tokenizer")
        return Path(cfg.finetune.data), tokenizer, args

    def open_data(self, cfg: Config, setup):
        from ..tokenizer import Tokenizer

        ft, log = cfg.finetune, setup.world.log
        tokenizer = Tokenizer(setup.tokenizer_path)
        data = load_instructions(ft.data, tokenizer, fmt=ft.format, template=ft.template, seq_len=setup.seq_len,
                                 train_on_prompt=ft.train_on_prompt, validation_fraction=ft.validation_fraction,
                                 overlong=ft.overlong, strict=ft.strict)
        log(f"{ft.data}: {data.summary()}")
        for message in data.bad[:SKIPPED_SHOWN]:
            log(f"skipped {message}")
        if len(data.bad) > SKIPPED_SHOWN:
            log(f"... and {len(data.bad) - SKIPPED_SHOWN} more bad records")
        common = {"batch_size": cfg.batch.micro_batch, "seq_len": setup.seq_len, "pad_id": max(tokenizer.pad_id, 0),
                  "rank": setup.dims.dp_rank(), "world_size": setup.dp}
        self.loader = InstructionLoader(data.train, seed=cfg.run.seed, packing=ft.packing, **common)
        validation = None
        if data.validation and cfg.data.val_batches:
            # val_batches counts training global batches of examples (global_tokens / seq_len rows): the same
            # held-out examples whatever the layout (world size, degrees, micro-batch, accumulation)
            validation = InstructionValidation(data.validation, max_batches=cfg.data.val_batches, **common,
                                               batch_rows=max(1, round(cfg.batch.global_tokens / setup.seq_len)))
        return self.loader, validation

    def build_model(self, cfg: Config, setup):
        """The base's weights in fp32 on every rank (``ParallelRun`` then shards them); under LoRA frozen
        (stored in ``lora.base_dtype``) and wrapped with fresh adapters. An int8 base is quantized after
        wrapping, every time the model is built (a resumed run too: the checkpoint holds no int8 tensors),
        deterministically from the base's fp32 weights."""
        model, _, _ = load_model(self.base, dtype=torch.float32, device=setup.device)
        model.train()
        if cfg.finetune.method == "lora":
            lora = cfg.lora
            if lora.base_dtype == "bf16":
                model.to(torch.bfloat16)
            wrapped = apply_lora(model, lora.targets(), lora.rank, lora.alpha, lora.dropout, lora.rslora)
            if lora.base_dtype == "int8":  # every linear layer, wrapped or not; embedding and norms stay fp32
                quantize_base(model)
            int8 = " (every linear layer; embedding and norms fp32)" if lora.base_dtype == "int8" else ""
            setup.world.log(f"LoRA rank {lora.rank}, alpha {lora.alpha:g}{' (rsLoRA)' if lora.rslora else ''} on "
                            f"{len(wrapped)} matrices ({', '.join(lora.targets())}); base weights frozen in "
                            f"{lora.base_dtype}{int8}")
        trainable, total = trainable_parameters(model)
        setup.world.log(f"{self.base}: {trainable:,} of {total:,} parameters trained ({100 * trainable / total:.2f}%)")
        return model

    def export_final(self, cfg: Config, setup, run, result) -> None:
        if self.loader is not None:
            setup.world.log(f"{self.loader.epochs():.2f} epochs of {len(self.loader.examples):,} training examples")
        if cfg.finetune.method == "full":
            super().export_final(cfg, setup, run, result)
            return
        if not cfg.checkpoint.save_final:
            return
        if setup.world.world_size > 1:  # the shards are gathered from the last checkpoint
            from ..convert.dcp import read_model_state

            state = read_model_state(result.checkpoint / "dcp")
        else:
            state = run.module.state_dict()
        adapter = write_adapter(setup.out_dir / "adapter", split_adapters(state)[1], setup.args, cfg.lora, self.base)
        if cfg.finetune.merge:
            result.final_dir = merge_adapter(adapter, setup.out_dir / "final", self.base)
