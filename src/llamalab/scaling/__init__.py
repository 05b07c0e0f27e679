"""Scaling-law sweeps: many ordinary training runs, each sized to a compute budget, and the fits through them.

``sweep`` reads a sweep file and plans its runs (one ``llamalab train`` run per budget, shape and seed, each with
its own full cosine schedule over the tokens its budget buys), ``runner`` launches and resumes them as
subprocesses, ``fits`` holds the Chinchilla fits (IsoFLOP parabolas, the parametric loss law) and the LLaMA
trade-off, and ``report`` turns finished runs into ``report/`` (markdown, CSV, JSON, plots).
"""
