"""The sweep file and its plan: which runs a sweep trains, each with the tokens its compute budget buys.

A sweep is TOML; paths are relative to the current directory, as in a training config::

    base = "configs/demo.toml"      # any `llamalab train` config
    out_dir = "runs/scaling-cpu"    # runs/<budget>-<shape>-s<seed>/, logs/, report/
    budgets = [1e12, 3e12, 1e13]    # training FLOPs per run, counted as `accounting` says
    seeds = [0]
    accounting = "total"            # FLOPs/token = 6N + 12 n_layers dim seq; N = every parameter
                                    # ("non_embedding": N without the embedding and output tables)
    min_steps = 10                  # a shape that would get fewer optimizer steps at a budget is left out
    tokens_per_param = [2, 200]     # optional: at each budget, only the shapes whose D/N falls in here

    [noise]                         # optional: more seeds at some budgets, to size run-to-run noise
    budgets = [3e12]
    seeds = [1, 2]

    [overrides]                     # --section.key values for every run
    data.recipe = "configs/data/scaling.toml"

    [family]                        # n_layers = max(1, round(dim / aspect_ratio)), n_heads = dim / head_dim
    dims = [32, 64, 128]
    aspect_ratio = 32
    head_dim = 16
    multiple_of = 16                # optional: the SwiGLU rounding (default: the base model's)

    # ... or explicit shapes instead of [family], each optionally only at some budgets:
    # [[shapes]]
    # dim = 64; n_layers = 2; n_heads = 4; budgets = [1e12]

    [schedule]                      # per-size peak learning rate and warmup
    lr = 3e-3                       # the peak learning rate of a model of lr_params parameters (default: base's)
    lr_params = 1e6
    lr_exponent = 0.0               # lr = lr * (N / lr_params) ** -lr_exponent
    warmup_fraction = 0.05          # warmup steps = round(warmup_fraction * steps)

Each run's token budget is D = C / FLOPs-per-token, given to ``llamalab train`` as ``length.tokens``, so its
cosine schedule spans exactly its own budget (rounded up to whole optimizer steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..config import Config, ConfigError, LengthConfig, load_config
from ..errors import UserError
from ..fs import check_output_folder, read_toml
from ..model.args import ModelArgs
from ..model.sizing import ACCOUNTINGS, counted_params, family_shape, flops_per_token
from ..train.setup import RUN_FILES, Distributed, prepare_data, total_steps, train_tokens

SWEEP_FILES = ("runs", "logs", "report", ".*.tmp-*", ".*.old-*")  # all a sweep folder holds
TOP_KEYS = {"base", "out_dir", "budgets", "seeds", "accounting", "min_steps", "tokens_per_param", "overrides",
            "family", "shapes", "schedule", "noise"}
FAMILY_KEYS = {"dims", "aspect_ratio", "head_dim", "multiple_of"}
SHAPE_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "budgets"}
SCHEDULE_KEYS = {"lr", "lr_params", "lr_exponent", "warmup_fraction"}
SET_BY_SWEEP = {"run.out_dir", "run.name", "run.seed", "model.size", "model.dim", "model.n_layers",
                "model.n_heads", "optimizer.lr", "schedule.warmup_steps", "length.steps", "length.tokens",
                "length.max_minutes", "checkpoint.resume", "logging.progress"}


class SweepError(UserError):
    """A sweep file that cannot be run; the message names the file and the key."""


def budget_label(flops: float) -> str:
    """``3e12``, ``1.5e13``: a budget as it names run folders (3 significant digits)."""
    mantissa, exponent = f"{flops:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def toml_value(value) -> str:
    """A TOML literal, so an override reaches ``llamalab train`` with the type it has in the sweep file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    multiple_of: int | None = None
    budgets: tuple[str, ...] | None = None  # budget labels it runs at (None: all)
    where: str = ""  # the key that made it, for error messages

    @property
    def label(self) -> str:
        kv = f"kv{self.n_kv_heads}" if self.n_kv_heads else ""
        return f"d{self.dim}l{self.n_layers}h{self.n_heads}{kv}"

    def cli_args(self) -> list[str]:
        fields = {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
                  "n_kv_heads": self.n_kv_heads, "multiple_of": self.multiple_of}
        shape = [arg for key, value in fields.items() if value is not None for arg in (f"--model.{key}", str(value))]
        return ["--model.size", "fixed", *shape]  # the sweep's shape, even where the base config sizes by budget


@dataclass(frozen=True)
class LearningRateRule:
    lr: float | None  # None: the base config's
    lr_params: float = 1e6
    lr_exponent: float = 0.0
    warmup_fraction: float = 0.05

    def peak_lr(self, params: int, base_lr: float) -> float:
        return (self.lr or base_lr) * (params / self.lr_params) ** -self.lr_exponent

    def warmup_steps(self, steps: int) -> int:
        return round(self.warmup_fraction * steps)


@dataclass(frozen=True)
class Sweep:
    path: Path
    base: Path
    out_dir: Path
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    accounting: str
    min_steps: int
    tokens_per_param: tuple[float, float] | None
    noise: dict[str, tuple[int, ...]]  # budget label -> the seeds run there beyond ``seeds`` ([noise])
    overrides: tuple[str, ...]  # --section.key VALUE pairs from [overrides]
    shapes: tuple[Shape, ...]
    schedule: LearningRateRule

    def key(self, key: str) -> str:
        """``file: key`` for an error message."""
        return f"{self.path}: {key}"


@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget: float
    seed: int
    shape: Shape
    args: ModelArgs
    params: int  # N as the accounting counts it
    flops_per_token: float
    tokens: int  # D = budget / flops_per_token, the run's length.tokens
    steps: int
    step_tokens: int
    lr: float
    warmup_steps: int
    out_dir: Path
    overrides: tuple[str, ...]  # everything the run gets on the command line after the base config
    config: Config  # what `llamalab train` resolves, and writes as the run's config.json

    @property
    def trained_tokens(self) -> int:
        """D rounded up to whole optimizer steps: what the run actually trains on."""
        return self.steps * self.step_tokens

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.trained_tokens

    def command(self, base: Path) -> list[str]:
        return [sys.executable, "-m", "llamalab", "train", str(base), *self.overrides, "--resume", "auto"]


@dataclass(frozen=True)
class Plan:
    sweep: Sweep
    runs: tuple[PlannedRun, ...]
    left_out: tuple[str, ...]  # "budget shape: why" for each pair the rules dropped
    train_tokens: int  # of the prepared data, for epochs


def _fail(where: str, message: str) -> NoReturn:
    raise SweepError(f"{where}: {message}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value, where: str, integer: bool = False):
    if not (_is_number(value) and value > 0 and (not integer or isinstance(value, int))):
        _fail(where, f"expected a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def _list(value, where: str, item=_positive, **kwargs) -> list:
    """A non-empty list, each item checked by ``item(value, "key[i]", **kwargs)``."""
    if not isinstance(value, list) or not value:
        _fail(where, f"expected a non-empty list, got {value!r}")
    return [item(v, f"{where}[{i}]", **kwargs) for i, v in enumerate(value)]


def _table(data: dict, name: str, keys: set[str], where: str) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        _fail(f"{where}: {name}", f"expected a [{name}] table, got {table!r}")
    unknown = sorted(set(table) - keys)
    if unknown:
        _fail(f"{where}: {name}.{unknown[0]}", f"unknown key; [{name}] has {sorted(keys)}")
    return table


def _seed(value, where: str) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        _fail(where, f"expected a non-negative integer, got {value!r}")
    return value


def _noise(table, where: str, labels: list[str], seeds: list[int]) -> dict[str, tuple[int, ...]]:
    """``[noise]``: budget label -> extra seeds, checked against the budgets and ``seeds``."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        _fail(f"{where}: noise", f"expected a [noise] table with budgets and seeds, got {table!r}")
    unknown = sorted(set(table) - {"budgets", "seeds"})
    if unknown:
        _fail(f"{where}: noise.{unknown[0]}", "unknown key; [noise] has budgets and seeds")
    for key in ("budgets", "seeds"):
        if key not in table:
            _fail(f"{where}: noise.{key}", "missing ([noise] needs budgets and seeds)")
    extra = _list(table["seeds"], f"{where}: noise.seeds", _seed)
    twice = sorted(set(extra) & set(seeds)) or sorted({x for x in extra if extra.count(x) > 1})
    if twice:
        _fail(f"{where}: noise.seeds", f"seed {twice[0]} is given twice (with seeds, or within noise.seeds)")
    out = {}
    for i, budget in enumerate(_list(table["budgets"], f"{where}: noise.budgets")):
        label = budget_label(budget)
        if label not in labels:
            _fail(f"{where}: noise.budgets[{i}]", f"{label} is not one of the sweep's budgets ({', '.join(labels)})")
        out[label] = tuple(extra)
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; every mistake is a ``SweepError`` naming the file and the key."""
    path = Path(path)
    data = read_toml(path, "sweep file", SweepError)
    where = str(path)
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        _fail(f"{where}: {unknown[0]}", f"unknown key; a sweep has {sorted(TOP_KEYS)}")
    for key in ("base", "out_dir", "budgets"):
        if key not in data:
            _fail(f"{where}: {key}", "missing (a sweep needs base, out_dir and budgets)")
    for key in ("base", "out_dir"):
        if not isinstance(data[key], str) or not data[key]:
            _fail(f"{where}: {key}", f"expected a path, got {data[key]!r}")
    base = Path(data["base"])
    if not base.is_file():
        _fail(f"{where}: base", f"{base}: no such training config")
    budgets = _list(data["budgets"], f"{where}: budgets")
    labels = [budget_label(b) for b in budgets]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            _fail(f"{where}: budgets[{i}]", f"{label} is given twice (budgets are told apart by 3 digits)")
    seeds = _list(data.get("seeds", [0]), f"{where}: seeds", _seed)
    if len(set(seeds)) != len(seeds):
        _fail(f"{where}: seeds", f"a seed is given twice: {seeds}")
    accounting = data.get("accounting", "total")
    if accounting not in ACCOUNTINGS:
        _fail(f"{where}: accounting", f"expected one of {', '.join(map(repr, ACCOUNTINGS))}, got {accounting!r}")
    min_steps = _positive(data.get("min_steps", 10), f"{where}: min_steps", integer=True)
    window = data.get("tokens_per_param")
    if window is not None:
        window = _list(window, f"{where}: tokens_per_param")
        if len(window) != 2 or window[0] >= window[1]:
            _fail(f"{where}: tokens_per_param", f"expected [low, high] with low < high, got {window}")
        window = tuple(float(w) for w in window)
    shapes = _shapes(data, where, labels)
    noise = _noise(data.get("noise"), where, labels, seeds)
    return Sweep(path=path, base=base, out_dir=Path(data["out_dir"]), budgets=tuple(float(b) for b in budgets),
                 seeds=tuple(seeds), noise=noise, accounting=accounting, min_steps=min_steps, tokens_per_param=window,
                 overrides=_override_args(data, where, shapes), shapes=shapes, schedule=_schedule(data, where))


def _shapes(data: dict, where: str, budget_labels: list[str]) -> tuple[Shape, ...]:
    if ("family" in data) == ("shapes" in data):
        _fail(f"{where}: family", "give exactly one of [family] (a width/depth rule) and [[shapes]] (a list)")
    if "family" in data:
        shapes = _family(_table(data, "family", FAMILY_KEYS, where), where)
    else:
        tables = data["shapes"]
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            _fail(f"{where}: shapes", "expected one or more [[shapes]] tables")
        shapes = [_explicit_shape(t, f"shapes[{i}]", where, budget_labels) for i, t in enumerate(tables)]
    seen: dict[str, str] = {}
    for shape in shapes:
        if shape.label in seen:
            _fail(f"{where}: {shape.where}", f"the same shape as {seen[shape.label]} ({shape.label})")
        seen[shape.label] = shape.where
    return tuple(shapes)


def _family(table: dict, where: str) -> list[Shape]:
    for key in ("dims", "aspect_ratio", "head_dim"):
        if key not in table:
            _fail(f"{where}: family.{key}", "missing (a family needs dims, aspect_ratio and head_dim)")
    dims = _list(table["dims"], f"{where}: family.dims", integer=True)
    aspect = _positive(table["aspect_ratio"], f"{where}: family.aspect_ratio")
    head_dim = _positive(table["head_dim"], f"{where}: family.head_dim", integer=True)
    multiple_of = table.get("multiple_of")
    if multiple_of is not None:
        _positive(multiple_of, f"{where}: family.multiple_of", integer=True)
    shapes = []
    for i, dim in enumerate(dims):
        if dim % head_dim:
            _fail(f"{where}: family.dims[{i}]", f"{dim} is not a multiple of head_dim {head_dim}")
        n_layers, n_heads = family_shape(dim, aspect, head_dim)
        shapes.append(Shape(dim=dim, n_layers=n_layers, n_heads=n_heads, multiple_of=multiple_of,
                            where=f"family.dims[{i}]"))
    return shapes


def _explicit_shape(table: dict, key: str, where: str, budget_labels: list[str]) -> Shape:
    unknown = sorted(set(table) - SHAPE_KEYS)
    if unknown:
        _fail(f"{where}: {key}.{unknown[0]}", f"unknown key; a shape has {sorted(SHAPE_KEYS)}")
    for name in ("dim", "n_layers", "n_heads"):
        if name not in table:
            _fail(f"{where}: {key}.{name}", "missing (a shape needs dim, n_layers and n_heads)")
    values = {name: _positive(table[name], f"{where}: {key}.{name}", integer=True)
              for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of") if name in table}
    budgets = None
    if "budgets" in table:
        budgets = tuple(budget_label(b) for b in _list(table["budgets"], f"{where}: {key}.budgets"))
        for i, label in enumerate(budgets):
            if label not in budget_labels:
                _fail(f"{where}: {key}.budgets[{i}]", f"{label} is not one of budgets {budget_labels}")
    return Shape(**values, budgets=budgets, where=key)


def _override_args(data: dict, where: str, shapes: tuple[Shape, ...]) -> tuple[str, ...]:
    """``[overrides]`` (``data.recipe = ...`` or ``[overrides.data]`` tables) as ``--section.key VALUE`` pairs."""
    table = data.get("overrides", {})
    if not isinstance(table, dict):
        _fail(f"{where}: overrides", f"expected a table of --section.key values, got {table!r}")
    shape_keys = {f"model.{f}" for s in shapes for f in ("n_kv_heads", "multiple_of") if getattr(s, f) is not None}
    args: list[str] = []
    for section, values in table.items():
        if not isinstance(values, dict):
            _fail(f"{where}: overrides.{section}", "expected section.key = value (e.g. data.recipe = \"x.toml\")")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key in SET_BY_SWEEP or key in shape_keys:
                _fail(f"{where}: overrides.{key}", "is set by the sweep for each run; remove it")
            if isinstance(value, dict):
                _fail(f"{where}: overrides.{key}", f"expected a value, got a table {value!r}")
            args += [f"--{key}", toml_value(value)]
    return tuple(args)


def _schedule(data: dict, where: str) -> LearningRateRule:
    table = _table(data, "schedule", SCHEDULE_KEYS, where)
    lr = table.get("lr")
    if lr is not None:
        _positive(lr, f"{where}: schedule.lr")
    lr_params = _positive(table.get("lr_params", 1e6), f"{where}: schedule.lr_params")
    exponent = table.get("lr_exponent", 0.0)
    if not _is_number(exponent):
        _fail(f"{where}: schedule.lr_exponent", f"expected a number, got {exponent!r}")
    fraction = table.get("warmup_fraction", 0.05)
    if not (_is_number(fraction) and 0 <= fraction < 1):
        _fail(f"{where}: schedule.warmup_fraction", f"expected a number in [0, 1), got {fraction!r}")
    return LearningRateRule(lr=lr, lr_params=lr_params, lr_exponent=exponent, warmup_fraction=fraction)


def _run_config(sweep: Sweep, args: list[str] | tuple[str, ...], what: str) -> Config:
    try:
        return load_config(sweep.base, list(args))
    except ConfigError as exc:
        raise SweepError(f"{sweep.path}: {what}: {exc}") from None


def _step_tokens(cfg: Config, seq_len: int) -> int:
    """Tokens per optimizer step, laid out as ``llamalab.train.setup.resolve`` does for one process."""
    per_micro = cfg.batch.micro_batch * seq_len
    return max(1, round(cfg.batch.global_tokens / per_micro)) * per_micro


def check_out_dir(sweep: Sweep) -> None:
    """The output folder can be written and is a sweep folder (or new): checked before anything is launched."""
    out = sweep.out_dir
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        _fail(sweep.key("out_dir"), f"{out} cannot be made: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(sweep.key("out_dir"), f"{out} cannot be written: no write permission on {probe}")
    check_output_folder(out, SWEEP_FILES, "scaling sweep folder", hint="choose another out_dir")


@dataclass(frozen=True)
class SizedShape:
    """A shape resolved against the base config and the prepared data's vocabulary."""

    shape: Shape
    args: ModelArgs
    params: int
    flops_per_token: float
    step_tokens: int
    config: Config  # the base config with the overrides and this shape

    def steps(self, tokens: int) -> int:
        return total_steps(dataclasses.replace(self.config, length=LengthConfig(tokens=tokens)), self.step_tokens)


def plan(sweep: Sweep) -> Plan:
    """Every run of the sweep, sized and checked before anything is launched; prepares the base config's data
    when it is not prepared yet (the vocabulary is part of N)."""
    base_cfg = _run_config(sweep, sweep.overrides, "overrides")
    if not base_cfg.data.val_batches:
        _fail(sweep.key("overrides"), "data.val_batches is 0, but every run needs its final validation loss")
    p = base_cfg.parallel
    if p.dp_replicate * p.dp_shard * p.tp * p.pp != 1:
        _fail(sweep.key("overrides"), "sweep runs are single processes; set parallel.* degrees to 1")
    check_out_dir(sweep)
    from ..data.prepare import load_manifest

    data_dir = prepare_data(base_cfg, Distributed())
    manifest = load_manifest(data_dir)
    available = train_tokens(data_dir)
    sized = sorted((_size(sweep, shape, manifest["vocab_size"]) for shape in sweep.shapes), key=lambda s: s.params)
    runs, left_out = [], []
    for i, budget in enumerate(sweep.budgets):
        label = budget_label(budget)
        here = [s for s in sized if s.shape.budgets is None or label in s.shape.budgets]
        chosen = 0
        for s in here:
            tokens = round(budget / s.flops_per_token)
            steps = s.steps(tokens)
            if steps < sweep.min_steps and s is here[0]:
                _fail(sweep.key(f"budgets[{i}]"),
                      f"{label} FLOPs is too small: the smallest shape, {s.shape.label} ({s.params:,} parameters, "
                      f"{s.flops_per_token:.3g} FLOPs/token), would train {tokens:,} tokens, {steps} optimizer "
                      f"step(s) of {s.step_tokens:,}: fewer than min_steps = {sweep.min_steps}; raise the budget or "
                      "lower min_steps")
            window = sweep.tokens_per_param
            if steps < sweep.min_steps:
                left_out.append(f"{label} {s.shape.label}: {steps} steps < min_steps {sweep.min_steps}")
            elif window and not window[0] <= tokens / s.params <= window[1]:
                left_out.append(f"{label} {s.shape.label}: {tokens / s.params:.3g} tokens/parameter is outside "
                                f"tokens_per_param")
            else:
                chosen += 1
                runs += [_run(sweep, s, budget, seed, tokens, steps, base_cfg.optimizer.lr)
                         for seed in sweep.seeds + sweep.noise.get(label, ())]
        if not chosen:
            _fail(sweep.key(f"budgets[{i}]"), f"no shape is left at {label} FLOPs: "
                  + "; ".join(note for note in left_out if note.startswith(f"{label} ")))
    return Plan(sweep=sweep, runs=tuple(runs), left_out=tuple(left_out), train_tokens=available)


def _size(sweep: Sweep, shape: Shape, vocab_size: int) -> SizedShape:
    """An unbuildable shape is an error naming the key that made it."""
    what = f"{shape.where} ({shape.label})"
    cfg = _run_config(sweep, [*sweep.overrides, *shape.cli_args()], what)
    try:
        args = cfg.model_args(vocab_size=vocab_size)
    except ConfigError as exc:
        raise SweepError(f"{sweep.path}: {what}: {exc}") from None
    seq_len = cfg.data.seq_len or args.max_seq_len
    return SizedShape(shape=shape, args=args, params=counted_params(args, sweep.accounting),
                      flops_per_token=flops_per_token(args, seq_len, sweep.accounting),
                      step_tokens=_step_tokens(cfg, seq_len), config=cfg)


def _run(sweep: Sweep, sized: SizedShape, budget: float, seed: int, tokens: int, steps: int,
         base_lr: float) -> PlannedRun:
    name = f"{budget_label(budget)}-{sized.shape.label}-s{seed}"
    out_dir = sweep.out_dir / "runs" / name
    lr = sweep.schedule.peak_lr(sized.params, base_lr)
    warmup = sweep.schedule.warmup_steps(steps)
    overrides = (*sweep.overrides, *sized.shape.cli_args(), "--run.out_dir", str(out_dir), "--run.name", name,
                 "--run.seed", str(seed), "--optimizer.lr", repr(lr), "--schedule.warmup_steps", str(warmup),
                 "--length.tokens", str(tokens), "--length.steps", "0", "--length.max_minutes", "0",
                 "--logging.progress", "false")
    config = _run_config(sweep, [*overrides, "--checkpoint.resume", "auto"], name)
    check_output_folder(out_dir, RUN_FILES, "run folder", hint="move it away; the sweep trains there")
    return PlannedRun(name=name, budget=budget, seed=seed, shape=sized.shape, args=sized.args, params=sized.params,
                      flops_per_token=sized.flops_per_token, tokens=tokens, steps=steps,
                      step_tokens=sized.step_tokens, lr=lr, warmup_steps=warmup, out_dir=out_dir,
                      overrides=overrides, config=config)
