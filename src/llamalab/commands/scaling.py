"""``llamalab scaling run|status|report SWEEP.toml``: compute-budgeted sweeps of ordinary training runs and the
Chinchilla fits through them (docs/scaling-laws.md).

``run`` trains every run of the sweep that has not finished (resuming interrupted ones), ``--workers N`` at a
time, then writes the report; ``status`` says where each run stands; ``report`` fits the finished runs and
writes ``<out_dir>/report/``.
"""

from __future__ import annotations

import argparse
from collections import Counter

from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamalab scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="train the runs that have not finished, then write the report")
    run.add_argument("sweep", help="sweep TOML (see configs/scaling/cpu.toml)")
    run.add_argument("--workers", type=int, default=1,
                     help="runs trained at once, as local processes sharing the CPU threads (default 1)")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    status = actions.add_parser("status", help="where each run of the sweep stands")
    status.add_argument("sweep")
    report = actions.add_parser("report", help="fit the finished runs and write <out_dir>/report/")
    report.add_argument("sweep")
    report.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamplings for the intervals")
    report.add_argument("--export-law", metavar="PATH",
                        help="also write the fitted Approach 2 law, with its provenance, as the scaling-law JSON "
                             "that [model] size = \"budget\" reads (the shipped one: "
                             "src/llamalab/assets/scaling_law.json)")
    return parser


def print_status(plan) -> None:
    from ..scaling.runner import run_status

    states = Counter()
    print(f"{'run':<28}{'N':>12}{'tokens':>13}{'steps':>8}  state")
    for run in plan.runs:
        status = run_status(run)
        states[status.state] += 1
        state = {"partial": f"partial: resumes from step {status.step}" if status.step else "started, no checkpoint",
                 "stale": f"stale: {status.detail}"}.get(status.state, status.state)
        print(f"{run.name:<28}{run.params:>12,}{run.trained_tokens:>13,}{run.steps:>8}  {state}")
    for note in plan.left_out:
        print(f"left out: {note}")
    print(", ".join(f"{count} {state}" for state, count in sorted(states.items())) + f" of {len(plan.runs)} runs")


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    from ..scaling.report import export_law, write_report
    from ..scaling.runner import result, run_sweep
    from ..scaling.sweep import load_sweep, plan

    if ns.action == "run" and ns.workers < 1:
        raise UserError(f"--workers: expected at least 1, got {ns.workers}")
    if ns.action == "report" and ns.bootstrap < 0:
        raise UserError(f"--bootstrap: expected 0 or more, got {ns.bootstrap}")
    sweep_plan = plan(load_sweep(ns.sweep))
    if ns.action == "status":
        print_status(sweep_plan)
        return 0
    if ns.action == "report":
        print(write_report(sweep_plan, bootstrap=ns.bootstrap) / "report.md")
        if ns.export_law:
            print(f"scaling law: {export_law(sweep_plan.sweep, ns.export_law)}")
        return 0
    _, failed = run_sweep(sweep_plan, workers=ns.workers)
    if not ns.no_report and any(result(sweep_plan, run) for run in sweep_plan.runs):
        print(f"report: {write_report(sweep_plan) / 'report.md'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; their output is in "
              f"{sweep_plan.sweep.out_dir / 'logs'}; `llamalab scaling run {ns.sweep}` again resumes them")
        return 1
    return 0
