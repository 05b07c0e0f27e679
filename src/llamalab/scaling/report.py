"""``<sweep out>/report/``: what the finished runs say, written whole or not at all.

``report.md`` (the accounting convention, every run, the fits, the held-out check, the LLaMA trade-off) with its
plots (``isoflop.png``, ``loss_vs_flops.png``, ``optimal.png``, ``total_cost.png``), ``runs.csv`` (every planned
run, finished or not) and ``fits.json`` (the fitted numbers). ``export_law`` turns ``fits.json``'s Approach 2
law into the scaling-law JSON that budget-sized training configs read (``llamalab.model.sizing``).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..fs import atomic_write_bytes, atomic_write_dir
from ..model.sizing import law_document
from . import fits
from .runner import RunResult, result, run_status
from .sweep import Plan, Sweep, SweepError, budget_label

REPORT_FILES = ("report.md", "runs.csv", "fits.json", "*.png")
SERVED_MULTIPLES = (1.0, 10.0, 100.0, 1000.0)  # tokens served, in units of the compute-optimal model's D
CONVENTIONS = {
    "total": "N counts every parameter, the token-embedding and output tables included (Pearce & Song 2024: "
             "with it, small-model sweeps reproduce Chinchilla's exponents rather than Kaplan's)",
    "non_embedding": "N leaves out the token-embedding and output tables (Kaplan et al. 2020's convention)",
}


@dataclass(frozen=True)
class Fitted:
    """Everything the report shows, computed once."""

    results: list[RunResult]
    approach2: fits.Approach2
    approach3: fits.LossLaw | None
    held_out: fits.HeldOut | None
    target_loss: float | None  # the loss law's optimum at the largest budget: the trade-off's target
    choices: list[fits.Choice]


def fit(plan: Plan, results: list[RunResult], bootstrap: int = 1000) -> Fitted:
    """Approach 2 on any runs; Approach 3, the held-out check and the trade-off from six runs on."""
    params = [r.params for r in plan.runs]
    flops = fits.FlopsPerToken(params, [r.flops_per_token for r in plan.runs])
    bounds = (min(params) / 10, max(params) * 10)
    budget, n, d, loss = _columns(results)
    approach2 = fits.approach2(budget, n, d, loss, bootstrap=bootstrap)
    if len(results) < 6:  # the loss law has five parameters
        return Fitted(results, approach2, None, None, None, [])
    law = fits.approach3(n, d, loss)
    target = law.optimum(budget.max(), flops, bounds)[1]
    return Fitted(results, approach2, law, fits.held_out_check(budget, n, d, loss, flops, bounds), target,
                  fits.tradeoff(law, target, flops))


def _columns(results: list[RunResult]):
    """(budget, N, D, loss) arrays of the finished runs."""
    return (np.array([r.run.budget for r in results]), np.array([r.run.params for r in results], float),
            np.array([r.run.trained_tokens for r in results], float), np.array([r.val_loss for r in results]))


def write_report(plan: Plan, bootstrap: int = 1000) -> Path:
    """Fit the finished runs and write ``report/``; an error when no run has finished."""
    results = [found for run in plan.runs if (found := result(plan, run)) is not None]
    if not results:
        raise SweepError(f"{plan.sweep.out_dir}: no finished runs to report on; run `llamalab scaling run "
                         f"{plan.sweep.path}` first")
    fitted = fit(plan, results, bootstrap)

    def write(folder: Path) -> None:
        (folder / "runs.csv").write_text(runs_csv(plan, results))
        (folder / "fits.json").write_text(strict_json(fits_json(plan, fitted)))
        plot_all(folder, plan, fitted)
        (folder / "report.md").write_text(markdown(plan, fitted))

    return atomic_write_dir(plan.sweep.out_dir / "report", write, owned=REPORT_FILES, what="scaling report")


# --------------------------------------------------------------------------------------------------- tables


def runs_csv(plan: Plan, results: list[RunResult]) -> str:
    """One row per planned run; the measured columns are empty for runs that have not finished."""
    by_name = {r.run.name: r for r in results}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "status", "budget_flops", "seed", "dim", "n_layers", "n_heads", "params_total",
                     "params_non_embedding", "params_counted", "flops_per_token", "lr", "warmup_steps", "steps",
                     "tokens", "flops", "tokens_per_param", "epochs", "val_loss", "val_bpb", "train_s", "wall_s",
                     "overhead_s", "overhead_per_train_s"])
    for run in plan.runs:
        done = by_name.get(run.name)
        total = run.args.num_params()
        measured = ["", "", "", "", "", ""]
        if done is not None:
            overhead = done.overhead_seconds
            measured = [f"{done.val_loss:.6f}", f"{done.val_bpb:.6f}", _opt(done.train_seconds),
                        _opt(done.wall_seconds), _opt(overhead),
                        _opt(overhead / done.train_seconds if overhead is not None and done.train_seconds else None)]
        writer.writerow([run.name, run_status(run).state, f"{run.budget:g}", run.seed, run.args.dim,
                         run.args.n_layers, run.args.n_heads, total, total - 2 * run.args.vocab_size * run.args.dim,
                         run.params, f"{run.flops_per_token:.6g}", f"{run.lr:.6g}", run.warmup_steps, run.steps,
                         run.trained_tokens, f"{run.flops:.6g}", f"{run.trained_tokens / run.params:.4g}",
                         f"{run.trained_tokens / plan.train_tokens:.4g}", *measured])
    return out.getvalue()


def _opt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def fits_json(plan: Plan, fitted: Fitted) -> dict:
    a2, a3 = fitted.approach2, fitted.approach3
    largest = max(plan.sweep.budgets)
    out: dict = {"accounting": plan.sweep.accounting, "finished_runs": len(fitted.results),
                 "planned_runs": len(plan.runs), "percentiles": list(fits.PERCENTILES)}
    out["approach2"] = {
        "profiles": [{"budget": p.budget, "n_opt": p.n_opt, "d_opt": p.d_opt, "loss_opt": p.loss_opt}
                     for p in a2.profiles],
        "skipped": [{"budget": c, "why": why} for c, why in a2.skipped],
        "n_opt": _law(a2.n_law, a2.n_exponent_interval), "d_opt": _law(a2.d_law, a2.d_exponent_interval),
        "tokens_per_param_at_largest_budget": None if a2.n_law is None else {
            "budget": largest, "value": a2.tokens_per_param(largest),
            "interval": a2.tokens_per_param_interval(largest)},
        "bootstrap_fits": len(a2.replicates),
    }
    out["approach3"] = None if a3 is None else {"E": a3.E, "A": a3.A, "B": a3.B, "alpha": a3.alpha,
                                                "beta": a3.beta, "huber_objective": a3.objective}
    out["held_out"] = None if fitted.held_out is None else vars(fitted.held_out)
    out["tradeoff"] = {"target_loss": fitted.target_loss, "models": [
        {"label": c.label, "n": c.n, "d": c.d, "tokens_per_param": c.tokens_per_param,
         "training_flops": c.training_flops, "inference_flops_per_token": c.inference_flops_per_token}
        for c in fitted.choices]}
    return out


def law_from_fits(fitted: dict, sweep: Sweep, date: str | None = None) -> dict:
    """The scaling-law JSON (``llamalab/assets/scaling_law.json``'s layout) of a report's ``fits.json``: its
    Approach 2 law N_opt(C), with where it comes from."""
    a2 = fitted.get("approach2") or {}
    law = a2.get("n_opt")
    where = sweep.out_dir / "report" / "fits.json"
    if not law:
        raise SweepError(f"{where}: no Approach 2 law of N_opt (it needs IsoFLOP minima at two budgets or more); "
                         "nothing to export")
    if not 0 < law["exponent"] < 1:
        raise SweepError(f"{where}: the fitted exponent of N_opt, {law['exponent']:.3g}, is outside (0, 1); not "
                         "a law a model can be sized by")
    date = date or datetime.date.today().isoformat()
    budgets = f"{min(sweep.budgets):.3g}-{max(sweep.budgets):.3g} FLOPs"
    interval = law.get("exponent_interval")
    provenance = {
        "status": "fitted",
        "summary": f"fitted by llamalab on {date}: Approach 2 of the sweep {sweep.path} ({fitted['finished_runs']} "
                   f"runs, budgets {budgets}), exponent {law['exponent']:.3f}"
                   + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else ""),
        "source": f"llamalab scaling sweep {sweep.path}, report {where}",
        "sweep": str(sweep.path),
        "out_dir": str(sweep.out_dir),
        "budgets": list(sweep.budgets),
        "shapes": [shape.label for shape in sweep.shapes],
        "finished_runs": fitted["finished_runs"],
        "planned_runs": fitted.get("planned_runs"),
        "date": date,
        "accounting": fitted["accounting"],
        "fit_method": "Approach 2 (Hoffmann et al. 2022): at each budget a parabola of the final validation loss "
                      "in log10 N, its minimum N_opt(C); then log10 N_opt = log10_coefficient + exponent log10 C "
                      "by least squares",
        "exponent_interval": interval,
        "interval_percentiles": fitted.get("percentiles"),
        "bootstrap_fits": a2.get("bootstrap_fits"),
        "d_opt": a2.get("d_opt"),
        "tokens_per_param_at_largest_budget": a2.get("tokens_per_param_at_largest_budget"),
        "profiles": a2.get("profiles"),
    }
    return law_document(law["exponent"], law["log10_coefficient"], fitted["accounting"], provenance, interval)


def strict_json(document) -> str:
    """``document`` as standard JSON: a number a fit could not give (NaN, infinity) is null."""

    def clean(value):
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(document), indent=2, allow_nan=False) + "\n"


def export_law(sweep: Sweep, path: str | Path, date: str | None = None) -> Path:
    """Write the law of the sweep's report (``<out_dir>/report/fits.json``) to ``path``."""
    source = sweep.out_dir / "report" / "fits.json"
    if not source.is_file():
        raise SweepError(f"{source}: no report to export a law from; run `llamalab scaling report {sweep.path}`")
    document = law_from_fits(json.loads(source.read_text()), sweep, date)
    return atomic_write_bytes(path, strict_json(document).encode())


def _law(law: fits.PowerLaw | None, interval) -> dict | None:
    return None if law is None else {"exponent": law.exponent, "log10_coefficient": law.intercept,
                                     "exponent_interval": interval}


# ---------------------------------------------------------------------------------------------------- plots


def plot_all(folder: Path, plan: Plan, fitted: Fitted) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, n, d, loss = _columns(fitted.results)
    flops = np.array([r.run.flops for r in fitted.results])
    colors = {c: plt.cm.viridis(i / max(1, len(plan.sweep.budgets) - 1))
              for i, c in enumerate(sorted(plan.sweep.budgets))}
    profiles = {p.budget: p for p in fitted.approach2.profiles}

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for c in sorted(set(budget)):
        here = budget == c
        ax.plot(n[here], loss[here], "o", color=colors[c], label=f"{budget_label(c)} FLOPs")
        if c in profiles:
            grid = np.geomspace(n[here].min(), n[here].max(), 100)
            ax.plot(grid, profiles[c].n_parabola(grid), "-", color=colors[c], lw=1)
            ax.plot(profiles[c].n_opt, profiles[c].loss_opt, "*", color=colors[c], ms=12, mec="k")
    _finish(fig, ax, folder / "isoflop.png", "parameters N", "validation loss (nats/token)",
            "IsoFLOP profiles: parabolas in log N, minima starred")

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    points = ax.scatter(flops, loss, c=np.log10(n), cmap="plasma")
    fig.colorbar(points, ax=ax, label="log10 N")
    frontier, best = [], np.inf
    for i in np.lexsort((loss, flops)):  # by FLOPs, the lowest loss first among equal FLOPs
        if loss[i] < best:
            frontier.append(i)
            best = loss[i]
    ax.plot(flops[frontier], loss[frontier], "k--", lw=1, label="envelope (lowest loss for the FLOPs)")
    _finish(fig, ax, folder / "loss_vs_flops.png", "training FLOPs", "validation loss (nats/token)",
            "every run's final validation loss")

    a2 = fitted.approach2
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, which, law, label in ((axes[0], "n", a2.n_law, "N_opt"), (axes[1], "d", a2.d_law, "D_opt")):
        minima = [(p.budget, p.n_opt if which == "n" else p.d_opt) for p in a2.profiles]
        minima = [m for m in minima if m[1] is not None]
        if minima:
            ax.plot(*zip(*minima), "o", label="IsoFLOP minima")
        if law is not None:
            grid = np.geomspace(min(plan.sweep.budgets) / 2, max(plan.sweep.budgets) * 2, 50)
            ax.plot(grid, law(grid), "-", label=f"{label} ∝ C^{law.exponent:.3f}")
            band = a2.band(grid, which)
            if band is not None:
                ax.fill_between(grid, band[0], band[1], alpha=0.25, label="bootstrap 10-90%")
        _finish(fig, ax, None, "training FLOPs C", label, f"{label}(C)")
    fig.tight_layout()
    fig.savefig(folder / "optimal.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if fitted.choices:
        served = fitted.choices[0].d * np.geomspace(1e-2, 1e4, 200)
        for choice in fitted.choices:
            ax.plot(served, choice.total_flops(served), label=f"{choice.label}: N = {choice.n:.3g}")
    else:
        ax.text(0.5, 0.5, "no loss law fitted (too few finished runs)", ha="center", transform=ax.transAxes)
    _finish(fig, ax, folder / "total_cost.png", "tokens served", "training + inference FLOPs",
            f"total cost to reach loss {fitted.target_loss:.3f}" if fitted.target_loss else "total cost")


def _finish(fig, ax, path: Path | None, xlabel: str, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    if "loss" not in ylabel:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------- markdown


def _interval_text(values) -> str:
    return "" if values is None else f" ({fits.PERCENTILES[0]:g}-{fits.PERCENTILES[1]:g}%: {values[0]:.3g} to {values[1]:.3g})"


def _error(predicted: float, observed: float) -> str:
    return f"{100 * (predicted / observed - 1):+.1f}%"


def noise_section(results: list[RunResult]) -> list[str]:
    """Markdown lines on run-to-run noise: every (budget, shape) trained with several seeds ([noise])."""
    groups: dict[tuple[float, str], list[float]] = {}
    for r in results:
        groups.setdefault((r.run.budget, r.run.shape.label), []).append(r.val_loss)
    repeated = {key: losses for key, losses in groups.items() if len(losses) > 1}
    if not repeated:
        return []
    lines = ["## Run-to-run noise", "",
             "The same budget and shape trained with different seeds (initialisation and data order):", "",
             "| budget | shape | seeds | mean val loss | std | range |", "|---|---|---|---|---|---|"]
    stds = []
    for (budget, label), losses in sorted(repeated.items()):
        std = float(np.std(losses, ddof=1))
        stds.append(std)
        lines.append(f"| {budget_label(budget)} | {label} | {len(losses)} | {np.mean(losses):.4f} | {std:.4f} | "
                     f"{max(losses) - min(losses):.4f} |")
    lines += ["", f"Median standard deviation across seeds: {np.median(stds):.4f} nats: differences between runs "
              "smaller than about twice that are within noise.", ""]
    return lines


def markdown(plan: Plan, fitted: Fitted) -> str:
    sweep, a2, a3 = plan.sweep, fitted.approach2, fitted.approach3
    runs = plan.runs
    seq = sorted({r.config.data.seq_len or r.args.max_seq_len for r in runs})
    missing = [r.name for r in runs if r.name not in {x.run.name for x in fitted.results}]
    lines = [f"# Scaling sweep `{sweep.path}`", "",
             f"{len(fitted.results)} of {len(runs)} planned runs finished"
             + (f"; not finished: {', '.join(missing)}" if missing else "") + ".", "",
             "## Compute accounting", "",
             f"FLOPs per token = 6N + 12 · n_layers · dim · seq (seq = {', '.join(map(str, seq))}), the forward and "
             f"backward passes through the weights plus attention's score and value products; "
             f"`accounting = \"{sweep.accounting}\"`: {CONVENTIONS[sweep.accounting]}. A budget C buys "
             "D = C / FLOPs-per-token tokens, rounded up to whole optimizer steps; each run trains its own full "
             "warmup + cosine schedule over exactly those tokens. Epochs = tokens trained / training tokens of "
             f"the prepared data ({plan.train_tokens:,}).", ""]
    if plan.left_out:
        lines += ["Left out by the sweep's rules: " + "; ".join(plan.left_out) + ".", ""]
    lines += ["## Runs", "", "| run | N | D | D/N | FLOPs | val loss | bits/byte | epochs | wall s | overhead |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in fitted.results:
        run, over = r.run, r.overhead_seconds
        lines.append(f"| {run.name} | {run.params:,} | {run.trained_tokens:,} | {run.trained_tokens / run.params:.3g} | "
                     f"{run.flops:.3g} | {r.val_loss:.4f} | {r.val_bpb:.4f} | "
                     f"{run.trained_tokens / plan.train_tokens:.2f} | "
                     + (f"{r.wall_seconds:.0f}" if r.wall_seconds is not None else "") + " | "
                     + (f"{100 * over / r.train_seconds:.0f}% of training" if over is not None and r.train_seconds
                        else "") + " |")
    lines += ["", "Overhead: wall time (start-up, validation, checkpoints) beyond the training time in the "
              "metrics. Full table: `runs.csv`.", ""]
    lines += noise_section(fitted.results)
    lines += ["![loss against FLOPs](loss_vs_flops.png)", "",
              "## IsoFLOP profiles (Approach 2)", "", "![IsoFLOP profiles](isoflop.png)", ""]
    if a2.profiles:
        lines += ["| budget | N_opt | D_opt | D_opt / N_opt | loss at N_opt |", "|---|---|---|---|---|"]
        lines += [f"| {budget_label(p.budget)} | {p.n_opt:.3g} | "
                  + (f"{p.d_opt:.3g} | {p.d_opt / p.n_opt:.3g}" if p.d_opt else " | ") + f" | {p.loss_opt:.4f} |"
                  for p in a2.profiles]
        lines.append("")
    if a2.skipped:
        lines += ["No minimum at " + "; ".join(f"{budget_label(c)}: {why}" for c, why in a2.skipped) + ".", ""]
    if a2.n_law is not None:
        largest = max(sweep.budgets)
        lines += [f"- N_opt ∝ C^{a2.n_law.exponent:.3f}{_interval_text(a2.n_exponent_interval)}",
                  f"- D_opt ∝ C^{a2.d_law.exponent:.3f}{_interval_text(a2.d_exponent_interval)}",
                  f"- tokens per parameter at the optimum, C = {budget_label(largest)}: "
                  f"{a2.tokens_per_param(largest):.3g}{_interval_text(a2.tokens_per_param_interval(largest))}",
                  "", f"Intervals: {len(a2.replicates)} bootstrap fits, runs resampled within each budget. "
                  "Chinchilla found 0.49 and 0.51 (about 20 tokens per parameter).", "",
                  "![N_opt and D_opt](optimal.png)", ""]
    else:
        lines += ["Fewer than two budgets have a minimum: no N_opt(C) or D_opt(C) law.", ""]
    lines += ["## Parametric loss (Approach 3)", ""]
    if a3 is None:
        lines += ["Too few finished runs (6 needed) to fit L(N, D) = E + A/N^α + B/D^β.", ""]
    else:
        lines += [f"L(N, D) = {a3.E:.3f} + {a3.A:.4g} / N^{a3.alpha:.3f} + {a3.B:.4g} / D^{a3.beta:.3f} "
                  f"(Huber δ = {fits.HUBER_DELTA:g} on log loss, L-BFGS from the {fits.STARTS} best starts of "
                  "Hoffmann et al.'s grid). Its compute-optimal allocation: N_opt ∝ C^"
                  f"{a3.beta / (a3.alpha + a3.beta):.3f}, D_opt ∝ C^{a3.alpha / (a3.alpha + a3.beta):.3f} "
                  "(Chinchilla: E = 1.69, α = 0.34, β = 0.28).", ""]
    lines += ["## Held-out check", ""]
    held = fitted.held_out
    if held is None:
        lines += ["Needs at least three budgets and six finished runs.", ""]
    else:
        a2_n = (f"Approach 2 {held.predicted_n_approach2:.3g} ({_error(held.predicted_n_approach2, held.observed_n)}), "
                if held.predicted_n_approach2 else "")
        lines += [f"Fitted on every budget but {budget_label(held.budget)}, then asked about it: optimal N "
                  f"{a2_n}Approach 3 {held.predicted_n_approach3:.3g} "
                  f"({_error(held.predicted_n_approach3, held.observed_n)}) against {held.observed_n:.3g} from its "
                  f"runs; optimal loss {held.predicted_loss:.4f} against {held.observed_loss:.4f} "
                  f"({_error(held.predicted_loss, held.observed_loss)}; best run {held.best_run_loss:.4f}).", ""]
    lines += tradeoff_section(fitted)
    return "\n".join(lines) + "\n"


def tradeoff_section(fitted: Fitted) -> list[str]:
    lines = ["## The LLaMA trade-off", ""]
    if not fitted.choices:
        lines += ["No loss law to reason with (too few runs, or it never reaches the target).", ""]
        return lines
    optimal = fitted.choices[0]
    lines += [f"Target: loss {fitted.target_loss:.4f}, the loss law's optimum at the largest budget. The "
              "compute-optimal model against smaller ones trained longer to the same loss (LLaMA: 7B on 1T "
              "tokens, ~140 per parameter), with inference at 2N FLOPs per token; total = training + 2N × "
              "tokens served (Sardana et al. 2024). Totals relative to the compute-optimal model's at each volume "
              "(below 1: the smaller model is cheaper overall).", "",
              "| model | N | D | D/N | training FLOPs | inference FLOPs/token | cheaper after serving | "
              + " | ".join(f"total at {m:g}×D*" for m in SERVED_MULTIPLES) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(SERVED_MULTIPLES)]
    for choice in fitted.choices:
        served = optimal.d * np.array(SERVED_MULTIPLES)
        ratios = choice.total_flops(served) / optimal.total_flops(served)
        even = "" if choice is optimal else f"{choice.break_even(optimal):.3g} tokens"
        lines.append(f"| {choice.label} | {choice.n:.3g} | {choice.d:.3g} | {choice.tokens_per_param:.3g} | "
                     f"{choice.training_flops:.3g} ({choice.training_flops / optimal.training_flops:.2f}×) | "
                     f"{choice.inference_flops_per_token:.3g} | {even} | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    lines += ["", f"D* = {optimal.d:.3g} tokens, the compute-optimal model's training set.", "",
              "![total cost](total_cost.png)", ""]
    return lines
