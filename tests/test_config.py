import pytest

from exatrain.cli import main
from exatrain.config import ConfigError, from_dict, load_config, to_dict


def test_defaults_load_and_round_trip():
    cfg = load_config("tiny.yaml", ["optim.lr=1e-3", "train.steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.run_dir == "runs/tiny"
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, key", [
    (["model.bogus=1"], "model.bogus"),
    (["train.steps=abc"], "train.steps"),
    (["model.n_heads=5"], "model.dim"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["train.global_batch=10", "train.micro_batch=4"], "train.global_batch"),
    (["schedule.name=linear"], "schedule.name"),
    (["schedule.power_b=0.5"], "schedule.power_b"),
    (["data.meco.cooldown_fraction=1.0"], "data.meco.cooldown_fraction"),
    (["data.meco.url_value=domain"], "data.meco.url_value"),
    (["metrics.flops_convention=causal"], "metrics.flops_convention"),
    (["data.seq_len=1024"], "data.seq_len"),
    (["parallel.dp_shard=0"], "parallel.dp_shard"),
    (["optim.lr=-1"], "optim.lr"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny.yaml", override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_print_config_and_error_exit(capsys):
    assert main(["print-config", "model.dim=64"]) == 0
    assert "dim: 64" in capsys.readouterr().out
    assert main(["print-config", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err


@pytest.mark.parametrize("name, world, layout, vocab", [
    ("22b", 16, "pp=8(v=1, microbatches=320) dp_replicate=1 dp_shard=2 tp=1 world=16", 50304),
    ("175b", 128, "pp=16(v=1, microbatches=320) dp_replicate=1 dp_shard=2 tp=4 world=128", 50688),
    ("1t", 1024, "pp=128(v=1, microbatches=512) dp_replicate=1 dp_shard=2 tp=4 world=1024", 50688),
])
def test_frontier_recipes_are_valid_layouts(name, world, layout, vocab):
    """The paper's layouts (TP x PP, native ZeRO-1 over dp 2, 1F1B of single-sequence micro-batches, full
    recompute, seq 2048), GPT-2's 50257-token vocabulary padded to 128 x TP as Megatron does."""
    from exatrain.bench.flops import non_embedding_params
    from exatrain.parallel import ParallelDims

    cfg = load_config(f"{name}-frontier.yaml")
    assert ParallelDims.from_config(cfg, world).describe() == layout
    assert cfg.model.vocab_size == vocab and cfg.data.tokenizer.vocab_size == 50257
    p, t = cfg.parallel, cfg.train
    assert (p.zero_stage, p.engine, p.pp_schedule, t.activation_checkpointing, cfg.data.seq_len) == (
        1, "native", "1F1B", "full", 2048)
    assert t.micro_batch == p.pp_microbatches  # one sequence per pipeline micro-batch
    billions = {"22b": 22, "175b": 175, "1t": 1000}[name]
    assert non_embedding_params(cfg.model) / 1e9 == pytest.approx(billions, rel=0.02)
