"""Layout enumeration and ranking (exatrain.bench.planner): every proposal passes the trainer's own
validator, native ZeRO-1 (with TP and PP too) is ranked among them, and layouts round-trip through job
configs."""

from __future__ import annotations

import pytest

from exatrain.bench.hardware import default_cluster
from exatrain.bench.layout import Layout, check, from_config, to_config
from exatrain.bench.planner import enumerate_layouts, format_plan, plan
from exatrain.config import load_config
from exatrain.parallel.dims import ParallelDims

TINY = ["model.dim=64", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=2", "model.vocab_size=512",
        "model.max_seq_len=64", "model.tie_embeddings=false", "data.seq_len=64", "train.global_batch=32",
        "train.micro_batch=2", "train.dtype=bf16"]


def test_proposals_are_accepted_by_the_trainer_validator():
    cfg = load_config(None, TINY)
    cl = default_cluster("frontier")
    p = plan(cfg, 16, cl, top=10**6, cap_gib=1e9)
    assert p.ranked and p.rejected["validator"] > 0
    for c in p.ranked:
        ParallelDims.from_config(to_config(cfg, c.layout), c.layout.world)  # raises if the trainer would refuse
        assert c.invalid is None
    zero1 = {(c.layout.tp > 1, c.layout.pp > 1) for c in p.ranked if c.layout.sharding == "zero1"
             and c.layout.engine == "native"}
    assert zero1 == {(False, False), (True, False), (False, True), (True, True)}  # alone, x TP, x PP, 3D
    ranked = [c.tokens_per_s for c in p.ranked]
    assert ranked == sorted(ranked, reverse=True)
    assert "tokens/s" in format_plan(p, cl)


def test_enumeration_reaches_every_knob():
    cfg = load_config(None, TINY)
    layouts = enumerate_layouts(cfg, 8)
    seen = {(lay.schedule if lay.pp > 1 else "-", lay.engine, lay.zero_stage, lay.activation_checkpointing)
            for lay in layouts}
    assert {s for s, *_ in seen} == {"-", "GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"}
    assert {("deepspeed", z) for z in (1, 2, 3)} | {("native", z) for z in (1, 2, 3)} <= {(e, z) for _, e, z, _ in seen}
    assert {lay.tp for lay in layouts} == {1, 2, 4, 8} and {lay.dp_replicate for lay in layouts} >= {1, 2}
    assert all(lay.world == 8 for lay in layouts)


def test_memory_cap_filters():
    cfg = load_config(None, TINY)
    cl = default_cluster("frontier")
    loose = plan(cfg, 8, cl, top=10**6, cap_gib=1e9)
    tight_cap = sorted(c.peak_gib for c in loose.ranked)[len(loose.ranked) // 2]
    tight = plan(cfg, 8, cl, top=10**6, cap_gib=tight_cap)
    assert tight.rejected["memory"] > 0 and all(c.peak_gib <= tight_cap for c in tight.ranked)


@pytest.mark.parametrize("world, overrides", [
    (16, ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=-1", "parallel.pp_microbatches=4",
          "train.micro_batch=8", "train.global_batch=32", "parallel.pp_schedule=Interleaved1F1B",
          "parallel.pp_virtual_stages=2"]),
    (4, ["parallel.dp_shard=2", "parallel.dp_replicate=2", "parallel.zero_stage=2", "train.micro_batch=2"]),
])
def test_layout_round_trips_through_the_config(world, overrides):
    cfg = load_config(None, TINY + overrides)
    lay = from_config(cfg, world)
    assert from_config(to_config(cfg, lay), world) == lay and check(cfg, lay) is None


def test_check_names_the_reason():
    cfg = load_config(None, TINY)
    assert "data parallelism only" in check(cfg, Layout(tp=2, dp_shard=2, engine="deepspeed", zero_stage=1))
    assert "1F1B needs" in check(cfg, Layout(pp=8, micro_batch=8, dp_shard=1))
