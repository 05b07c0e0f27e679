"""The fits of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models") and the LLaMA trade-off.

- Approach 2 (IsoFLOP profiles): at each compute budget a parabola of the loss in log N gives the loss-optimal
  size N_opt(C) (and one in log D gives D_opt(C)); power laws N_opt ∝ C^a, D_opt ∝ C^b are fitted in log space,
  with bootstrap intervals (runs resampled within each budget).
- Approach 3 (a parametric loss): L(N, D) = E + A / N^alpha + B / D^beta fitted as in their Appendix D: the
  Huber loss (delta 1e-3) between log L and LSE(a - alpha log N, b - beta log D, e), A = e^a, B = e^b, E = e^e,
  minimised with L-BFGS from every point of a grid of starts, keeping the best.
- The LLaMA trade-off (Touvron et al. 2023, section 1; Sardana et al. 2024): for a target loss, the
  compute-optimal model against smaller models trained on more tokens, and the total cost of training plus
  serving 2N FLOPs per token.

Compute is ``flops_per_token(N) * D``; ``flops_per_token`` comes from the sweep's runs (``FlopsPerToken``), so
the fits count compute exactly as the runs were sized.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (10.0, 90.0)  # the interval Hoffmann et al. give in their Table 2
HUBER_DELTA = 1e-3
# L-BFGS runs from the best points of the grid (ranked by the loss there): all 4,500 take ~20 s, and on three
# noise draws of tests/scaling/test_fits.py's synthetic sweep the best 20, 50, 200 and all 4,500 starts found the
# same optimum (to 1e-4).
STARTS = 200
HOFFMANN_GRID = {  # Appendix D's initialisations
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5), "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
}


def one_blas_thread():
    """Tiny BLAS/LAPACK calls (L-BFGS-B's, least squares on a few points) on several OpenBLAS threads ran 20-70x
    slower than on one on 2 busy cores; threadpoolctl, where installed (scikit-learn brings it), limits them."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - slower, same results
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class FlopsPerToken:
    """Training FLOPs per token as a function of N, read off the sweep's shapes: 6N plus the attention term,
    which depends on the shape, interpolated in log N (and held at the nearest shape's ratio outside them)."""

    def __init__(self, params, flops_per_token):
        params, flops = np.asarray(params, float), np.asarray(flops_per_token, float)
        order = np.argsort(params)
        self.log_n, self.ratio = np.log(params[order]), flops[order] / params[order]

    def __call__(self, n):
        return n * np.interp(np.log(n), self.log_n, self.ratio)


# ------------------------------------------------------------------------------------------------ Approach 2


@dataclass(frozen=True)
class Parabola:
    """loss = c2 x^2 + c1 x + c0 in x = log10(size)."""

    coeffs: tuple[float, float, float]

    @property
    def x_opt(self) -> float:
        return -self.coeffs[1] / (2 * self.coeffs[0])

    @property
    def size_opt(self) -> float:
        return 10**self.x_opt

    @property
    def loss_opt(self) -> float:
        return float(np.polyval(self.coeffs, self.x_opt))

    def __call__(self, size):
        return np.polyval(self.coeffs, np.log10(size))


def fit_parabola(sizes, losses) -> Parabola | None:
    """None when there are fewer than 3 distinct sizes or the curve opens downwards (no minimum)."""
    x = np.log10(np.asarray(sizes, float))
    if len(np.unique(x)) < 3:
        return None
    coeffs = np.polyfit(x, np.asarray(losses, float), 2)
    return Parabola(tuple(coeffs)) if coeffs[0] > 0 else None


@dataclass(frozen=True)
class PowerLaw:
    """y = 10^intercept x^exponent, fitted as a line in log10-log10."""

    exponent: float
    intercept: float

    def __call__(self, x):
        return 10**self.intercept * np.asarray(x, float) ** self.exponent


def fit_power_law(x, y) -> PowerLaw:
    slope, intercept = np.polyfit(np.log10(np.asarray(x, float)), np.log10(np.asarray(y, float)), 1)
    return PowerLaw(float(slope), float(intercept))


@dataclass(frozen=True)
class IsoFlop:
    budget: float
    n_parabola: Parabola
    d_parabola: Parabola | None

    @property
    def n_opt(self) -> float:
        return self.n_parabola.size_opt

    @property
    def d_opt(self) -> float | None:
        return self.d_parabola.size_opt if self.d_parabola else None

    @property
    def loss_opt(self) -> float:
        return self.n_parabola.loss_opt


@dataclass
class Approach2:
    profiles: list[IsoFlop]
    skipped: list[tuple[float, str]]  # (budget, why it has no minimum)
    n_law: PowerLaw | None = None  # N_opt(C)
    d_law: PowerLaw | None = None  # D_opt(C)
    replicates: list[tuple[PowerLaw, PowerLaw]] = field(default_factory=list)  # the bootstrap's fits

    @property
    def n_exponent_interval(self) -> tuple[float, float] | None:
        return _interval([n.exponent for n, _ in self.replicates])

    @property
    def d_exponent_interval(self) -> tuple[float, float] | None:
        return _interval([d.exponent for _, d in self.replicates])

    def tokens_per_param(self, budget: float) -> float:
        return float(self.d_law(budget) / self.n_law(budget))

    def tokens_per_param_interval(self, budget: float) -> tuple[float, float] | None:
        return _interval([float(d(budget) / n(budget)) for n, d in self.replicates])

    def band(self, budgets, which: str):
        """The bootstrap's 10-90% band of N_opt (``which="n"``) or D_opt at each budget."""
        index = 0 if which == "n" else 1
        values = np.array([fits[index](budgets) for fits in self.replicates])
        return np.percentile(values, PERCENTILES, axis=0) if len(values) else None


def _interval(values) -> tuple[float, float] | None:
    """The PERCENTILES of the bootstrap's values (None without any)."""
    return tuple(float(v) for v in np.percentile(values, PERCENTILES)) if len(values) else None


def _profiles(budget, n, d, loss) -> tuple[list[IsoFlop], list[tuple[float, str]]]:
    profiles, skipped = [], []
    for c in np.unique(budget):
        here = budget == c
        parabola = fit_parabola(n[here], loss[here])
        if parabola is None:
            sizes = np.unique(n[here]).size
            skipped.append((float(c), f"{sizes} sizes" if sizes < 3 else "the losses curve downwards (no minimum)"))
            continue
        profiles.append(IsoFlop(float(c), parabola, fit_parabola(d[here], loss[here])))
    return profiles, skipped


def _laws(profiles: list[IsoFlop]) -> tuple[PowerLaw, PowerLaw] | None:
    usable = [p for p in profiles if p.d_parabola is not None]
    if len(usable) < 2:
        return None
    budgets = [p.budget for p in usable]
    return fit_power_law(budgets, [p.n_opt for p in usable]), fit_power_law(budgets, [p.d_opt for p in usable])


def approach2(budget, n, d, loss, *, bootstrap: int = 1000, seed: int = 0) -> Approach2:
    """IsoFLOP parabolas per budget and the N_opt(C), D_opt(C) power laws, with ``bootstrap`` resamplings of the
    runs within each budget for their intervals."""
    budget, n, d, loss = (np.asarray(v, float) for v in (budget, n, d, loss))
    profiles, skipped = _profiles(budget, n, d, loss)
    fit = Approach2(profiles, skipped)
    laws = _laws(profiles)
    if laws is None:
        return fit
    fit.n_law, fit.d_law = laws
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(budget == c) for c in np.unique(budget)]
    with one_blas_thread():
        for _ in range(bootstrap):
            pick = np.concatenate([rng.choice(g, size=g.size) for g in groups])
            laws = _laws(_profiles(budget[pick], n[pick], d[pick], loss[pick])[0])
            if laws is not None:
                fit.replicates.append(laws)
    return fit


# ------------------------------------------------------------------------------------------------ Approach 3


@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = 0.0  # the Huber loss at the optimum

    def __call__(self, n, d):
        return self.E + self.A / np.asarray(n, float) ** self.alpha + self.B / np.asarray(d, float) ** self.beta

    def tokens_for(self, n, loss):
        """D that brings an N-parameter model to ``loss`` (nan where it never gets there)."""
        gap = loss - self.E - self.A / np.asarray(n, float) ** self.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (self.B / np.where(gap > 0, gap, 1.0)) ** (1 / self.beta), np.nan)

    def optimum(self, budget: float, flops: FlopsPerToken, bounds: tuple[float, float]) -> tuple[float, float]:
        """(N, loss) of the loss-optimal model for ``budget`` FLOPs, N searched within ``bounds``."""
        n = np.geomspace(*bounds, 4001)
        losses = self(n, budget / flops(n))
        best = int(np.argmin(losses))
        return float(n[best]), float(losses[best])


def _huber_objective(theta, log_n, log_d, log_loss, delta):
    """The Huber loss of Appendix D and its gradient in theta = (a, b, e, alpha, beta); a 2-D theta (one start
    per row) gives the losses of all of them."""
    theta = np.asarray(theta, float)
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum(axis=-1)
    if theta.ndim > 1:
        return value
    slope = np.where(small, residual, delta * np.sign(residual))
    weights /= total
    grad = np.array([(slope * weights[0]).sum(), (slope * weights[1]).sum(), (slope * weights[2]).sum(),
                     -(slope * weights[0] * log_n).sum(), -(slope * weights[1] * log_d).sum()])
    return float(value), grad


def approach3(n, d, loss, *, delta: float = HUBER_DELTA, grid: dict | None = None, starts: int = STARTS
              ) -> LossLaw:
    """The parametric loss fitted with L-BFGS from the ``starts`` best points of ``grid`` (Hoffmann et al.'s
    4,500 by default, ranked by the loss there); the best result wins."""
    from scipy.optimize import minimize

    data = tuple(np.log(np.asarray(v, float)) for v in (n, d, loss))
    grid = grid or HOFFMANN_GRID
    points = np.array(list(itertools.product(*(grid[k] for k in ("a", "b", "e", "alpha", "beta")))))
    ranked = points[np.argsort(_huber_objective(points, *data, delta), kind="stable")[:starts]]
    with one_blas_thread():
        best = min((minimize(_huber_objective, start, args=(*data, delta), jac=True, method="L-BFGS-B")
                    for start in ranked), key=lambda found: found.fun)
    a, b, e, alpha, beta = best.x
    return LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                   beta=float(beta), objective=float(best.fun))


# -------------------------------------------------------------------------------------- held out, trade-off


@dataclass(frozen=True)
class HeldOut:
    """Fits on every budget but the largest, against that budget's runs."""

    budget: float
    predicted_n_approach2: float | None
    predicted_n_approach3: float
    predicted_loss: float  # the loss law's optimum at the held-out budget
    observed_n: float  # its IsoFLOP parabola's minimum, or its best run's N when there is no parabola
    observed_loss: float  # likewise
    best_run_loss: float


def held_out_check(budget, n, d, loss, flops: FlopsPerToken, bounds, *, grid: dict | None = None
                   ) -> HeldOut | None:
    """None when fewer than two budgets would be left to fit."""
    budget, n, d, loss = (np.asarray(v, float) for v in (budget, n, d, loss))
    largest = budget.max()
    fit, test = budget < largest, budget == largest
    if np.unique(budget[fit]).size < 2:
        return None
    law = approach3(n[fit], d[fit], loss[fit], grid=grid)
    laws = _laws(_profiles(budget[fit], n[fit], d[fit], loss[fit])[0])
    n3, l3 = law.optimum(largest, flops, bounds)
    parabola = fit_parabola(n[test], loss[test])
    best = int(np.argmin(np.where(test, loss, np.inf)))
    return HeldOut(budget=float(largest), predicted_n_approach2=float(laws[0](largest)) if laws else None,
                   predicted_n_approach3=n3, predicted_loss=l3,
                   observed_n=parabola.size_opt if parabola else float(n[best]),
                   observed_loss=parabola.loss_opt if parabola else float(loss[best]),
                   best_run_loss=float(loss[best]))


@dataclass(frozen=True)
class Choice:
    """A model that reaches the target loss: its size, tokens and costs."""

    label: str
    n: float
    d: float
    training_flops: float

    @property
    def tokens_per_param(self) -> float:
        return self.d / self.n

    @property
    def inference_flops_per_token(self) -> float:
        return 2.0 * self.n

    def total_flops(self, served_tokens):
        return self.training_flops + self.inference_flops_per_token * np.asarray(served_tokens, float)

    def break_even(self, optimal: Choice) -> float:
        """Tokens served beyond which this smaller model costs less in all than ``optimal``."""
        return (self.training_flops - optimal.training_flops) / (optimal.inference_flops_per_token
                                                                  - self.inference_flops_per_token)


def tradeoff(law: LossLaw, target_loss: float, flops: FlopsPerToken,
             ratios=(100.0, 300.0, 1000.0, 3000.0)) -> list[Choice]:
    """The compute-optimal model for ``target_loss`` first, then smaller ones trained to it at each tokens per
    parameter ratio above the optimal one. Empty when the law never reaches the target (target <= E)."""
    if target_loss <= law.E:
        return []
    with np.errstate(over="ignore", divide="ignore"):
        smallest = (law.A / (target_loss - law.E)) ** (1 / law.alpha)  # below it no amount of data is enough
    if not (np.isfinite(smallest) and smallest > 0):  # a degenerate fit (alpha ~ 0)
        return []
    n = smallest * np.exp(np.linspace(1e-6, 30.0, 20001))
    d = law.tokens_for(n, target_loss)
    cost = flops(n) * d
    best = int(np.nanargmin(cost))
    choices = [Choice("compute-optimal", float(n[best]), float(d[best]), float(cost[best]))]
    ratio = d / n  # falls as N grows
    for target in ratios:
        if target <= ratio[best]:
            continue
        i = int(np.argmin(np.abs(np.log(ratio[: best + 1] / target))))
        choices.append(Choice(f"{target:g} tokens/parameter", float(n[i]), float(d[i]), float(cost[i])))
    return choices
