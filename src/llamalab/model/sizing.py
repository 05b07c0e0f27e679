"""Model size from a compute budget: the width/depth family, the compute convention and the scaling law.

- **The family** (``Family``): one knob, the width; ``n_layers = max(1, round(dim / aspect_ratio))`` and
  ``n_heads = dim / head_dim``. Scaling sweeps (``[family]``) and budget-sized training configs
  (``[model.family]``) use the same rule.
- **The compute convention**: ``counted_params`` (every parameter, or all but the token-embedding and output
  tables) and ``flops_per_token`` = 6N + 12 n_layers dim seq (forward and backward through the weights, plus
  attention's score and value products), as the sweeps size their runs.
- **The law** (``ScalingLaw``): N_opt(C) = G C^a, D_opt(C) = C / flops_per_token(N_opt), read from a JSON file
  with its provenance; ``llamalab/assets/scaling_law.json`` ships with the package.
- **The choosers**: the family shape nearest the law's optimum (in log N) for a FLOP budget, a token budget
  (the N whose compute-optimal D is that many tokens) or a time budget (the shape whose N is the optimum for
  the compute it can do in that time, from a throughput measured on a few shapes).

Nothing here trains or times anything: the time chooser takes the measurement as a function.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .args import ConfigError, ModelArgs

ACCOUNTINGS = ("total", "non_embedding")
LAW_ASSET = Path(__file__).resolve().parents[1] / "assets" / "scaling_law.json"
LAW_FORMAT = "llamalab scaling law 1"
FAMILY_KEYS = ("dims", "aspect_ratio", "head_dim")
DEFAULT_DIMS = tuple(range(32, 513, 32))  # 32 ... 512: 1 to 16 layers, 16-dimensional heads


def counted_params(args: ModelArgs, accounting: str) -> int:
    """N of the compute convention: every parameter, embedding and output tables included ("total", Pearce &
    Song 2024, which reconciles Kaplan's and Chinchilla's exponents), or without those two tables
    ("non_embedding", Kaplan et al. 2020)."""
    total = args.num_params()
    return total if accounting == "total" else total - 2 * args.vocab_size * args.dim


def flops_per_token(args: ModelArgs, seq_len: int, accounting: str) -> float:
    """6N + 12 n_layers dim seq: forward and backward through the weights plus attention's score and value
    products."""
    return 6.0 * counted_params(args, accounting) + 12.0 * args.n_layers * args.dim * seq_len


def family_shape(dim: int, aspect_ratio: float, head_dim: int) -> tuple[int, int]:
    """(n_layers, n_heads) of the family's shape of width ``dim``."""
    return max(1, round(dim / aspect_ratio)), dim // head_dim


def shape_label(args: ModelArgs) -> str:
    """``d64l2h4``, as sweeps name their runs."""
    return f"d{args.dim}l{args.n_layers}h{args.n_heads}"


@dataclass(frozen=True)
class Family:
    """Widths ``dims``; depth ``max(1, round(dim / aspect_ratio))``; heads of ``head_dim``."""

    dims: tuple[int, ...] = DEFAULT_DIMS
    aspect_ratio: float = 32.0
    head_dim: int = 16

    def shape(self, dim: int) -> dict:
        n_layers, n_heads = family_shape(dim, self.aspect_ratio, self.head_dim)
        return {"dim": dim, "n_layers": n_layers, "n_heads": n_heads}

    def to_table(self) -> dict:
        return {"dims": list(self.dims), "aspect_ratio": self.aspect_ratio, "head_dim": self.head_dim}

    @classmethod
    def from_table(cls, table: dict, key: str = "model.family") -> Family:
        """A family from a config table; a mistake is a ``ConfigError`` naming ``key.name``."""
        unknown = sorted(set(table) - set(FAMILY_KEYS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key; [{key.split(': ')[-1]}] has {list(FAMILY_KEYS)}")
        dims = table.get("dims", list(DEFAULT_DIMS))
        if not isinstance(dims, (list, tuple)) or not dims:
            raise ConfigError(f"{key}.dims: expected a non-empty list of model widths, got {dims!r}")
        aspect = table.get("aspect_ratio", cls.aspect_ratio)
        if not (_number(aspect) and aspect > 0):
            raise ConfigError(f"{key}.aspect_ratio: expected a positive number, got {aspect!r}")
        head_dim = table.get("head_dim", cls.head_dim)
        if not (_integer(head_dim) and head_dim > 0):
            raise ConfigError(f"{key}.head_dim: expected a positive integer, got {head_dim!r}")
        for i, dim in enumerate(dims):
            if not (_integer(dim) and dim > 0):
                raise ConfigError(f"{key}.dims[{i}]: expected a positive integer, got {dim!r}")
            if dim % head_dim:
                raise ConfigError(f"{key}.dims[{i}]: {dim} is not a multiple of head_dim {head_dim}")
            if dim in dims[:i]:
                raise ConfigError(f"{key}.dims[{i}]: {dim} is given twice")
        return cls(dims=tuple(sorted(dims)), aspect_ratio=float(aspect), head_dim=head_dim)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------------ the law


@dataclass(frozen=True)
class ScalingLaw:
    """N_opt(C) = 10^log10_coefficient * C^exponent, with N and C counted as ``accounting`` says."""

    exponent: float
    log10_coefficient: float
    accounting: str = "total"
    provenance: dict = field(default_factory=dict)
    path: Path | None = None

    def n_opt(self, flops: float) -> float:
        return 10.0**self.log10_coefficient * flops**self.exponent

    def compute_for(self, params: float) -> float:
        """The budget C whose optimal size is ``params`` (the law inverted)."""
        return (params / 10.0**self.log10_coefficient) ** (1.0 / self.exponent)

    def describe(self) -> str:
        source = self.provenance.get("summary") or self.provenance.get("source", "no provenance given")
        where = self.path if self.path is not None else "(built in)"
        return (f"N_opt = {10.0**self.log10_coefficient:.4g} C^{self.exponent:.4g} ({self.accounting} parameters), "
                f"from {where}: {source}")

    def to_json(self) -> dict:
        return law_document(self.exponent, self.log10_coefficient, self.accounting, self.provenance)

    @classmethod
    def load(cls, path: str | Path | None = None, key: str = "model.law") -> ScalingLaw:
        """The law in ``path`` (default: the one shipped with llamalab); a bad file is a ``ConfigError``."""
        path = Path(path) if path else LAW_ASSET
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{key}: {path}: no such file") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{key}: {path}: not a readable JSON file ({exc})") from None
        law = data.get("n_opt") if isinstance(data, dict) else None
        if not isinstance(law, dict):
            raise ConfigError(f"{key}: {path}: no n_opt law (expected {{\"n_opt\": {{\"exponent\": ..., "
                              "\"log10_coefficient\": ...}, \"accounting\": ...}})")
        exponent, coefficient = law.get("exponent"), law.get("log10_coefficient")
        if not (_number(exponent) and 0 < exponent < 1):
            raise ConfigError(f"{key}: {path}: n_opt.exponent must be a number in (0, 1), got {exponent!r}")
        if not _number(coefficient):
            raise ConfigError(f"{key}: {path}: n_opt.log10_coefficient must be a number, got {coefficient!r}")
        accounting = data.get("accounting")
        if accounting not in ACCOUNTINGS:
            raise ConfigError(f"{key}: {path}: accounting must be one of {list(ACCOUNTINGS)}, got {accounting!r}")
        return cls(float(exponent), float(coefficient), accounting, dict(data.get("provenance") or {}), path)


def law_document(exponent: float, log10_coefficient: float, accounting: str, provenance: dict,
                 exponent_interval: Sequence[float] | None = None) -> dict:
    """The JSON a ``ScalingLaw`` is read from (``llamalab/assets/scaling_law.json``'s layout)."""
    interval = exponent_interval if exponent_interval is not None else provenance.get("exponent_interval")
    return {
        "format": LAW_FORMAT,
        "law": "N_opt(C) = 10^log10_coefficient * C^exponent; D_opt(C) = C / flops_per_token(N_opt)",
        "flops_per_token": "6N + 12 n_layers dim seq_len, N counted as accounting says",
        "n_opt": {"exponent": exponent, "log10_coefficient": log10_coefficient,
                  "exponent_interval": None if interval is None else list(interval)},
        "accounting": accounting,
        "provenance": provenance,
    }


# ------------------------------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Candidate:
    """One family shape resolved against the rest of the model settings."""

    args: ModelArgs
    params: int  # N as the law's accounting counts it
    flops_per_token: float
    where: str  # the key that made it, e.g. "model.family.dims[2]"

    @property
    def label(self) -> str:
        return shape_label(self.args)


def candidates(shapes: Sequence[tuple[str, ModelArgs]], seq_len: int, accounting: str) -> list[Candidate]:
    """``(where, args)`` pairs as candidates, smallest N first."""
    found = [Candidate(args, counted_params(args, accounting), flops_per_token(args, seq_len, accounting), where)
             for where, args in shapes]
    return sorted(found, key=lambda c: c.params)


@dataclass(frozen=True)
class Choice:
    """The shape a budget buys, with the numbers that chose it."""

    candidate: Candidate
    key: str  # the budget's config key: length.flops, length.tokens, length.steps or length.max_minutes
    flops: float  # the run's compute C (for a time budget: predicted)
    tokens: float  # the run's tokens D (for a time budget: predicted)
    n_opt: float  # the law's optimal N for that budget
    seconds: float | None = None  # time budget: training seconds left after measuring
    measure_seconds: float = 0.0  # time budget: spent measuring throughput
    measured: tuple[tuple[str, float], ...] = ()  # time budget: (shape label, tokens/s) of each measured shape
    tokens_per_s: float | None = None  # time budget: predicted for the chosen shape
    notes: tuple[str, ...] = ()  # warnings (the optimum outside the family)

    @property
    def args(self) -> ModelArgs:
        return self.candidate.args


def _nearest(cands: Sequence[Candidate], n: float) -> Candidate:
    return min(cands, key=lambda c: abs(math.log(c.params / n)))


def _too_small(cands: Sequence[Candidate], n: float, key: str, budget: str) -> ConfigError:
    small = cands[0]
    return ConfigError(f"{key}: {budget} is too small for model.family: the law's compute-optimal model has "
                       f"{n:,.0f} parameters, fewer than the family's smallest shape, {small.label} "
                       f"({small.params:,} parameters, {small.where}); add smaller model.family.dims or raise "
                       "the budget")


def _above(cands: Sequence[Candidate], n: float) -> tuple[str, ...]:
    big = cands[-1]
    if n <= big.params:
        return ()
    return (f"the law's optimum, {n:,.0f} parameters, is above the family's largest shape {big.label} "
            f"({big.params:,}); using it (add larger model.family.dims to follow the law)",)


@dataclass(frozen=True)
class DataLimit:
    """The training tokens the data holds, and the most passes over them a budget-sized run should make
    (``model.max_epochs``; 0: no limit)."""

    tokens: int | None = None
    max_epochs: float = 0.0

    def within(self, cands: Sequence[Candidate], pick: int, tokens_of: Callable[[int], float]) -> tuple[int, str]:
        """``pick``, or, when it would train more than ``max_epochs`` passes over the data, the smallest larger
        shape that does not (the largest when none is small enough), with a note saying so.

        A repeated token is worth less with each pass: Muennighoff et al. (2023, "Scaling Data-Constrained
        Language Models") fit its value as decaying like exp(-(epoch - 1) / 15.4), so past about 16 epochs more
        passes buy little, and the compute is better spent on parameters. ``tokens_of(i)`` is what shape ``i``
        would train.
        """
        limit = (self.tokens or 0) * self.max_epochs
        if not limit or tokens_of(pick) <= limit:
            return pick, ""
        fits = [i for i in range(pick + 1, len(cands)) if tokens_of(i) <= limit]
        grown = fits[0] if fits else len(cands) - 1

        def epochs(i: int) -> str:
            return f"{tokens_of(i) / self.tokens:.1f} epochs"

        which = ("the smallest family shape within it" if fits
                 else "the family's largest shape; none is within it (add larger model.family.dims)")
        return grown, (f"data-limited: the law's choice {cands[pick].label} would train {epochs(pick)} of the "
                       f"{self.tokens:,} training tokens, more than model.max_epochs = {self.max_epochs:g}; "
                       f"took {cands[grown].label} ({epochs(grown)}), {which}: past about 16 epochs a repeated "
                       "token is worth little (Muennighoff et al. 2023), so the compute goes into parameters")


def choose_for_flops(cands: Sequence[Candidate], law: ScalingLaw, flops: float, key: str = "length.flops",
                     data: DataLimit = DataLimit()) -> Choice:
    """The shape nearest N_opt(C) in log N (or a larger one within ``data``'s epochs); it trains D = C / its
    FLOPs per token."""
    n = law.n_opt(flops)
    if n < cands[0].params:
        raise _too_small(cands, n, key, f"{flops:.3g} FLOPs")
    index, limited = data.within(cands, cands.index(_nearest(cands, n)), lambda i: flops / cands[i].flops_per_token)
    pick = cands[index]
    notes = _above(cands, n) + ((limited,) if limited else ())
    return Choice(pick, key, flops, flops / pick.flops_per_token, n, notes=notes)


def optimal_tokens(law: ScalingLaw, cand: Candidate) -> float:
    """D_opt of a shape: the tokens the law trains it on at the budget whose optimum it is."""
    return law.compute_for(cand.params) / cand.flops_per_token


def choose_for_tokens(cands: Sequence[Candidate], law: ScalingLaw, tokens: float,
                      key: str = "length.tokens") -> Choice:
    """The N whose compute-optimal D is ``tokens`` (D_opt(N) inverted, piecewise log-linear between the family's
    shapes; D_opt ∝ N^((1-a)/a) beyond them), then the shape nearest it in log N."""
    points = [(math.log(optimal_tokens(law, c)), math.log(c.params)) for c in cands]
    x = math.log(tokens)
    slope = law.exponent / (1.0 - law.exponent)  # d log N / d log D of the pure power law
    if x < points[0][0] or len(points) == 1:
        log_n = points[0][1] + (x - points[0][0]) * slope
    elif x > points[-1][0]:
        log_n = points[-1][1] + (x - points[-1][0]) * slope
    else:
        i = max(j for j in range(len(points) - 1) if points[j][0] <= x)
        (x0, y0), (x1, y1) = points[i], points[i + 1]
        log_n = y0 + (x - x0) * (y1 - y0) / (x1 - x0) if x1 > x0 else y0
    n = math.exp(log_n)
    if n < cands[0].params * (1 - 1e-9):
        raise _too_small(cands, n, key, f"{tokens:,.0f} tokens")
    pick = _nearest(cands, n)
    return Choice(pick, key, tokens * pick.flops_per_token, tokens, n, notes=_above(cands, n))


def choose_for_time(cands: Sequence[Candidate], law: ScalingLaw, seconds: float,
                    measure: Callable[[Candidate], float], key: str = "length.max_minutes",
                    clock: Callable[[], float] = time.perf_counter, data: DataLimit = DataLimit()) -> Choice:
    """The shape whose N is nearest the law's optimum for the compute it can do in ``seconds`` (or a larger one,
    when that one would make more than ``data``'s epochs).

    ``measure(candidate)`` gives training tokens/s; it is called on the smallest shape (the quickest to
    measure), then on the shape that comes out best (the one the run will train, so its own rate predicts the
    run's tokens) or, when that is the smallest, on the next one (how the rate grows with N): twice in all. The FLOP rate (tokens/s x FLOPs per token) of
    an unmeasured shape is interpolated in log N between the measured ones (held at the nearest one's outside
    them): small shapes, dominated by per-step overhead, reach fewer FLOP/s. The time spent measuring comes out
    of ``seconds``. When the law's optimum falls below the smallest shape (a slow or busy machine), the
    nearest shape is still used, with a note: the same config should not fail on a slower machine.
    """
    start = clock()
    logs = [math.log(c.params) for c in cands]
    rates: dict[int, float] = {}  # candidate index -> measured tokens/s
    measured: list[tuple[str, float]] = []

    def probe(i: int) -> None:
        tokens_per_s = measure(cands[i])
        if not (tokens_per_s > 0 and math.isfinite(tokens_per_s)):
            raise ConfigError(f"{key}: measuring {cands[i].label} gave {tokens_per_s!r} tokens/s")
        rates[i] = tokens_per_s
        measured.append((cands[i].label, tokens_per_s))

    def flop_rate(i: int) -> float:
        known = sorted((logs[j], math.log(rates[j] * cands[j].flops_per_token)) for j in rates)
        x = min(max(logs[i], known[0][0]), known[-1][0])
        for (x0, y0), (x1, y1) in zip(known, known[1:]):
            if x0 <= x <= x1 and x1 > x0:
                return math.exp(y0 + (x - x0) * (y1 - y0) / (x1 - x0))
        return math.exp(known[0][1] if x <= known[0][0] else known[-1][1])

    def best(train_seconds: float) -> tuple[int, str]:
        nearest = min(range(len(cands)),
                      key=lambda i: abs(logs[i] - math.log(law.n_opt(flop_rate(i) * train_seconds))))
        return data.within(cands, nearest, lambda i: flop_rate(i) * train_seconds / cands[i].flops_per_token)

    probe(0)
    pick, limited = best(seconds - (clock() - start))
    if len(cands) > 1:
        probe(pick if pick not in rates else 1)
        pick, limited = best(seconds - (clock() - start))
    spent = clock() - start
    left = seconds - spent
    if left <= 0:
        raise ConfigError(f"{key}: the time budget ({seconds:.1f} s) was used up measuring throughput "
                          f"({spent:.1f} s); raise it or give length.tokens or length.flops instead")
    flops = flop_rate(pick) * left
    n = law.n_opt(flops)
    notes = _above(cands, n)
    if n < cands[0].params:
        notes = (f"{left:.0f} s of training on this machine is too little for model.family: the law's optimum for "
                 f"{cands[pick].label}'s compute, {n:,.0f} parameters, is below the smallest shape "
                 f"{cands[0].label} ({cands[0].params:,} parameters, {cands[0].where}); using {cands[pick].label}, "
                 "the nearest (add smaller model.family.dims, or give more time)",)
    notes += (limited,) if limited else ()
    tokens_per_s = flops / left / cands[pick].flops_per_token
    return Choice(cands[pick], key, flops, tokens_per_s * left, n, seconds=left, measure_seconds=spent,
                  measured=tuple(measured), tokens_per_s=tokens_per_s, notes=notes)
