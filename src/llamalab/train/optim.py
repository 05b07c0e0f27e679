"""The paper's optimiser recipe: AdamW (beta1 0.9, beta2 0.95, weight decay 0.1), warmup + cosine, clipping 1.0.

Weight decay goes on every 2-D weight matrix -- the token embeddings, the attention projections (wq, wk, wv, wo),
the SwiGLU matrices (w1, w2, w3) and the output layer -- and not on the 1-D RMSNorm gains. Decay pulls weights
towards zero; a norm gain is a per-channel scale whose neutral value is 1, so decaying it fights the
normalisation instead of regularising capacity (the convention of GPT-2/3, Chinchilla and Meta's released code).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices (ndim >= 2) and undecayed vectors (the RMSNorm gains)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def decayed_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters weight decay applies to (for docs and tests)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    params = param_groups(model, cfg.weight_decay)
    fused = all(p.is_cuda for g in params for p in g["params"]) or None
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
          progress: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from peak/warmup, then cosine decay.

    The cosine runs from the end of warmup to ``total_steps`` and ends at ``min_lr_ratio * peak_lr``; beyond
    that it stays there. ``progress`` (0..1 through the decay) replaces the step-based fraction when given
    (time-bounded runs).
    """
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if progress is None:
        span = max(1, total_steps - warmup_steps)
        progress = (step - warmup_steps) / span
    progress = min(max(progress, 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


class Schedule:
    """Holds what ``lr_at`` needs and applies the value to an optimizer's groups.

    A time-bounded run passes ``time_fraction`` (0..1 of the budget used): the cosine then starts where warmup
    ended, at whatever time that was, and reaches its floor when the budget is spent (or at ``total_steps``,
    whichever comes first).
    """

    def __init__(self, peak_lr: float, cfg: ScheduleConfig, total_steps: int):
        self.peak_lr, self.warmup_steps, self.min_lr_ratio = peak_lr, cfg.warmup_steps, cfg.min_lr_ratio
        self.total_steps = total_steps
        self.decay_start_time: float | None = None  # time fraction at the end of warmup (timed runs)

    def lr(self, step: int, time_fraction: float | None = None) -> float:
        progress = None
        if time_fraction is not None and step >= self.warmup_steps:
            if self.decay_start_time is None:
                self.decay_start_time = min(time_fraction, 0.999)
            time_progress = (time_fraction - self.decay_start_time) / (1.0 - self.decay_start_time)
            step_progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            progress = max(step_progress, time_progress)
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr_ratio, progress)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, time_fraction: float | None = None) -> float:
        lr = self.lr(step, time_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio,
                "total_steps": self.total_steps, "decay_start_time": self.decay_start_time}

    def load_state_dict(self, state: dict) -> None:
        """Only the run's progress is restored; peak, warmup and length come from the (possibly new) config."""
        self.decay_start_time = state.get("decay_start_time")


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of all gradients to ``max_norm`` (0 = measure only); returns the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
