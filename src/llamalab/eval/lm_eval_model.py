"""A llamalab checkpoint as an lm-evaluation-harness model, so any lm-eval task runs on it.

lm-eval 0.4.13 finds models only in its own registry (``lm_eval.models.MODEL_MAPPING`` plus whatever modules
were imported and called ``@register_model``); it does not read the ``lm_eval.models`` entry points that our
``pyproject.toml`` declares (kept for lm-eval versions that do). So:

- command line: ``python -m llamalab.eval.lm_eval_cli --model llamalab --model_args checkpoint=DIR --tasks ...``
  takes exactly ``lm_eval``'s arguments; it imports this module first, which registers ``llamalab``;
- Python: ``import llamalab.eval.lm_eval_model`` then ``lm_eval.simple_evaluate(model="llamalab", ...)``, or pass
  ``LlamalabLM(checkpoint=DIR)`` itself as ``model``.

``loglikelihood`` and ``loglikelihood_rolling`` use llamalab's scorer (the same token ids and numbers as lm-eval's
``hf`` backend on the Hugging Face export, faster); ``generate_until`` uses ``llamalab.generate``.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (fills lm-eval's registry first; otherwise registering ours would hide "hf")
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .harness import Evaluator


@register_model("llamalab")
class LlamalabLM(LM):
    """``--model_args checkpoint=DIR[,dtype=bfloat16][,max_length=N]``; ``--batch_size`` continuations per batch."""

    def __init__(self, checkpoint: str, dtype: str = "float32", batch_size: int | str = 32, device: str = "cpu",
                 max_length: int | None = None, max_gen_toks: int = 256, **_ignored):
        super().__init__()
        import torch

        import llamalab

        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default is cuda:0
            device = "cpu"
        self.pretrained = llamalab.load(checkpoint, dtype=None if dtype == "auto" else dtype, device=device)
        if self.pretrained.tokenizer is None:
            raise ValueError(f"{checkpoint}: no tokenizer.model; lm-eval needs a tokenizer")
        try:
            batch = int(batch_size)
        except (TypeError, ValueError):  # "auto" and friends
            batch = 32
        self.evaluator = Evaluator(self.pretrained.model, self.pretrained.tokenizer, batch_size=batch,
                                   max_length=int(max_length) if max_length else None)
        # keeps the generation Decoders; its product mode multiplies bf16 weights in fp32 where bf16 is emulated
        self.backend = self.pretrained.accelerate()
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer_name(self) -> str:
        return str(self.pretrained.path / "tokenizer.model")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.evaluator.scorer.progress = not disable_tqdm
        with self.backend.products():
            return self.evaluator.loglikelihood([req.args for req in requests], desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.evaluator.scorer.progress = not disable_tqdm
        # score_bos: the same number as lm-eval's hf backend on the Hugging Face export (it scores BOS too)
        with self.backend.products():
            scores = self.evaluator.loglikelihood_rolling([req.args[0] for req in requests], score_bos=True)
        return [ll for ll, _ in scores]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) generation until one of ``until``, like lm-eval's ``hf``:
        the context is cut on the left to leave room for ``max_gen_toks`` new tokens, and the text is what the
        new tokens decode to on their own (no leading space)."""
        from ..generate import generate

        tok = self.pretrained.tokenizer
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            room = max(1, self.evaluator.scorer.max_length - max_new)
            ids = tok.encode(context, bos=True)[-room:]
            text = generate(self.backend, tok, [ids], max_new_tokens=max_new, temperature=temperature,
                            top_k=kwargs.pop("top_k", None), top_p=kwargs.pop("top_p", None),
                            seed=kwargs.pop("seed", None), stop=[s for s in until if s])[0]
            # lm-eval's hf backend decodes the new tokens on their own, which drops SentencePiece's leading space
            text = text[1:] if text.startswith(" ") else text
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out
