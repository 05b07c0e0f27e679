"""Parity with lm-evaluation-harness itself: its ``hf`` backend on the Hugging Face export of a small random model
against llamalab's harness on the native checkpoint, offline on the shared task files.

For 20 items of each of the eight tasks: the same token ids, log-likelihoods within 1e-4, and the same choice for
every item under acc and acc_norm (our yamls ask lm-eval for both on every task). Also rolling log-likelihoods
and greedy generation through our lm-eval model class against the ``hf`` backend.
"""

from __future__ import annotations

import pytest
import torch

from llamalab.eval.harness import Evaluator, encode_pair, evaluate_tasks
from llamalab.eval.tasks import TASKS, load_task, write_lm_eval_tasks

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

LIMIT = 20
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    from llamalab.checkpoint import save_pretrained
    from llamalab.convert.hf import export_hf
    from llamalab.model import ModelArgs, build_model
    from llamalab.tokenizer import Tokenizer
    from shared_data import shared_path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread avoids OpenMP stalls on a loaded machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    data_dir = shared_path("eval")
    tok_path = shared_path("weights", "stories260K", "tok512.reconstructed.model")
    tmp = tmp_path_factory.mktemp("parity")
    # max_seq_len 256: long BoolQ passages are cut on the left, which both sides must do the same way
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                     norm_eps=1e-5, max_seq_len=256)
    model = build_model(args, seed=0)
    with torch.no_grad():  # non-trivial norms and sharper distributions, so choices are not near-ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(3.0)
        # sentencepiece and tokenizers decode invalid UTF-8 differently (byte by byte vs the whole byte run), and
        # lm-eval's hf decode skips <unk> where sentencepiece writes " ⁇ ": keep byte, unknown and control tokens
        # out of greedy generation (their output rows give logit 0, below the best of the other 250 tokens)
        sp = Tokenizer(tok_path).sp
        odd = [i for i in range(sp.GetPieceSize()) if sp.IsByte(i) or sp.IsUnknown(i) or sp.IsControl(i)]
        model.output.weight[odd] = 0.0
    save_pretrained(tmp / "native", model, tok_path)
    export_hf(tmp / "native", tmp / "hf")

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    hf = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=8, device="cpu")
    names = write_lm_eval_tasks(data_dir, tmp / "yamls")
    tasks = get_task_dict(list(names.values()), TaskManager(include_path=str(tmp / "yamls")))
    out = lm_eval.simple_evaluate(model=hf, tasks=list(tasks.values()), limit=LIMIT, log_samples=True)
    tokenizer = Tokenizer(tmp / "native" / "tokenizer.model")
    ours = evaluate_tasks(Evaluator(model, tokenizer, batch_size=16, progress=False), list(TASKS), data_dir, LIMIT)
    return {"hf": hf, "names": names, "tasks": tasks, "samples": out["samples"], "ours": ours, "tokenizer": tokenizer,
            "data_dir": data_dir, "native": tmp / "native"}


@pytest.mark.parametrize("task", list(TASKS))
def test_same_loglikelihoods_and_choices(setup, task):
    samples = sorted(setup["samples"][setup["names"][task]], key=lambda s: s["doc_id"])
    ours = setup["ours"]["examples"][task]
    assert len(samples) == len(ours) == LIMIT
    for s, mine in zip(samples, ours):
        assert s["doc_id"] == mine["index"]
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        # fp32 sums of a few hundred token log-probabilities: near -850 one float32 ulp is 6e-5, so allow a few
        # ulps (rel 1e-6) beside 1e-4; a tokenization or scoring slip moves them by far more than that
        assert mine["loglikelihoods"] == pytest.approx(theirs, abs=1e-4, rel=1e-6), f"{task} item {mine['index']}"
        assert mine["correct"]["acc"] == s["acc"], f"{task} item {mine['index']}: acc"
        assert mine["correct"]["acc_norm"] == s["acc_norm"], f"{task} item {mine['index']}: acc_norm"


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_equal_lm_eval_requests(setup, task):
    """lm-eval's own task objects (its yamls on the local files) build the same (context, continuation) requests,
    choices and gold labels, for the first 200 items."""
    lm_task = setup["tasks"][setup["names"][task]]
    lm_task.build_all_requests(limit=200, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in lm_task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    items = load_task(task, setup["data_dir"], limit=200)
    assert len(items) == len(by_doc) == 200
    for it in items:
        insts = sorted(by_doc[it.index], key=lambda i: i.idx)
        assert [i.args for i in insts] == list(zip(it.contexts, it.continuations)), f"{task} #{it.index}"
        doc = insts[0].doc
        gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
        assert gold == it.gold and lm_task.doc_to_choice(doc) == it.choices


@pytest.mark.parametrize("task", list(TASKS))
def test_same_token_ids_as_lm_eval_hf(setup, task):
    """lm-eval's hf backend on our HF export sees exactly the token ids our harness scores (the export writes a
    tokenizer.json with SentencePiece's rules; transformers' own conversion of tokenizer.model would differ)."""
    hf, tok = setup["hf"], setup["tokenizer"]
    for item in load_task(task, setup["data_dir"], limit=LIMIT):
        for context, continuation in zip(item.contexts, item.continuations):
            assert hf._encode_pair(context, continuation) == encode_pair(tok, context, continuation)


def test_lm_eval_model_class_matches_hf_backend(setup):
    """``LlamalabLM`` (``--model llamalab``): loglikelihood, loglikelihood_rolling and generate_until."""
    from lm_eval.api.instance import Instance

    import llamalab.eval.lm_eval_model as lm_eval_model

    ours = lm_eval_model.LlamalabLM(checkpoint=str(setup["native"]), batch_size=8)
    pairs = [(c, x) for it in load_task("winogrande", setup["data_dir"], limit=5) + load_task(
        "arc_easy", setup["data_dir"], limit=5) for c, x in zip(it.contexts, it.continuations)]
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    mine, theirs = ours.loglikelihood(requests, disable_tqdm=True), setup["hf"].loglikelihood(requests, True)
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], abs=1e-4, rel=0)
    assert [g for _, g in mine] == [g for _, g in theirs]
    texts = [item.contexts[0] for item in load_task("boolq", setup["data_dir"], limit=3)]  # > 256 tokens
    assert max(len(setup["tokenizer"].encode(t)) for t in texts) > 256
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        setup["hf"].loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-6)  # sums over ~1000 tokens

    prompts = [item.contexts[0] for item in load_task("piqa", setup["data_dir"], limit=3)]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
           for i, p in enumerate(prompts)]
    texts = ours.generate_until(gen, disable_tqdm=True)
    assert texts == setup["hf"].generate_until(gen, disable_tqdm=True)
    assert all(len(t) > 3 for t in texts)  # real continuations, not an immediate stop
