"""Throughput accounting (FLOPs per token, a measured matmul peak, MFU) and metric sinks (JSONL, TensorBoard, PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..model.args import ModelArgs


def training_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """6·N + 12·n_layers·dim·seq (PaLM appendix B): forward + backward FLOPs per trained token.

    N counts the parameters that take part in matrix multiplications: every weight except the token embedding
    (a table lookup) and the norm gains. The second term is the attention score and value products, which have no
    parameters.
    """
    n_matmul = args.num_params() - args.vocab_size * args.dim - (2 * args.n_layers + 1) * args.dim
    return 6.0 * n_matmul + 12.0 * args.n_layers * args.dim * seq_len


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    A resumed run (``resume_step``) first rewrites the file to what that checkpoint had seen: records of later
    steps (which the run repeats) and a line torn by a crash or a full disk are dropped, so every (split, step)
    has one record and the file always parses.
    """

    def __init__(self, out_dir: Path, tensorboard: bool, enabled: bool = True, resume_step: int | None = None,
                 warn=None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        self.logged: set[tuple[str, int]] = set()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.is_file():
                self._truncate_to(resume_step, warn or (lambda msg: None))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                            purge_step=resume_step + 1 if resume_step else None)

    def _truncate_to(self, step: int, warn) -> None:
        records, torn = _parse_lines(self.path)
        if torn:
            warn(f"{self.path}: dropped {len(torn)} unreadable line(s) (lines {torn[:5]}), left by an interrupted "
                 "write")
        kept = [r for r in records if r.get("step", 0) <= step]
        self.logged = {(r.get("split", "train"), r.get("step")) for r in kept}
        from ..fs import atomic_write_bytes

        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def log(self, record: dict) -> None:
        key = (record.get("split", "train"), record["step"])
        if not self.enabled or key in self.logged:  # a resumed run repeating a record it had already written
            return
        self.logged.add(key)
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            from ..errors import disk_full_error, is_disk_full

            if is_disk_full(exc):
                raise disk_full_error(self.path.parent, None, exc) from exc
            raise
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _parse_lines(path: Path) -> tuple[list[dict], list[int]]:
    """(records, numbers of the lines that are not JSON objects)."""
    records, bad = [], []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; an unreadable line (a write cut short) is skipped with a warning."""
    records, bad = _parse_lines(Path(path))
    if bad:
        import warnings

        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (lines {bad[:5]})", stacklevel=2)
    return records


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Training and validation loss against tokens seen, written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    val = [r for r in records if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], lw=1.2, label="train")
    if val:
        ax.plot([r["tokens"] / 1e6 for r in val], [r["loss"] for r in val], "o-", lw=1.5, label="validation")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def activation_bytes(forward) -> int:
    """Bytes of tensors created by ``forward()`` that are still alive when it returns.

    After a training forward pass these are the activations autograd keeps for the backward pass (what
    activation checkpointing reduces); temporaries already freed do not count. Works on any device, including
    CPU where there is no allocator statistic to read.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    created: list = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    created.append(weakref.ref(t.untyped_storage()))
            return out

    with Track():
        result = forward()
    storages = {}
    for ref in created:
        storage = ref()
        if storage is not None:
            storages[storage.data_ptr()] = storage.nbytes()
    del result
    return sum(storages.values())
