"""lm-evaluation-harness's ``local-completions`` model pointed at the server scores tasks as ``llamalab eval`` does
in process, offline on the shared task files.

Like for like: ``llamalab eval`` scores ``<s> context continuation``. lm-eval's ``remote`` tokenizer backend (the
server's vLLM-style /tokenize) encodes without special tokens, and TemplateAPI ignores ``add_bos_token`` for it, so
its requests carry no BOS; those are compared with our harness' scorer on the same BOS-less token ids. With the
``huggingface`` backend on our HF export and ``add_bos_token=True`` lm-eval sends exactly ``llamalab eval``'s token
ids, and the comparison is with ``llamalab eval``'s own JSON output. Both: per item, every choice's log-likelihood
(rel 1e-5), lm-eval's acc/acc_norm decisions and is_greedy.
"""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("openai")
pytest.importorskip("tenacity")  # lm-eval's API models (its "api" extra)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import API_KEY  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*(get_task_dict|TaskManager.load).*:DeprecationWarning")]

TASKS = ["arc_easy", "piqa"]
LIMIT = 10


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from llamalab.eval.tasks import write_lm_eval_tasks
    from shared_data import shared_path

    data_dir = shared_path("eval")
    yamls = tmp_path_factory.mktemp("lm-eval-yamls")
    names = write_lm_eval_tasks(data_dir, yamls, tasks=TASKS)
    return data_dir, names, TaskManager(include_path=str(yamls), include_defaults=False)  # ours include theirs


def run_local_completions(server, lm_tasks, **model_args) -> dict[str, list[dict]]:
    """lm-eval's samples per our task name, by doc_id, from ``local-completions`` against the server."""
    from lm_eval.tasks import get_task_dict

    _, names, manager = lm_tasks
    args = {"base_url": f"{server.base_url}/completions", "model": server.model, "batch_size": 8,
            "max_length": 512, "auth_token": API_KEY, **model_args}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", API_KEY)  # LocalCompletionsAPI's key for /v1/completions
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                      tasks=list(get_task_dict(list(names.values()), manager).values()),
                                      limit=LIMIT, log_samples=True, task_manager=manager)  # not a default one
    return {task: sorted(out["samples"][names[task]], key=lambda s: s["doc_id"]) for task in TASKS}


def compare(samples: list[dict], items, lls: list[list[float]], greedy: list[list[bool]], task: str) -> None:
    from llamalab.eval.scoring import choose

    assert len(samples) == len(items) == len(lls) == LIMIT
    for s, item, mine, mine_greedy in zip(samples, items, lls, greedy):
        assert s["doc_id"] == item.index
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert len(theirs) == len(item.choices)
        assert theirs == pytest.approx(mine, rel=1e-5, abs=1e-6), f"{task} #{item.index}"
        assert [bool(r[0][1]) for r in s["resps"]] == mine_greedy, f"{task} #{item.index}: is_greedy"
        picks = choose(item, mine)
        assert s["acc"] == int(picks["acc"] == item.gold), f"{task} #{item.index}: acc"
        assert s["acc_norm"] == int(picks["acc_norm"] == item.gold), f"{task} #{item.index}: acc_norm"


def test_remote_tokenizer_equals_our_scorer(server, ref, lm_tasks):
    """tokenizer_backend=remote (/tokenizer_info, /tokenize, /detokenize): BOS-less requests, same numbers."""
    from llamalab.eval.harness import Evaluator, TokenRequest, encode_pair
    from llamalab.eval.tasks import load_task

    class NoBos:  # lm-eval's remote tok_encode: add_special_tokens=False
        bos_id = ref.tokenizer.bos_id

        @staticmethod
        def encode(text, bos=True):
            return ref.tokenizer.encode(text, bos=False)

    samples = run_local_completions(server, lm_tasks, tokenizer_backend="remote")
    data_dir = lm_tasks[0]
    evaluator = Evaluator(ref.model, ref.tokenizer, batch_size=16, progress=False)
    for task in TASKS:
        items = load_task(task, data_dir, LIMIT)
        requests = [TokenRequest(*map(tuple, encode_pair(NoBos, c, x))) for it in items
                    for c, x in zip(it.contexts, it.continuations)]
        assert all(r.context[0] != ref.tokenizer.bos_id for r in requests)
        scores = iter(evaluator.scorer.score(requests))
        lls, greedy = [], []
        for it in items:
            got = [next(scores) for _ in it.choices]
            lls.append([g[0] for g in got])
            greedy.append([bool(g[1]) for g in got])
        compare(samples[task], items, lls, greedy, task)


def test_hf_tokenizer_with_bos_equals_llamalab_eval(server, ref, lm_tasks, tmp_path):
    """tokenizer_backend=huggingface on our HF export with add_bos_token=True: exactly ``llamalab eval``'s ids, and
    its JSON output's log-likelihoods, decisions and accuracies."""
    pytest.importorskip("transformers")
    from llamalab.cli import main
    from llamalab.convert.hf import export_hf
    from llamalab.eval.tasks import load_task

    hf = export_hf(server.checkpoint, tmp_path / "hf")
    samples = run_local_completions(server, lm_tasks, tokenizer_backend="huggingface", tokenizer=str(hf),
                                    add_bos_token=True)
    data_dir = lm_tasks[0]
    assert main(["eval", str(server.checkpoint), "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--data-dir",
                 str(data_dir), "--no-progress", "--output", str(tmp_path / "eval.json")]) == 0
    ours = json.loads((tmp_path / "eval.json").read_text())
    for task in TASKS:
        items = load_task(task, data_dir, LIMIT)
        records = ours["examples"][task]
        lls = [r["loglikelihoods"] for r in records]
        greedy = [[bool(r[0][1]) for r in s["resps"]] for s in samples[task]]  # not in llamalab eval's output
        compare(samples[task], items, lls, greedy, task)
        assert [r["correct"]["acc"] for r in records] == [s["acc"] for s in samples[task]]
        assert ours["results"][task]["acc"] == pytest.approx(sum(s["acc"] for s in samples[task]) / LIMIT)


def test_remote_tokenizer_special_tokens(server, ref):
    """lm-eval's RemoteTokenizer finds BOS/EOS ids by tokenizing their strings without special tokens (vLLM's
    /tokenize, a Hugging Face tokenizer, turns "<s>" into its id); its rolling log-likelihood starts from that BOS."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import RemoteTokenizer

    from llamalab.eval.harness import Evaluator

    remote = RemoteTokenizer(server.base_url + "/completions", auth_token=API_KEY)
    assert (remote.bos_token_id, remote.eos_token_id) == (ref.tokenizer.bos_id, ref.tokenizer.eos_id)
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", API_KEY)
        lm = LocalCompletionsAPI(base_url=f"{server.base_url}/completions", model=server.model,
                                 tokenizer_backend="remote", auth_token=API_KEY, max_length=66, batch_size=4)
        theirs = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert len(ref.encode(text, bos=False)) > 64 * 2  # several windows of 64 tokens (lm-eval: max_length - 2)
    evaluator = Evaluator(ref.model, ref.tokenizer, batch_size=4, progress=False)
    ((ll, _),) = evaluator.loglikelihood_rolling([text], max_length=64)
    assert theirs == [pytest.approx(ll, rel=1e-5)]
