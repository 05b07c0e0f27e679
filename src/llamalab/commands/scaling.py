"""``llamalab scaling run|status|report SWEEP.toml``: compute-budgeted sweeps of ordinary training runs and the
Chinchilla fits through them (docs/scaling-laws.md).

``run`` trains every run of the sweep that has not finished (resuming interrupted ones), ``--workers N`` at a
time, as local processes or, with ``--executor slurm``, as Slurm jobs through submitit, then writes the report;
``status`` says where each run stands; ``report`` fits the finished runs and writes ``<out_dir>/report/``.
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
    run.add_argument("--workers", type=int, default=None,
                     help="runs trained at once: local processes sharing the CPU threads (default 1), or jobs "
                          "in flight (default: all with slurm, 1 with submitit-local)")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    farm = run.add_argument_group("executors", "where the runs train: each one the same `llamalab train` command")
    farm.add_argument("--executor", choices=EXECUTORS, default="local",
                      help="local: subprocesses of this one (default); slurm: one Slurm job per run, through "
                           "submitit (pip install 'llamalab[slurm]'); submitit-local: submitit's local executor, "
                           "the same jobs on this machine")
    farm.add_argument("--submitit-folder", metavar="DIR",
                      help="submitit's job files and logs (default <out_dir>/logs/submitit)")
    farm.add_argument("--slurm-partition", metavar="NAME")
    farm.add_argument("--slurm-time", type=int, metavar="MINUTES", default=24 * 60,
                      help="each job's time limit (default 1440; submitit-local too); an interrupted run resumes "
                           "when the sweep is run again")
    farm.add_argument("--slurm-cpus", type=int, metavar="N",
                      help="CPUs per job (cpus_per_task), the run's threads")
    farm.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per job (gpus_per_node)")
    farm.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                      help="any other parameter of submitit's Slurm executor (slurm_KEY), e.g. qos=high, "
                           "account=lab, mem=32GB, constraint=a100; repeat for more")
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


EXECUTORS = ("local", "slurm", "submitit-local")


def _parameter(text: str) -> tuple[str, object]:
    """``--slurm KEY=VALUE``: the value as an int, float or bool where it reads as one, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--slurm: expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key.strip(), convert(value)
        except ValueError:
            pass
    return key.strip(), {"true": True, "false": False}.get(value.lower(), value)


def make_executor(ns, sweep):
    """The executor ``--executor`` names, with its options."""
    from ..scaling.runner import LocalPool, SubmititExecutor

    if ns.executor == "local":
        return LocalPool(ns.workers or 1)
    folder = ns.submitit_folder or sweep.out_dir / "logs" / "submitit"
    return SubmititExecutor("slurm" if ns.executor == "slurm" else "local", folder,
                            workers=ns.workers or (None if ns.executor == "slurm" else 1),
                            timeout_min=ns.slurm_time, cpus=ns.slurm_cpus, gpus=ns.slurm_gpus,
                            partition=ns.slurm_partition, slurm=dict(_parameter(p) for p in ns.slurm))


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

    if ns.action == "run":
        for flag, value, least in (("--workers", ns.workers, 1), ("--slurm-time", ns.slurm_time, 1),
                                   ("--slurm-cpus", ns.slurm_cpus, 1), ("--slurm-gpus", ns.slurm_gpus, 0)):
            if value is not None and value < least:
                raise UserError(f"{flag}: expected at least {least}, got {value}")
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
    _, failed = run_sweep(sweep_plan, executor=make_executor(ns, sweep_plan.sweep))
    if not ns.no_report and any(result(sweep_plan, run) for run in sweep_plan.runs):
        print(f"report: {write_report(sweep_plan) / 'report.md'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; their output is in "
              f"{sweep_plan.sweep.out_dir / 'logs'}; `llamalab scaling run {ns.sweep}` again resumes them")
        return 1
    return 0
