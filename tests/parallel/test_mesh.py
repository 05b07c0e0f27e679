"""Layout arithmetic and validation (no processes launched)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llamalab.model import preset_args
from llamalab.parallel.mesh import LayoutError, ParallelDims
from llamalab.parallel.pipeline import schedule_class, split_layers, stages_per_rank


def test_dp_shard_fills_the_world():
    dims = ParallelDims(dp_shard=-1, tp=2, pp=2, world_size=16)
    assert (dims.dp_shard, dims.dp, dims.fsdp_enabled, dims.ddp_enabled) == (4, 4, True, False)
    # the config default dp_shard = 1 stretches too, so the default config runs FSDP over every rank
    cfg = SimpleNamespace(dp_replicate=1, dp_shard=1, tp=1, pp=1)
    assert ParallelDims.from_config(cfg, 8).dp_shard == 8
    assert ParallelDims(dp_replicate=2, dp_shard=1, world_size=2).ddp_enabled
    assert ParallelDims(dp_replicate=2, dp_shard=1, tp=2, world_size=4).fsdp_enabled  # DDP x TP runs as HSDP


def test_bad_layouts_name_the_field():
    with pytest.raises(LayoutError, match=r"dp_replicate \(1\) \* dp_shard \(3\) \* tp \(2\) \* pp \(1\) = 6, but the world size is 8"):
        ParallelDims(dp_shard=3, tp=2, world_size=8)
    with pytest.raises(LayoutError, match="parallel.tp must be a positive integer"):
        ParallelDims(tp=0, world_size=1)
    with pytest.raises(LayoutError, match=r"tp = 8 must divide the model's n_heads \(52\)"):
        ParallelDims(dp_shard=1, tp=8, world_size=8).validate_model(preset_args("llama-33b"))
    with pytest.raises(LayoutError, match=r"exceeds the model's n_layers \(2\)"):
        ParallelDims(dp_shard=1, pp=4, world_size=4).validate_model(preset_args("tiny"))


def test_pipeline_stages_split_layers_evenly():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert [len(r) for r in split_layers(80, 16)] == [5] * 16
    with pytest.raises(LayoutError, match="3 pipeline stages need at least 3 layers"):
        split_layers(2, 3)
    assert stages_per_rank("1f1b") == 1 and stages_per_rank("Interleaved1F1B") == 2
    with pytest.raises(LayoutError, match="pp_schedule must be one of"):
        schedule_class("ZeroBubble")
