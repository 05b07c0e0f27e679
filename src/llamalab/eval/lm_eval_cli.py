"""``python -m llamalab.eval.lm_eval_cli ARGS``: lm-evaluation-harness's own command line, with ``--model llamalab``.

lm-eval 0.4.13 ignores entry points, so ``lm_eval --model llamalab`` cannot find our model; this runs the same
CLI after importing ``llamalab.eval.lm_eval_model`` (whose ``@register_model("llamalab")`` adds it). Every other
lm-eval option and model works as usual.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import llamalab.eval.lm_eval_model  # noqa: F401  (registers "llamalab")

    cli_evaluate()


if __name__ == "__main__":
    main()
