"""Training configuration: one TOML file, one dataclass per section, ``--section.key value`` overrides.

Every key is checked: an unknown section or key, or a value of the wrong type, raises ``ConfigError`` naming
``section.key`` and what was expected, so a typo never silently falls back to a default.

    cfg = load_config("configs/demo.toml", ["--optimizer.lr", "1e-3", "--length.steps=200"])
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .fs import read_toml
from .model.args import ConfigError, ModelArgs, get_preset
from .model.dropout import check_dropout
from .model.sizing import Family

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class RunConfig:
    """Where outputs go and what seeds the run."""

    name: str = "run"
    out_dir: str = "runs/run"  # metrics, TensorBoard events, plot, checkpoints and the final model
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda"
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run


@dataclass
class ModelConfig:
    """``preset`` names a shape in ``llamalab.model.PRESETS``; any ``ModelArgs`` field overrides it.

    ``vocab_size`` left unset is taken from the prepared data's tokenizer. ``size = "budget"``: ``dim``,
    ``n_layers`` and ``n_heads`` are chosen when the run is set up, from the ``[length]`` budget, as the family
    shape (``[model.family]``) the scaling law (``law``: a JSON file; "" = the one shipped with llamalab) calls
    compute-optimal, or a larger one where that would make more than ``max_epochs`` passes over the training
    data (``llamalab.train.setup``; docs/training.md).
    """

    preset: str = "demo"
    overrides: dict = field(default_factory=dict)
    size: Literal["fixed", "budget"] = "fixed"
    family: Family | None = None  # size = "budget": the shapes to choose from
    law: str = ""  # size = "budget": a scaling-law JSON file; "" = llamalab/assets/scaling_law.json
    max_epochs: float = 16.0  # size = "budget": a larger family shape rather than more passes over the data
    dropout: float = 0.0  # residual and embedding dropout in training (``llamalab.model.dropout``); LLaMA has none


@dataclass
class DataConfig:
    prepared: str = ""  # a prepared folder (``llamalab data prepare``); "" = the recipe's default output
    recipe: str = ""  # data recipe TOML used to prepare it when missing; "" = built-in default corpus
    seq_len: int = 0  # 0 = the model's max_seq_len
    val_batches: int = 20  # held-out batches per validation


@dataclass
class OptimizerConfig:
    """AdamW as in the paper: beta1 0.9, beta2 0.95, weight decay 0.1 on matrices, clipping at 1.0."""

    lr: float = 3.0e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global L2 norm; 0 disables


@dataclass
class ScheduleConfig:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` x the peak learning rate."""

    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1


@dataclass
class BatchConfig:
    """``global_tokens`` per optimizer step over all data-parallel ranks; accumulation is derived."""

    global_tokens: int = 4 * 1024 * 1024
    micro_batch: int = 8  # sequences per forward/backward on one rank


@dataclass
class LengthConfig:
    """Stop after ``steps`` optimizer steps or ``tokens`` tokens (whichever is set; steps wins).

    ``max_minutes`` > 0 bounds the wall-clock time: the cosine schedule then runs on the larger of the
    step fraction and the time fraction, so a timed run still decays to its final learning rate.
    """

    steps: int = 0
    tokens: int = 0
    flops: float = 0.0  # training FLOPs (6N + attention per token, as scaling sweeps count them); tokens = flops / that
    max_minutes: float = 0.0


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints; 0 = only at the end
    keep: int = 3  # newest complete checkpoints kept
    resume: str = ""  # "" = fresh start, "auto" = newest complete checkpoint in out_dir, or a path
    save_final: bool = True  # also write a native inference folder (``out_dir/final``) at the end


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metric records
    val_every: int = 0  # steps between validations; 0 = only at the end
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end
    peak_tflops: float = 0.0  # MFU denominator; 0 = measure with a short matmul probe


@dataclass
class PrecisionConfig:
    """``bf16``: bf16 autocast over fp32 master weights and optimizer state; ``fp32``: no autocast.

    ``auto``: bf16 where bf16 matmuls are faster than fp32 (GPUs; CPUs with AVX-512 BF16 or AMX), else fp32 --
    on a CPU without them a bf16 matmul falls back to a slow path.
    """

    mode: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass
class CompileConfig:
    enabled: bool = False


@dataclass
class ActivationCheckpointConfig:
    mode: Literal["none", "selective", "full"] = "none"


@dataclass
class ParallelConfig:
    """Degrees of the parallel layout (implemented in ``llamalab.parallel``); their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 1


@dataclass
class FinetuneConfig:
    """``llamalab finetune``: supervised instruction tuning of the native checkpoint ``base`` (docs/finetune.md).

    The model's shape and tokenizer come from ``base``; ``[model]`` stays unset. ``data.seq_len`` (0 = the
    base's ``max_seq_len``) bounds an example: longer ones are truncated or dropped (``overlong``).
    """

    base: str = ""  # a native checkpoint folder (required)
    method: Literal["full", "lora"] = "lora"
    data: str = ""  # instruction data: a JSON array or JSONL file (required)
    format: Literal["alpaca", "chat"] = "alpaca"  # instruction/input/output records, or OpenAI-style messages
    template: Literal["default", "alpaca", "plain", "llama2-chat"] = "default"  # default: the format's own
    train_on_prompt: bool = False  # also take the loss on prompt tokens (default: the response's only)
    validation_fraction: float = 0.05  # examples held out (by a hash of each record) for the validation loss
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = False  # fill each training row with as many whole examples as fit (no cross-example mask)
    strict: bool = False  # stop at the first bad record instead of counting and skipping it
    merge: bool = True  # LoRA: also write out_dir/final, a native model with the adapters folded in


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # Meta's names of the adaptable matrices


@dataclass
class LoraConfig:
    """LoRA (Hu et al., 2021) for ``finetune.method = "lora"``: ``W x + scale * B A x`` with A (rank x in),
    B (out x rank); scale = alpha / rank, or alpha / sqrt(rank) with ``rslora`` (Kalajdzievski, 2023)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list | str = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])  # or "wq,wv"
    rslora: bool = False
    # the frozen weights' storage; the adapters stay fp32. "int8": every linear layer's weight int8 with
    # per-output-channel scales (llamalab.inference.quantize), the embedding and norms fp32 (LoRA only)
    base_dtype: Literal["fp32", "bf16", "int8"] = "fp32"

    def targets(self) -> list[str]:
        names = self.target_modules
        return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        """Nested plain dict in the TOML layout (model overrides flattened next to ``preset``)."""
        out = dataclasses.asdict(self)
        out["model"] = {"preset": self.model.preset, **self.model.overrides}
        if self.model.size != "fixed":
            out["model"].update(size=self.model.size, law=self.model.law, max_epochs=self.model.max_epochs,
                                family=self.model.family.to_table())
        if self.model.dropout:  # written only when used, as length.flops below
            out["model"]["dropout"] = self.model.dropout
        if not self.length.flops:  # written only when used: config.json of other runs is as it was
            del out["length"]["flops"]
        return out

    def model_args(self, vocab_size: int | None = None, shape: dict | None = None) -> ModelArgs:
        """The preset's shape with the overrides; ``vocab_size`` fills in when the config does not set it.
        ``shape`` (dim, n_layers, n_heads) is one of a budget-sized config's family shapes; without it, such a
        config, whose shape is chosen only when the run is set up, gives its largest (an upper bound, as for
        ``llamalab plan``)."""
        if self.model.size == "budget" and shape is None:
            shape = self.model.family.shape(max(self.model.family.dims))
        fields = get_preset(self.model.preset).args.to_dict()
        if vocab_size is not None and "vocab_size" not in self.model.overrides:
            fields["vocab_size"] = vocab_size
        fields.update(self.model.overrides)
        fields.update(shape or {})
        try:
            return ModelArgs(**fields)
        except ConfigError as exc:
            raise ConfigError(f"[model]: {exc}") from None


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_HINTS_CACHE: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table", list: "a list", type(None): "unset"}.get(tp, str(tp))


def _coerce(key: str, value, tp):
    """``value`` checked against the annotation ``tp`` (ints are accepted for floats); else ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is type(None):
        if value is None:
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


SIZED_BY_BUDGET = ("dim", "n_layers", "n_heads")  # what model.size = "budget" chooses
MODEL_SETTINGS = ("preset", "size", "family", "law", "max_epochs", "dropout")  # [model] keys besides ModelArgs'


def _build_model_section(table: dict, where: str) -> ModelConfig:
    hints = typing.get_type_hints(ModelArgs)
    preset = table.get("preset", ModelConfig.preset)
    if not isinstance(preset, str):
        raise ConfigError(f"{where}model.preset: expected a string, got {preset!r}")
    try:
        get_preset(preset)
    except ConfigError as exc:
        raise ConfigError(f"{where}model.preset: {exc}") from None
    size = _coerce(f"{where}model.size", table.get("size", "fixed"), Literal["fixed", "budget"])
    law = _coerce(f"{where}model.law", table.get("law", ""), str)
    max_epochs = _coerce(f"{where}model.max_epochs", table.get("max_epochs", ModelConfig.max_epochs), float)
    if not max_epochs >= 0:
        raise ConfigError(f"{where}model.max_epochs: expected a number of epochs >= 0 (0: no limit), "
                          f"got {max_epochs!r}")
    dropout = check_dropout(_coerce(f"{where}model.dropout", table.get("dropout", 0.0), float),
                            f"{where}model.dropout")
    family = table.get("family", {})
    if not isinstance(family, dict):
        raise ConfigError(f"{where}model.family: expected a [model.family] table, got {family!r}")
    family = {**family, **{k.split(".", 1)[1]: v for k, v in table.items() if k.startswith("family.")}}
    overrides = {}
    for key, value in table.items():
        if key in MODEL_SETTINGS or key.startswith("family."):
            continue
        if key not in hints:
            raise ConfigError(f"{where}model.{key}: unknown key; expected {', '.join(MODEL_SETTINGS)} or one of "
                              f"{sorted(hints)}")
        if size == "budget" and key in SIZED_BY_BUDGET:
            raise ConfigError(f"{where}model.{key}: chosen by model.size = 'budget'; remove it, or set "
                              "model.size = 'fixed'")
        overrides[key] = _coerce(f"{where}model.{key}", value, hints[key])
    family = Family.from_table(family, f"{where}model.family")  # checked even when unused (size = "fixed")
    return ModelConfig(preset=preset, overrides=overrides, size=size, law=law,
                       family=family if size == "budget" else None, max_epochs=max_epochs, dropout=dropout)


def config_from_dict(data: dict, where: str = "") -> Config:
    """A ``Config`` from a nested dict (the TOML layout); ``where`` prefixes error messages (a file name)."""
    sections = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{where}[{name}]: unknown section; expected one of {sorted(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}{name}: expected a [{name}] table, got {table!r}")
        cls = SECTIONS[name]
        if cls is ModelConfig:
            sections[name] = _build_model_section(table, where)
            continue
        hints = _hints(cls)
        values = {}
        for key, value in table.items():
            if key not in hints:
                raise ConfigError(f"{where}{name}.{key}: unknown key; [{name}] has {sorted(hints)}")
            values[key] = _coerce(f"{where}{name}.{key}", value, hints[key])
        sections[name] = cls(**values)
    cfg = Config(**sections)
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where: str = "") -> None:
    """Range checks that the types alone do not express."""
    positive = [("batch.global_tokens", cfg.batch.global_tokens), ("batch.micro_batch", cfg.batch.micro_batch),
                ("optimizer.lr", cfg.optimizer.lr), ("logging.every", cfg.logging.every),
                ("checkpoint.keep", cfg.checkpoint.keep), ("run.max_bad_steps", cfg.run.max_bad_steps)]
    positive += [(f"parallel.{k}", getattr(cfg.parallel, k))
                 for k in ("dp_replicate", "dp_shard", "tp", "pp", "pp_microbatches")]
    positive += [("lora.rank", cfg.lora.rank), ("lora.alpha", cfg.lora.alpha)]
    for key, value in positive:
        if not value > 0:
            raise ConfigError(f"{where}{key}: must be positive, got {value!r}")
    non_negative = [("length.steps", cfg.length.steps), ("length.tokens", cfg.length.tokens),
                    ("length.max_minutes", cfg.length.max_minutes), ("length.flops", cfg.length.flops),
                    ("schedule.warmup_steps", cfg.schedule.warmup_steps),
                    ("checkpoint.every", cfg.checkpoint.every), ("logging.val_every", cfg.logging.val_every),
                    ("data.seq_len", cfg.data.seq_len), ("data.val_batches", cfg.data.val_batches),
                    ("optimizer.weight_decay", cfg.optimizer.weight_decay), ("optimizer.grad_clip", cfg.optimizer.grad_clip),
                    ("logging.peak_tflops", cfg.logging.peak_tflops)]
    for key, value in non_negative:
        if value < 0:
            raise ConfigError(f"{where}{key}: must be >= 0, got {value!r}")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"{where}schedule.min_lr_ratio: must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg.optimizer, key) < 1.0:
            raise ConfigError(f"{where}optimizer.{key}: must be in [0, 1), got {getattr(cfg.optimizer, key)}")
    if not (cfg.length.steps or cfg.length.tokens or cfg.length.flops or cfg.length.max_minutes):
        raise ConfigError(f"{where}length: set steps, tokens, flops or max_minutes")
    for key, value in (("finetune.validation_fraction", cfg.finetune.validation_fraction),
                       ("lora.dropout", cfg.lora.dropout)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{where}{key}: must be in [0, 1), got {value}")
    targets = cfg.lora.targets()
    if not targets or any(t not in LORA_TARGETS for t in targets):
        raise ConfigError(f"{where}lora.target_modules: expected some of {', '.join(LORA_TARGETS)} (Meta's names), "
                          f"got {cfg.lora.target_modules!r}")
    if cfg.lora.base_dtype == "int8" and cfg.finetune.method != "lora":
        raise ConfigError(f"{where}lora.base_dtype: 'int8' freezes the base, so it needs finetune.method = 'lora' "
                          f"(full fine-tuning trains every weight in fp32); got method {cfg.finetune.method!r}")
    if cfg.run.device not in ("auto", "cpu", "cuda") and not cfg.run.device.startswith("cuda:"):
        raise ConfigError(f"{where}run.device: expected 'auto', 'cpu' or 'cuda', got {cfg.run.device!r}")
    if cfg.model.size == "budget":  # every shape it may choose must build
        for i, dim in enumerate(cfg.model.family.dims):
            try:
                cfg.model_args(shape=cfg.model.family.shape(dim))
            except ConfigError as exc:
                raise ConfigError(f"{where}model.family.dims[{i}]: dim {dim}: {exc}") from None
    else:
        cfg.model_args()  # the model section must build (vocab_size may still come from the tokenizer)


def parse_value(text: str):
    """A command-line value read as a TOML value (``3``, ``1e-3``, ``true``, ``"x"``), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge ``--section.key value`` / ``--section.key=value`` pairs into the nested dict ``data``."""
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"override {arg}: missing value")
            key, text = arg[2:], items[i + 1]
            i += 2
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"override --{key}: unknown section {section!r}; expected one of {sorted(SECTIONS)}")
        data.setdefault(section, {})[name] = parse_value(text)
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or start from defaults when ``path`` is None) and apply the overrides."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        data = read_toml(path, "config file", ConfigError)
    apply_overrides(data, list(overrides))
    return config_from_dict(data, where)
