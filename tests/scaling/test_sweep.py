"""``llamalab scaling``: a tiny sweep runs end to end through the CLI, every point an ordinary ``llamalab train``
subprocess sized to its budget; a half-finished sweep resumes only what is missing; bad sweep files are one-line
errors naming the key, with nothing written.

The end-to-end sweep (2 budgets x 3 tiny shapes) is trained once per module; the resume test, last, changes it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest

from llamalab.cli import main
from llamalab.model.args import ModelArgs
from llamalab.scaling.runner import LocalPool
from llamalab.scaling.sweep import load_sweep, plan, toml_value

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import VOCAB, write_prepared  # noqa: E402

BUDGETS = [5e8, 1.5e9]
LABELS = {5e8: "5e8", 1.5e9: "1.5e9"}  # how the budgets name run folders
FAMILY = {"dims": [16, 32, 64], "aspect_ratio": 16, "head_dim": 8, "multiple_of": 8}
SEQ = 32


def base_config(prepared: Path) -> str:
    """The ``tiny`` preset on the tiny data, 128-token steps, quiet, no probe, one checkpoint at the end."""
    return f"""
[model]
preset = "tiny"
[data]
prepared = "{prepared}"
seq_len = {SEQ}
val_batches = 2
[batch]
global_tokens = 128
micro_batch = 4
[length]
steps = 1000
[checkpoint]
every = 0
save_final = false
[logging]
every = 5
tensorboard = false
plot = false
peak_tflops = 1.0
[precision]
mode = "fp32"
"""


def toml_text(data: dict) -> str:
    """A sweep file from a dict: plain keys, then tables (nested ones as dotted keys), then arrays of tables."""

    def pairs(table: dict, prefix: str = ""):
        for key, value in table.items():
            if isinstance(value, dict):
                yield from pairs(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key} = {toml_value(value)}"

    plain = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, (dict, list)) or (
        isinstance(v, list) and not (v and isinstance(v[0], dict)))]
    tables = [f"[{k}]\n" + "\n".join(pairs(v)) for k, v in data.items() if isinstance(v, dict)]
    arrays = [f"[[{k}]]\n" + "\n".join(pairs(t)) for k, v in data.items()
              if isinstance(v, list) and v and isinstance(v[0], dict) for t in v]
    return "\n".join(plain + tables + arrays) + "\n"


def write_sweep(path: Path, training_config: Path, out: Path, **changes) -> Path:
    """The test sweep with ``changes`` (a value of None removes the key)."""
    sweep = {"base": str(training_config), "out_dir": str(out), "budgets": BUDGETS, "min_steps": 3, "family": FAMILY,
             "schedule": {"lr": 3e-3, "lr_params": 1e5, "lr_exponent": 0.1, "warmup_fraction": 0.1}}
    sweep.update(changes)
    path.write_text(toml_text({k: v for k, v in sweep.items() if v is not None}))
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaling")
    prepared = write_prepared(tmp / "prepared")
    base = tmp / "base.toml"
    base.write_text(base_config(prepared))
    return tmp, base


@pytest.fixture(scope="module")
def sweep(setup):
    """The sweep trained once through the CLI, 3 runs at a time; (sweep file, out_dir, status before, run output)."""
    tmp, base = setup
    out_dir = tmp / "out"
    path = write_sweep(tmp / "sweep.toml", base, out_dir)
    status = cli("scaling", "status", str(path))
    ran = cli("scaling", "run", str(path), "--workers", "3")
    assert ran[0] == 0, ran
    return path, out_dir, status, ran[1]


def launches(out_dir: Path, name: str) -> list[dict]:
    return json.loads((out_dir / "logs" / f"{name}.json").read_text())["launches"]


def test_status_of_a_new_sweep_lists_every_run_and_writes_nothing(setup):
    tmp, base = setup
    path = write_sweep(tmp / "status.toml", base, tmp / "never")
    rc, out, _ = cli("scaling", "status", str(path))
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.startswith(("5e8-", "1.5e9-"))]
    assert sorted(r[0] for r in rows) == sorted(f"{b}-{s}-s0" for b in LABELS.values()
                                                for s in ("d16l1h2", "d32l2h4", "d64l4h8"))
    assert {r[-1] for r in rows} == {"new"}
    assert not (tmp / "never").exists()


@pytest.mark.slow
def test_sweep_trains_every_run_and_writes_the_report(sweep):
    path, out_dir, _, output = sweep
    assert "0 of 6 runs already finished; 6 to train" in output
    report = out_dir / "report"
    assert sorted(p.name for p in report.iterdir()) == ["fits.json", "isoflop.png", "loss_vs_flops.png",
                                                        "optimal.png", "report.md", "runs.csv", "total_cost.png"]
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "6 of 6 planned runs finished" in text
    assert "FLOPs per token = 6N + 12 · n_layers · dim · seq (seq = 32)" in text
    assert "the token-embedding and output tables included" in text
    rows = list(csv.DictReader((report / "runs.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}
    for row in rows:
        assert float(row["val_loss"]) > 0 and float(row["val_bpb"]) > 0
        assert float(row["wall_s"]) > float(row["train_s"]) > 0  # start-up and validation are overhead
        assert float(row["overhead_s"]) == pytest.approx(float(row["wall_s"]) - float(row["train_s"]), abs=2e-3)
        assert float(row["epochs"]) == pytest.approx(int(row["tokens"]) / 60_000, rel=1e-3)  # write_prepared's
        assert len(launches(out_dir, row["name"])) == 1
    fitted = json.loads((report / "fits.json").read_text())
    assert fitted["finished_runs"] == 6 and fitted["approach3"] is not None


@pytest.mark.slow
def test_each_run_trains_its_own_budget_with_a_full_schedule(sweep):
    """D = C / (6N + 12 n_layers dim seq) with N every parameter; the schedule ends at the run's own last step."""
    path, out_dir, _, _ = sweep
    for budget in BUDGETS:
        for dim in FAMILY["dims"]:
            layers = dim // FAMILY["aspect_ratio"]
            args = ModelArgs(dim=dim, n_layers=layers, n_heads=dim // 8, n_kv_heads=2, vocab_size=VOCAB,
                             multiple_of=8, max_seq_len=128)  # n_kv_heads, max_seq_len: the tiny preset's
            tokens = round(budget / (6 * args.num_params() + 12 * layers * dim * SEQ))
            run = out_dir / "runs" / f"{LABELS[budget]}-d{dim}l{layers}h{dim // 8}-s0"
            config = json.loads((run / "config.json").read_text())
            assert config["length"] == {"steps": 0, "tokens": tokens, "max_minutes": 0.0}
            assert config["model"]["dim"] == dim and config["model"]["n_layers"] == layers
            command = launches(out_dir, run.name)[0]["command"]
            assert command[command.index("--length.tokens") + 1] == str(tokens)
            assert command[-2:] == ["--resume", "auto"]
            steps = math.ceil(tokens / 128)
            state = json.loads((run / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())
            assert state["schedule"]["total_steps"] == steps  # the cosine spans this run's tokens, not more
            assert config["schedule"]["warmup_steps"] == round(0.1 * steps)
            assert config["optimizer"]["lr"] == pytest.approx(3e-3 * (args.num_params() / 1e5) ** -0.1)


def test_non_embedding_accounting_leaves_out_the_tables(setup):
    tmp, base = setup
    planned = plan(load_sweep(write_sweep(tmp / "kaplan.toml", base, tmp / "kaplan", accounting="non_embedding")))
    for run in planned.runs:
        n = run.args.num_params() - 2 * VOCAB * run.args.dim
        assert run.params == n
        assert run.tokens == round(run.budget / (6 * n + 12 * run.args.n_layers * run.args.dim * SEQ))


def test_explicit_shapes_run_only_at_their_budgets(setup):
    tmp, base = setup
    shapes = [{"dim": 16, "n_layers": 1, "n_heads": 2, "multiple_of": 8},
              {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 8, "budgets": [1.5e9]}]
    planned = plan(load_sweep(write_sweep(tmp / "shapes.toml", base, tmp / "shapes", family=None, shapes=shapes)))
    assert [r.name for r in planned.runs] == ["5e8-d16l1h2-s0", "1.5e9-d16l1h2-s0", "1.5e9-d32l2h4kv2-s0"]
    assert planned.runs[-1].args.n_kv_heads == 2


def test_noise_seeds_repeat_every_shape_at_their_budgets_only(setup):
    tmp, base = setup
    planned = plan(load_sweep(write_sweep(tmp / "noise.toml", base, tmp / "noise",
                                          noise={"budgets": [1.5e9], "seeds": [1, 2]})))
    seeds = {}
    for run in planned.runs:
        seeds.setdefault((run.budget, run.shape.label), []).append(run.seed)
    assert {key: sorted(v) for key, v in seeds.items()} == {
        (b, s): [0] if b == 5e8 else [0, 1, 2] for b in BUDGETS for s in ("d16l1h2", "d32l2h4", "d64l4h8")}
    same = [r for r in planned.runs if r.budget == 1.5e9 and r.shape.label == "d16l1h2"]
    assert len({r.tokens for r in same}) == 1 and [r.name for r in same][1:] == ["1.5e9-d16l1h2-s1", "1.5e9-d16l1h2-s2"]


def test_report_sizes_the_noise_of_repeated_runs():
    from types import SimpleNamespace

    from llamalab.scaling.report import noise_section

    def result(budget, label, loss):
        return SimpleNamespace(run=SimpleNamespace(budget=budget, shape=SimpleNamespace(label=label)), val_loss=loss)

    lines = noise_section([result(1e9, "a", 2.0), result(1e9, "a", 2.2), result(1e9, "a", 2.4), result(1e9, "b", 3.0),
                           result(3e9, "a", 1.0)])
    rows = [line for line in lines if line.startswith("| 1e9")]
    assert rows == ["| 1e9 | a | 3 | 2.2000 | 0.2000 | 0.4000 |"]  # sample std of 2.0, 2.2, 2.4
    assert noise_section([result(1e9, "a", 2.0), result(3e9, "a", 1.0)]) == []


def test_only_settings_that_change_training_make_a_run_stale():
    from llamalab.scaling.runner import _first_difference

    run = {"optimizer": {"lr": 1e-3}, "logging": {"plot": True, "every": 10}}
    assert _first_difference(run, {"optimizer": {"lr": 1e-3}, "logging": {"plot": False, "every": 1}}) is None
    assert _first_difference(run, {"optimizer": {"lr": 2e-3}, "logging": {"plot": True}}) == \
        "optimizer.lr is 0.001 in the run, 0.002 in the sweep"
    assert _first_difference({"a": {"logging": 1}}, {"a": {"logging": 2}}) == "a.logging is 1 in the run, 2 in the sweep"


# (id, changes to the test sweep, what the one error line names); {tmp} is the module's folder
BAD = [
    ("unknown-key", {"budget": [1e9]}, "budget: unknown key"),
    ("budget-too-small", {"budgets": [1e6, 1.5e9]}, "budgets[0]: 1e6 FLOPs is too small: the smallest shape, d16l1h2 (11,568 parameters"),
    ("no-shape-in-window", {"tokens_per_param": [1e6, 1e7]}, "budgets[0]: no shape is left at 5e8 FLOPs"),
    ("dim-not-multiple-of-head-dim", {"family": {**FAMILY, "dims": [16, 20]}},
     "family.dims[1]: 20 is not a multiple of head_dim 8"),
    ("unbuildable-shape", {"family": None, "shapes": [{"dim": 20, "n_layers": 1, "n_heads": 4}]},
     "shapes[0] (d20l1h4): [model]: ModelArgs.dim / n_heads = 5 must be even"),
    ("family-and-shapes", {"shapes": [{"dim": 16, "n_layers": 1, "n_heads": 2}]}, "family: give exactly one"),
    ("out-dir-under-a-file", {"out_dir": "{tmp}/base.toml/out"}, "out_dir: {tmp}/base.toml/out cannot be made"),
    ("override-set-by-sweep", {"overrides": {"length": {"tokens": 1000}}}, "overrides.length.tokens: is set by"),
    ("unknown-override", {"overrides": {"optimizer": {"lrr": 1.0}}}, "optimizer.lrr: unknown key"),
    ("no-validation", {"overrides": {"data": {"val_batches": 0}}}, "data.val_batches is 0"),
    ("bad-warmup", {"schedule": {"warmup_fraction": 1.5}}, "schedule.warmup_fraction: expected a number in [0, 1)"),
    ("bad-accounting", {"accounting": "kaplan"}, "accounting: expected one of 'total', 'non_embedding'"),
    ("missing-base", {"base": "{tmp}/nope.toml"}, "base: {tmp}/nope.toml: no such training config"),
    ("negative-budget", {"budgets": [-1.0]}, "budgets[0]: expected a positive number, got -1.0"),
    ("noise-budget-not-swept", {"noise": {"budgets": [1e10], "seeds": [1]}},
     "noise.budgets[0]: 1e10 is not one of the sweep's budgets"),
    ("noise-seed-twice", {"noise": {"budgets": [5e8], "seeds": [0]}}, "noise.seeds: seed 0 is given twice"),
    ("noise-unknown-key", {"noise": {"budgets": [5e8], "seed": [1]}}, "noise.seed: unknown key"),
]


@pytest.mark.parametrize("changes, needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_sweep_is_one_line_naming_the_key(changes, needle, setup, monkeypatch):
    monkeypatch.delenv("LLAMALAB_DEBUG", raising=False)
    tmp, base = setup
    changes = {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in changes.items()}
    path = write_sweep(tmp / "bad.toml", base, tmp / "bad-out", **changes)
    rc, out, err = cli("scaling", "run", str(path))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"llamalab scaling run: error: {path}: ")
    assert needle.format(tmp=tmp) in err
    assert not (tmp / "bad-out").exists()


@pytest.mark.slow
def test_a_pool_run_trains_on_its_threads_into_its_log(setup, monkeypatch):
    """A run the local pool launches (forked from its fork server, where there is one) has the thread count its
    launch record gets, and its output lands in its log after the command line."""
    tmp, base = setup
    monkeypatch.setattr(LocalPool, "threads", lambda self: 3)
    pool, log = LocalPool(1), tmp / "threads.log"
    command = [sys.executable, "-m", "llamalab", "train", str(base), "--run.out_dir", str(tmp / "threads"),
               "--length.steps", "3"]
    handle = pool.start(None, command, log)
    while not handle.done():
        time.sleep(0.05)
    outcome = handle.outcome()
    text = log.read_text()
    assert (outcome.returncode, outcome.threads) == (0, 3), text
    assert text.startswith("$ OMP_NUM_THREADS=3 ") and "validation loss" in text
    if pool.fork_server is not None:
        assert "torch.get_num_threads() = 3)" in text.splitlines()[1]


@pytest.mark.slow
def test_a_changed_sweep_does_not_mix_with_its_old_runs(sweep, setup):
    """Runs trained with another learning-rate rule are neither skipped as finished nor resumed."""
    path, out_dir, _, _ = sweep
    tmp, base = setup
    changed = write_sweep(tmp / "changed.toml", base, out_dir,
                          schedule={"lr": 1e-3, "lr_params": 1e5, "lr_exponent": 0.1, "warmup_fraction": 0.1})
    rc, out, _ = cli("scaling", "status", str(changed))
    assert rc == 0 and out.count("stale: optimizer.lr is ") == 6
    rc, _, err = cli("scaling", "run", str(changed))
    assert rc == 2 and "trained with other settings than the sweep gives now (optimizer.lr is " in err
    assert all(len(launches(out_dir, p.stem)) == 1 for p in (out_dir / "logs").glob("*.json"))


@pytest.mark.slow
def test_rerun_trains_only_what_is_missing(sweep):
    """One run's folder removed, another interrupted before its final validation: only those two are launched,
    the second resuming from its last checkpoint."""
    path, out_dir, _, _ = sweep
    removed, interrupted = out_dir / "runs" / "5e8-d32l2h4-s0", out_dir / "runs" / "1.5e9-d16l1h2-s0"
    shutil.rmtree(removed)
    metrics = interrupted / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records if r["split"] != "val"))
    steps = max(r["step"] for r in records)

    rc, out, _ = cli("scaling", "status", str(path))
    assert rc == 0
    assert f"{interrupted.name}" in out and f"partial: resumes from step {steps}" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith(removed.name)] == ["new"]

    rc, out, _ = cli("scaling", "run", str(path), "--workers", "2")
    assert rc == 0
    assert "4 of 6 runs already finished; 2 to train" in out
    counts = {p.stem: len(launches(out_dir, p.stem)) for p in (out_dir / "logs").glob("*.json")}
    assert counts == {name: 2 if name in (removed.name, interrupted.name) else 1 for name in counts}
    assert launches(out_dir, interrupted.name)[-1]["resumed_from_step"] == steps
    rows = list(csv.DictReader((out_dir / "report" / "runs.csv").open()))
    assert {r["status"] for r in rows} == {"done"}


def test_a_budget_sized_base_config_trains_the_sweeps_shapes(setup):
    tmp, base = setup
    budget_base = tmp / "budget-base.toml"
    budget_base.write_text(base.read_text().replace('preset = "tiny"', 'preset = "tiny"\nsize = "budget"'))
    planned = plan(load_sweep(write_sweep(tmp / "budget.toml", budget_base, tmp / "budget")))
    for run in planned.runs:
        assert run.config.model.size == "fixed"
        assert run.config.model_args(vocab_size=VOCAB) == run.args
        assert run.args.dim == int(run.name.split("-")[1][1:].split("l")[0])
