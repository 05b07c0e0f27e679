"""The fits recover a known law from noisy losses drawn from it, and the trade-off follows from the law.

The synthetic sweep uses Chinchilla's fitted law (Hoffmann et al. 2022, Approach 3: E 1.69, A 406.4, B 410.7,
alpha 0.34, beta 0.28) with C = 6ND, so the optimal allocation is known exactly: N_opt ∝ C^(beta/(alpha+beta))
= C^0.452 and D_opt ∝ C^0.548.
"""

from __future__ import annotations

import numpy as np
import pytest

from llamalab.scaling import fits

TRUE = fits.LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
N_EXPONENT = TRUE.beta / (TRUE.alpha + TRUE.beta)
SIX_N = fits.FlopsPerToken([1.0, 1e15], [6.0, 6e15])  # C = 6ND exactly


def true_n_opt(budget: float) -> float:
    g = (TRUE.alpha * TRUE.A / (TRUE.beta * TRUE.B)) ** (1 / (TRUE.alpha + TRUE.beta))
    return g * (budget / 6) ** N_EXPONENT


def synthetic_sweep(budgets=np.geomspace(1e18, 1e21, 4), sizes: int = 7, noise: float = 0.003, seed: int = 0):
    """IsoFLOP runs from 1/5 to 5x the true optimum at each budget, losses with multiplicative noise."""
    rng = np.random.default_rng(seed)
    budget, n = [], []
    for c in budgets:
        for size in true_n_opt(c) * np.geomspace(0.2, 5, sizes):
            budget.append(c)
            n.append(size)
    budget, n = np.array(budget), np.array(n)
    d = budget / (6 * n)
    return budget, n, d, TRUE(n, d) * np.exp(rng.normal(0, noise, n.size))


def test_approach2_recovers_the_optimal_allocation():
    budget, n, d, loss = synthetic_sweep()
    fit = fits.approach2(budget, n, d, loss, bootstrap=300)
    assert len(fit.profiles) == 4 and not fit.skipped
    assert fit.n_law.exponent == pytest.approx(N_EXPONENT, abs=0.02)
    assert fit.d_law.exponent == pytest.approx(1 - N_EXPONENT, abs=0.02)
    for profile in fit.profiles:
        assert profile.n_opt == pytest.approx(true_n_opt(profile.budget), rel=0.15)
    low, high = fit.n_exponent_interval
    assert low < fit.n_law.exponent < high and high - low < 0.1
    assert len(fit.replicates) == 300
    truth = 1e21 / (6 * true_n_opt(1e21)) / true_n_opt(1e21)
    assert fit.tokens_per_param(1e21) == pytest.approx(truth, rel=0.25)
    low, high = fit.tokens_per_param_interval(1e21)
    assert low < fit.tokens_per_param(1e21) < high


def test_approach2_skips_a_budget_without_a_minimum():
    budget, n, d, loss = synthetic_sweep(budgets=[1e19, 1e20])
    concave = budget == 1e20
    loss[concave] = 5.0 - (np.log10(n[concave]) - 8.0) ** 2  # opens downwards
    fit = fits.approach2(budget, n, d, loss, bootstrap=0)
    assert [p.budget for p in fit.profiles] == [1e19]
    assert fit.skipped == [(1e20, "the losses curve downwards (no minimum)")]
    assert fit.n_law is None  # one budget makes no power law


def test_approach3_recovers_the_law():
    budget, n, d, loss = synthetic_sweep()
    law = fits.approach3(n, d, loss)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert law.E == pytest.approx(TRUE.E, abs=0.06)
    assert law.beta / (law.alpha + law.beta) == pytest.approx(N_EXPONENT, abs=0.02)
    assert np.abs(np.log(law(n, d) / loss)).max() < 0.015  # within the noise (0.3%, 28 draws)


def test_the_held_out_budget_is_predicted():
    budget, n, d, loss = synthetic_sweep()
    held = fits.held_out_check(budget, n, d, loss, SIX_N, (1e6, 1e13))
    assert held.budget == 1e21
    assert held.predicted_n_approach2 == pytest.approx(held.observed_n, rel=0.15)
    assert held.predicted_n_approach3 == pytest.approx(held.observed_n, rel=0.15)
    assert held.observed_n == pytest.approx(true_n_opt(1e21), rel=0.15)
    assert held.predicted_loss == pytest.approx(held.observed_loss, rel=0.01)
    assert fits.held_out_check(budget[budget < 1e20], n[budget < 1e20], d[budget < 1e20], loss[budget < 1e20],
                               SIX_N, (1e6, 1e13)) is None  # one budget left to fit on


def test_tradeoff_reaches_the_target_with_smaller_longer_trained_models():
    target = 2.2
    choices = fits.tradeoff(TRUE, target, SIX_N)
    optimal, smaller = choices[0], choices[1:]
    assert [c.label for c in smaller] == [f"{r} tokens/parameter" for r in (100, 300, 1000, 3000)]
    for choice in choices:
        assert TRUE(choice.n, choice.d) == pytest.approx(target, rel=1e-6)
    for nearby in (0.9, 1.1):  # the first is the cheapest way to the target
        n = optimal.n * nearby
        assert 6 * n * TRUE.tokens_for(n, target) > optimal.training_flops
    for choice in smaller:
        assert choice.tokens_per_param == pytest.approx(float(choice.label.split()[0]), rel=0.01)
        assert choice.n < optimal.n and choice.training_flops > optimal.training_flops
        served = choice.break_even(optimal)
        assert served > 0
        assert choice.total_flops(served) == pytest.approx(optimal.total_flops(served), rel=1e-9)
        assert choice.total_flops(10 * served) < optimal.total_flops(10 * served)
    assert fits.tradeoff(TRUE, TRUE.E - 0.01, SIX_N) == []  # below the irreducible loss
