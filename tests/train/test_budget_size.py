"""``[model] size = "budget"``: the shape is the family shape nearest the scaling law's optimum for the
``[length]`` budget, chosen once when the run is set up and pinned as a fixed shape; a resume keeps it.

The expected shapes are worked out here from the law's formula and the family rule, not by the chooser. The
tests use their own law (chosen so that a few thousand tokens are optimal for the ``tiny`` family); one test
reads the law shipped with llamalab.
"""

from __future__ import annotations

import json
import math

import pytest

from llamalab.config import ConfigError
from llamalab.model.args import ModelArgs, get_preset
from llamalab.model.sizing import LAW_ASSET, ScalingLaw
from llamalab.train import setup as run_setup
from llamalab.train.setup import resolve
from llamalab.train.trainer import train

EXPONENT, LOG10_G = 0.5, 0.25  # N_opt = 10^0.25 C^0.5: 2k-5k tokens are optimal for the family below
DIMS, ASPECT, HEAD_DIM = [16, 32, 48, 64], 16, 8
SEQ, STEP_TOKENS, TRAIN_TOKENS = 32, 256, 60_000  # the tiny data of conftest: two sources of 30,000 tokens


@pytest.fixture
def law_file(tmp_path):
    path = tmp_path / "law.json"
    path.write_text(json.dumps({"n_opt": {"exponent": EXPONENT, "log10_coefficient": LOG10_G},
                                "accounting": "total", "provenance": {"source": "a test"}}))
    return path


@pytest.fixture
def budget_config(make_config, law_file):
    """``budget_config(*overrides)``: the tiny model sized by the test law from the family above."""

    def make(*overrides, out="run"):
        family = ["--model.size", "budget", "--model.law", str(law_file), "--model.family.dims", str(DIMS),
                  "--model.family.aspect_ratio", str(ASPECT), "--model.family.head_dim", str(HEAD_DIM)]
        return make_config(*family, "--length.steps", "0", *overrides, out=out)

    return make


def shape_args(dim: int) -> ModelArgs:
    """The family rule, written out: n_layers = max(1, round(dim / aspect)), n_heads = dim / head_dim."""
    fields = {**get_preset("tiny").args.to_dict(), "vocab_size": 256, "dim": dim,
              "n_layers": max(1, round(dim / ASPECT)), "n_heads": dim // HEAD_DIM}
    return ModelArgs(**fields)


def params(dim: int) -> int:
    return shape_args(dim).num_params()


def flops_per_token(dim: int) -> float:
    args = shape_args(dim)
    return 6 * params(dim) + 12 * args.n_layers * args.dim * SEQ


def n_opt(flops: float) -> float:
    return 10**LOG10_G * flops**EXPONENT


def nearest_dim(n: float) -> int:
    return min(DIMS, key=lambda d: abs(math.log(params(d) / n)))


def optimal_tokens(dim: int) -> float:
    """D_opt of a shape: C = (N / G)^(1/a) is the budget whose optimum it is; D = C / FLOPs per token."""
    return (params(dim) / 10**LOG10_G) ** (1 / EXPONENT) / flops_per_token(dim)


def pinned(cfg) -> dict:
    return {k: cfg.to_dict()["model"].get(k) for k in ("dim", "n_layers", "n_heads", "size")}


@pytest.mark.parametrize("flops", [6e7, 5e8, 3e9, 1.5e10])
def test_a_flops_budget_picks_the_shape_nearest_the_laws_optimum(budget_config, flops):
    cfg = budget_config("--length.flops", str(flops))
    setup = resolve(cfg)
    dim = nearest_dim(n_opt(flops))
    assert (setup.args.dim, setup.args.n_layers, setup.args.n_heads) == (dim, shape_args(dim).n_layers,
                                                                           shape_args(dim).n_heads)
    assert setup.n_steps == math.ceil(flops / flops_per_token(dim) / STEP_TOKENS)
    assert setup.sizing.n_opt == pytest.approx(n_opt(flops))
    # pinned: config.json, checkpoints and a resume see an ordinary fixed shape
    assert pinned(cfg) == {"dim": dim, "n_layers": shape_args(dim).n_layers, "n_heads": dim // HEAD_DIM, "size": None}
    assert len({nearest_dim(n_opt(f)) for f in (6e7, 5e8, 3e9, 1.5e10)}) == 4  # the budgets span the family


@pytest.mark.parametrize("dim", DIMS)
def test_a_token_budget_picks_the_shape_whose_optimal_tokens_it_is(budget_config, dim):
    tokens = math.ceil(optimal_tokens(dim))
    setup = resolve(budget_config("--length.tokens", str(tokens)))
    assert setup.args.dim == dim
    assert setup.sizing.n_opt == pytest.approx(params(dim), rel=5e-3)  # D_opt(N) = tokens, inverted (tokens rounded up)


def test_a_time_budget_measures_at_most_two_shapes_and_sizes_for_the_compute_left(budget_config, monkeypatch):
    rate = 2e9  # FLOP/s, the same for every shape
    target = 32
    minutes = (params(target) / 10**LOG10_G) ** (1 / EXPONENT) / rate / 60  # the budget whose optimum is dim 32
    measured = []

    def fake_throughput(cfg, args, device, precision, seq_len, accum):
        measured.append(args.dim)
        assert (precision, seq_len, accum) == ("fp32", SEQ, 2)  # the run's precision and batch layout
        return rate / flops_per_token(args.dim)

    monkeypatch.setattr(run_setup, "measure_training_throughput", fake_throughput)
    cfg = budget_config("--length.max_minutes", repr(minutes))
    setup = resolve(cfg)
    assert setup.args.dim == nearest_dim(n_opt(rate * minutes * 60)) == target
    assert measured == [16, 32]  # the smallest shape (quick), then the one chosen
    assert setup.time_bounded and setup.sizing.seconds <= minutes * 60
    assert cfg.length.max_minutes == pytest.approx(setup.sizing.seconds / 60)  # measuring counts against it
    assert setup.sizing.tokens == pytest.approx(rate * setup.sizing.seconds / flops_per_token(target))


def test_resume_keeps_the_shape_the_run_started_with(budget_config, monkeypatch):
    first = budget_config("--length.tokens", str(math.ceil(optimal_tokens(16))), "--checkpoint.every", "0")
    result = train(first)
    started = json.loads((result.out_dir / "config.json").read_text())["model"]
    assert started["dim"] == 16 and "size" not in started

    bigger = ("--length.tokens", str(math.ceil(optimal_tokens(48))))
    assert resolve(budget_config(*bigger, out="elsewhere")).args.dim == 48  # what a fresh start would pick
    monkeypatch.setattr(run_setup, "measure_training_throughput", lambda *a: pytest.fail("measured on resume"))
    for resume in ("auto", str(result.checkpoint)):
        again = resolve(budget_config(*bigger, "--checkpoint.resume", resume))
        assert (again.args.dim, again.args.n_layers, again.args.n_heads) == (16, 1, 2) and again.sizing is None


def test_more_tokens_than_the_data_holds_is_reported_as_data_limited(budget_config, capsys):
    setup = resolve(budget_config("--length.tokens", "100000"))
    err = capsys.readouterr().err
    epochs = math.ceil(100_000 / STEP_TOKENS) * STEP_TOKENS / TRAIN_TOKENS
    assert setup.epochs == pytest.approx(epochs)
    assert f"data-limited: this run trains 100,096 tokens, {epochs:.1f} epochs of the 60,000" in err
    assert "Muennighoff" in err and "data.recipe" in err and "weight_decay" in err and "model.dropout, now 0;" in err
    assert "above the family's largest shape" in err  # and the law would want a larger model than dim 64
    resolve(budget_config("--length.tokens", "4000", out="small"))
    assert "data-limited" not in capsys.readouterr().err


@pytest.mark.parametrize("flops", [5e8, 3e9])
def test_a_budget_that_would_repeat_the_data_too_often_takes_a_larger_shape(budget_config, capsys, flops):
    law_pick = nearest_dim(n_opt(flops))
    epochs = {dim: flops / flops_per_token(dim) / TRAIN_TOKENS for dim in DIMS}
    larger = DIMS[DIMS.index(law_pick) + 1]
    assert epochs[larger] < epochs[law_pick]
    limit = (epochs[law_pick] + epochs[larger]) / 2  # the law's pick makes more passes, the next shape fewer
    setup = resolve(budget_config("--length.flops", str(flops), "--model.max_epochs", repr(limit)))
    assert setup.args.dim == larger
    assert setup.n_steps == math.ceil(flops / flops_per_token(larger) / STEP_TOKENS)
    err = capsys.readouterr().err
    assert (f"the law's choice {shape_label(law_pick)} would train {epochs[law_pick]:.1f} epochs of the 60,000 "
            f"training tokens, more than model.max_epochs = {limit:g}; took {shape_label(larger)} "
            f"({epochs[larger]:.1f} epochs), the smallest family shape within it") in err
    # no shape is small enough: the largest; no limit (0): the law's choice
    tight = resolve(budget_config("--length.flops", str(flops), "--model.max_epochs", repr(epochs[DIMS[-1]] / 2),
                                  out="tight"))
    assert tight.args.dim == DIMS[-1] and "none is within it" in capsys.readouterr().err
    assert resolve(budget_config("--length.flops", str(flops), "--model.max_epochs", "0", out="off")).args.dim == law_pick


def test_a_time_budget_that_would_repeat_the_data_too_often_measures_and_takes_a_larger_shape(budget_config,
                                                                                              monkeypatch):
    rate = 2e9  # FLOP/s, the same for every shape
    minutes = (params(32) / 10**LOG10_G) ** (1 / EXPONENT) / rate / 60  # the law's choice: dim 32
    epochs = {dim: rate * minutes * 60 / flops_per_token(dim) / TRAIN_TOKENS for dim in DIMS}
    measured = []

    def fake_throughput(cfg, args, device, precision, seq_len, accum):
        measured.append(args.dim)
        return rate / flops_per_token(args.dim)

    monkeypatch.setattr(run_setup, "measure_training_throughput", fake_throughput)
    limit = (epochs[32] + epochs[48]) / 2
    setup = resolve(budget_config("--length.max_minutes", repr(minutes), "--model.max_epochs", repr(limit)))
    assert setup.args.dim == 48 and measured == [16, 48]  # the run's own shape is measured
    assert setup.sizing.tokens == pytest.approx(rate * setup.sizing.seconds / flops_per_token(48))
    assert any(note.startswith("data-limited: the law's choice d32l2h4") for note in setup.sizing.notes)


def shape_label(dim: int) -> str:
    args = shape_args(dim)
    return f"d{dim}l{args.n_layers}h{args.n_heads}"


@pytest.mark.parametrize("overrides, needle", [
    (("--model.family.depth", "2"), "model.family.depth: unknown key"),
    (("--model.family.dims", "[]"), "model.family.dims: expected a non-empty list"),
    (("--model.family.dims", "[16, 20]"), "model.family.dims[1]: 20 is not a multiple of head_dim 8"),
    (("--model.dim", "64"), "model.dim: chosen by model.size = 'budget'"),
    (("--model.size", "large"), "model.size: expected one of 'fixed', 'budget'"),
    (("--model.max_epochs", "-1"), "model.max_epochs: expected a number of epochs >= 0"),
])
def test_bad_budget_config_names_the_key(budget_config, overrides, needle):
    with pytest.raises(ConfigError) as info:
        budget_config("--length.flops", "1e9", *overrides)
    assert needle in str(info.value)


@pytest.mark.parametrize("overrides, needle", [
    (("--length.flops", "1e6"), "length.flops: 1e+06 FLOPs is too small for model.family"),
    (("--length.tokens", "300"), "length.tokens: 300 tokens is too small for model.family"),
])
def test_a_budget_below_the_smallest_shape_is_an_error_naming_the_key(budget_config, overrides, needle):
    with pytest.raises(ConfigError) as info:
        resolve(budget_config(*overrides))
    assert needle in str(info.value) and "model.family.dims[0]" in str(info.value)


def test_a_missing_law_file_is_an_error_and_size_fixed_sets_the_family_aside(budget_config, tmp_path):
    with pytest.raises(ConfigError, match="model.law: .*nope.json: no such file"):
        resolve(budget_config("--length.flops", "1e9", "--model.law", str(tmp_path / "nope.json")))
    cfg = budget_config("--length.steps", "8", "--model.size", "fixed", "--model.dim", "32")
    assert cfg.model_args().dim == 32 and "family" not in cfg.to_dict()["model"]


def test_length_flops_sizes_a_fixed_model_too(make_config):
    setup = resolve(make_config("--length.steps", "0", "--length.flops", "1e9"))
    args = setup.args
    expected = 6 * args.num_params() + 12 * args.n_layers * args.dim * SEQ
    assert setup.n_steps == math.ceil(1e9 / expected / STEP_TOKENS) and setup.sizing is None


def test_the_shipped_law_is_the_cpu_sweeps_approach2_fit_with_its_provenance():
    law = ScalingLaw.load()
    assert law.path == LAW_ASSET and law.accounting == "total"
    prov = law.provenance
    for key in ("source", "sweep", "date", "accounting", "fit_method", "exponent_interval"):
        assert key in prov
    assert prov["status"] == "fitted" and prov["sweep"] == "configs/scaling/cpu.toml"
    low, high = prov["exponent_interval"]
    assert low < law.exponent < high
    # the power law passes through the sweep's IsoFLOP minima (a least-squares line in log-log: within 2x here)
    for profile in prov["profiles"]:
        assert 0.5 < law.n_opt(profile["budget"]) / profile["n_opt"] < 2.0


def test_a_sweeps_fits_export_as_a_law_the_chooser_reads(tmp_path, budget_config):
    from llamalab.scaling.report import export_law
    from llamalab.scaling.sweep import Shape, Sweep

    sweep = Sweep(path=tmp_path / "s.toml", base=tmp_path / "b.toml", out_dir=tmp_path / "sweep", budgets=(1e9, 3e9),
                  seeds=(0,), noise={}, accounting="total", min_steps=1, tokens_per_param=None, overrides=(),
                  shapes=(Shape(16, 1, 2), Shape(32, 2, 4)), schedule=None)
    (sweep.out_dir / "report").mkdir(parents=True)
    fits = {"accounting": "total", "finished_runs": 6, "planned_runs": 6, "percentiles": [10.0, 90.0],
            "approach2": {"n_opt": {"exponent": EXPONENT, "log10_coefficient": LOG10_G,
                                    "exponent_interval": [0.45, 0.55]},
                          "d_opt": None, "profiles": [], "bootstrap_fits": 10}}
    (sweep.out_dir / "report" / "fits.json").write_text(json.dumps(fits))
    path = export_law(sweep, tmp_path / "law.json", date="2026-12-04")
    law = ScalingLaw.load(path)
    assert (law.exponent, law.log10_coefficient, law.accounting) == (EXPONENT, LOG10_G, "total")
    assert law.provenance["exponent_interval"] == [0.45, 0.55] and law.provenance["date"] == "2026-12-04"
    assert str(sweep.path) in law.provenance["sweep"] and "Approach 2" in law.provenance["fit_method"]
    setup = resolve(budget_config("--length.flops", "1e9", "--model.law", str(path)))
    assert setup.args.dim == nearest_dim(n_opt(1e9))


def test_a_time_budget_too_short_for_the_smallest_shape_trains_it_with_a_note(budget_config, monkeypatch, capsys):
    """A config that works on one machine should not fail on a slower one."""
    monkeypatch.setattr(run_setup, "measure_training_throughput",
                        lambda cfg, args, *rest: 1e6 / flops_per_token(args.dim))  # 1 MFLOP/s: very slow
    setup = resolve(budget_config("--length.max_minutes", "0.5"))
    assert setup.args.dim == 16 and setup.sizing.n_opt < params(16)
    assert "too little for model.family" in capsys.readouterr().err
