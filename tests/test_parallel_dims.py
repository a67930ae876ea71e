"""Layout validation: every impossible layout is rejected by ParallelDims.from_config with a message saying
what to change, before any process group exists (no processes are started here)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from exatrain.config import ConfigError, load_config
from exatrain.parallel import ParallelDims

BASE = ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
        "model.vocab_size=64", "model.max_seq_len=16", "model.tie_embeddings=false", "data.seq_len=16",
        "train.global_batch=16", "train.micro_batch=2"]


def dims(world: int, *overrides: str) -> ParallelDims:
    return ParallelDims.from_config(load_config(None, BASE + list(overrides)), world)


def test_infers_the_minus_one_degree():
    d = dims(8, "parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=-1")
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp) == (2, 1, 2, 2)
    assert d.dp_size == 2 and d.n_stages == 2 and d.pp_microbatches == 2
    d = dims(8, "parallel.tp=-1", "parallel.pp=1", "parallel.dp_shard=4")
    assert d.tp == 2
    d = dims(8, "parallel.dp_replicate=2", "parallel.dp_shard=-1")
    assert (d.dp_replicate, d.dp_shard, d.dp_size) == (2, 4, 8)
    d = dims(4, "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=ZBVZeroBubble",
             "parallel.pp_virtual_stages=2")
    assert d.virtual_stages == 2 and d.n_stages == 4


@pytest.mark.parametrize("world, overrides, message", [
    (8, ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"], "multiply to 4 but the world size is 8"),
    (8, ["parallel.tp=-1", "parallel.dp_shard=-1"], "only one of"),
    (8, ["parallel.tp=3", "parallel.dp_shard=-1"], "not divisible by the product"),
    (8, ["parallel.tp=8", "parallel.dp_shard=1"], "must divide model.n_heads=4"),
    (4, ["parallel.tp=4", "parallel.dp_shard=1"], "must divide the KV heads"),
    (2, ["parallel.tp=2", "parallel.dp_shard=1", "model.vocab_size=63"], "pad the vocabulary"),
    (2, ["parallel.tp=2", "parallel.dp_shard=1", "model.ffn_hidden=63"], "FFN hidden size model.ffn_hidden=63"),
    (2, ["parallel.tp=2", "parallel.dp_shard=1", "data.seq_len=15"], "parallel.sequence_parallel=false"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "model.tie_embeddings=true"], "set model.tie_embeddings=false"),
    (4, ["parallel.pp=4", "parallel.dp_shard=1", "parallel.pp_schedule=Interleaved1F1B",
         "parallel.pp_virtual_stages=2"], "cannot fill 8 pipeline stages"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_stage_layers=[1,2,1]"], "give one layer count per stage"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_stage_layers=[1,2]"], "must add up to the number of layers"),
    (2, ["parallel.dp_shard=2", "parallel.pp_stage_layers=[2,2]"], "parallel.pp=1: remove it"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=GPipe", "parallel.pp_virtual_stages=2"],
     "runs one stage per rank"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=ZBVZeroBubble"], "exactly 2 stages per rank"),
    (2, ["parallel.dp_shard=2", "parallel.pp_virtual_stages=2"], "needs parallel.pp > 1"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_microbatches=3"], "must divide train.micro_batch=2"),
    (4, ["parallel.pp=4", "parallel.dp_shard=1"], "1F1B needs parallel.pp_microbatches >= pp=4"),
    (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=Interleaved1F1B",
         "parallel.pp_virtual_stages=2", "train.micro_batch=1"], "multiple of pp=2"),
    (16, ["parallel.dp_shard=16"], "must be a multiple of train.micro_batch=2 x data-parallel size 16"),
    (2, ["parallel.tp=2", "parallel.dp_shard=1", "parallel.engine=deepspeed"], "data parallelism only"),
    (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.engine=deepspeed"], "no replicate dimension"),
    (4, ["parallel.dp_shard=2", "parallel.dp_replicate=2", "parallel.zero_stage=1"], "set parallel.dp_replicate=1"),
    (2, ["parallel.dp_shard=2", "parallel.engine=deepspeed", "train.compile=true"], "train.compile=false"),
])
def test_invalid_layouts_say_what_to_change(world, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        dims(world, *overrides)
    assert not dist.is_initialized()


@pytest.mark.parametrize("override", ["parallel.tp=0", "parallel.pp=-2", "parallel.dp_replicate=0"])
def test_degree_values_checked_at_load(override):
    with pytest.raises(ConfigError, match="must be >= 1 or -1"):
        load_config(None, BASE + [override])


def test_explicit_stage_layers_and_v_placement():
    from exatrain.parallel.pipeline import local_stage_ids, stage_layer_counts

    assert stage_layer_counts(10, 4, []) == [3, 3, 2, 2]
    assert stage_layer_counts(4, 2, [1, 3]) == [1, 3]
    d = dims(4, "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=ZBVZeroBubble",
             "parallel.pp_virtual_stages=2")
    assert [local_stage_ids(r, d, "ZBVZeroBubble") for r in (0, 1)] == [[0, 3], [1, 2]]
    assert [local_stage_ids(r, d, "Interleaved1F1B") for r in (0, 1)] == [[0, 2], [1, 3]]
