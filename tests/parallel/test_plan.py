"""The memory estimator against what autograd really saves, its arithmetic, and the ``llamalab plan`` command."""

from __future__ import annotations

import pytest
import torch

from llamalab.cli import main as cli
from llamalab.model import build_model, preset_args
from llamalab.parallel.mesh import ParallelDims
from llamalab.parallel.plan import GiB, activation_bytes_per_token, estimate


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_block_activation_estimate_bounds_what_autograd_saves(n_kv_heads):
    """Sum the distinct storages autograd keeps for one bf16 block's backward; the estimate is a tight upper bound.
    Heads of 64 dimensions: the CPU attends them in bf16, as a GPU does (smaller ones it attends in fp32)."""
    args = preset_args("demo", n_heads=4, n_kv_heads=n_kv_heads)
    model = build_model(args, seed=0, dtype=torch.bfloat16)
    b, s = 2, 128
    h = model.tok_embeddings(torch.randint(0, args.vocab_size, (b, s))).detach().requires_grad_()
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers["0"](h, model.rope_cos, model.rope_sin)
    measured = sum(saved.values()) / (b * s)
    estimated, _ = activation_bytes_per_token(args, 1, "none")
    assert measured <= estimated <= 1.2 * measured, (measured, estimated)


def test_recomputation_and_sharding_reduce_memory():
    args = preset_args("llama-7b")
    kw = dict(micro_batch=1, seq_len=2048)
    one = ParallelDims(dp_shard=8, world_size=8)
    modes = [estimate(args, one, ac_mode=m, **kw).activations for m in ("none", "selective", "full")]
    assert modes[0] > modes[1] > modes[2]
    # FSDP shards fp32 params (4 B), grads (4 B) and both AdamW moments (8 B) evenly
    e = estimate(args, one, **kw)
    assert e.params + e.grads + e.optimizer == pytest.approx(16 * args.num_params() / 8, rel=1e-6)
    tp = estimate(args, ParallelDims(dp_shard=4, tp=2, world_size=8), **kw)
    assert tp.activations < e.activations and tp.params == pytest.approx(e.params, rel=1e-3)


def test_plan_command_prints_a_table(capsys):
    assert cli(["plan", "llama-7b", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "dp_shard=8 tp=1 pp=1" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("none", "selective", "full"))]
    assert [r[0] for r in rows] == ["none", "selective", "full"] and all(r[-1] in ("yes", "NO") for r in rows)
    assert 16 * 6.74e9 / 8 / GiB == pytest.approx(sum(float(x) for x in rows[0][1:4]), rel=0.02)


def test_plan_command_reads_a_config_and_reports_bad_layouts(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npreset = "tiny"\n[batch]\nmicro_batch = 4\n[length]\nsteps = 10\n[parallel]\ntp = 2\ndp_shard = 2\n')
    assert cli(["plan", str(cfg), "--gpus", "4", "--gpu-memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "dp_shard=2 tp=2" in out and "4 x 128 tokens" in out
    assert cli(["plan", "llama-33b", "--gpus", "16", "--gpu-memory", "80", "--tp", "8"]) == 2
    assert "must divide the model's n_heads (52)" in capsys.readouterr().err
    assert cli(["plan", "llama-65b", "--gpus", "2048", "--gpu-memory", "80", "--search"]) == 0
    assert "tp=8" in capsys.readouterr().out
