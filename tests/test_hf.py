"""Hugging Face export/import (exatrain.interop.hf) against transformers' LlamaForCausalLM as the reference."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from exatrain.cli import main
from exatrain.config import ConfigError, ModelConfig, MupConfig, load_config, to_dict
from exatrain.eval.perplexity import load_run
from exatrain.interop.hf import (
    INDEX,
    export_hf,
    from_hf,
    hf_config,
    import_hf,
    load_init_from,
    parse_size,
    read_hf_weights,
    run_tokenizer,
    to_hf,
    write_safetensors,
)
from exatrain.model.llama import build_model, materialize
from exatrain.train.checkpoint import Checkpointer, CheckpointError, check_compatible
from helpers import TINY, losses, run, torchrun_cmd, train_cmd

transformers = pytest.importorskip("transformers")

BASE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=96, vocab_size=80, max_seq_len=32)
MUP = MupConfig(enabled=True, base_dim=32, emb_mult=10.0, res_mult=0.5)  # width_mult 2; 10 is not a power of 2
CASES = {
    "tied": BASE,
    "untied_gqa": replace(BASE, n_kv_heads=2, tie_embeddings=False),
    "mup_tied_gqa": replace(BASE, n_kv_heads=1, mup=MUP),
    "mup_untied_pow2": replace(BASE, n_kv_heads=2, tie_embeddings=False, mup=replace(MUP, emb_mult=8.0)),
}


def save_hf(model, cfg: ModelConfig, out: Path, shard_bytes: int = 20_000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(to_hf(model.state_dict(), cfg), out, shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))


@torch.no_grad()
def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf(tokens).logits


@pytest.mark.parametrize("case", CASES)
def test_export_matches_exatrain_logits_and_round_trips(case, tmp_path):
    cfg = CASES[case]
    model = materialize(build_model(cfg), "cpu", 0).eval()
    save_hf(model, cfg, tmp_path)
    assert len(json.loads((tmp_path / INDEX).read_text())["weight_map"]) == 2 + 9 * cfg.n_layers + (
        0 if cfg.tie_embeddings and not cfg.mup.enabled else 1)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    assert (hf_logits(tmp_path, tokens) - ours).abs().max().item() <= 1e-5

    state = from_hf(read_hf_weights(tmp_path), cfg)
    original = model.state_dict()
    assert state.keys() == original.keys()
    exact = all(math.log2(f).is_integer() for f in (cfg.mup.emb_mult, cfg.mup.res_mult)) or not cfg.mup.enabled
    for name, t in original.items():
        if exact:
            assert torch.equal(state[name], t), name
        else:  # an emb_mult of 10 folds and unfolds within one rounding
            torch.testing.assert_close(state[name], t, rtol=2.4e-7, atol=0.0)


def test_init_from_loads_hf_weights_and_validates(tmp_path):
    cfg = CASES["untied_gqa"]
    model = materialize(build_model(cfg), "cpu", 0)
    save_hf(model, cfg, tmp_path / "hf")
    target = materialize(build_model(replace(cfg, init_from=f"hf:{tmp_path / 'hf'}")), "cpu", 5)
    load_init_from(target)
    for name, t in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], t), name

    base = [*TINY, "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96",
            "model.tie_embeddings=false", f"model.init_from=hf:{tmp_path / 'hf'}"]
    with pytest.raises(ConfigError, match=r"(?s)model.init_from.*vocab_size: checkpoint 80 vs model.vocab_size"
                                          r".*num_hidden_layers: checkpoint 2 vs model.n_layers=3"):
        load_config("tiny.yaml", [*base, "model.n_layers=3"])
    with pytest.raises(ConfigError, match="model.init_from: .* has no config.json"):
        load_config("tiny.yaml", [*base, f"model.init_from=hf:{tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="expected hf:PATH"):
        load_config("tiny.yaml", [*base, f"model.init_from={tmp_path / 'hf'}"])
    with pytest.raises(ConfigError, match="parallel.init"):
        load_config("tiny.yaml", [*base, "model.vocab_size=80", "parallel.init=sharded"])
    assert load_config("tiny.yaml", [*base, "model.vocab_size=80"]).model.init_from.startswith("hf:")

    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "run"), "tiny.yaml", "data.seq_len=32"]) == 0
    imported = load_config(tmp_path / "run" / "config.yaml")
    assert imported.model.init_from == f"hf:{(tmp_path / 'hf').resolve()}"
    assert (imported.model.dim, imported.model.n_kv_heads, imported.model.vocab_size) == (64, 2, 80)
    assert not imported.model.tie_embeddings and imported.run_dir == str(tmp_path / "run")


class ModelState:
    """The engine entry of a checkpoint, model weights only: what `export` reads."""

    def __init__(self, model):
        self.model = model
        self.model_parts = [model]  # what the checkpointer's finiteness check reads

    def state_dict(self):
        return {"model": self.model.state_dict()}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP saving in one process, as meant
def test_export_of_a_checkpoint_with_tokenizer(tmp_path, cache):
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path / 'run'}", "model.n_kv_heads=2",
                                    "model.tie_embeddings=false"])
    model = materialize(build_model(cfg.model), "cpu", 0).eval()
    Checkpointer(tmp_path / "run", cfg).save(3, {"engine": ModelState(model)}, {"tokens_seen": 0})
    out = export_hf(tmp_path / "run", tmp_path / "hf", step=3, max_shard_size="30KB")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    tokens = torch.tensor([tok("Tokenizers and weights travel together.")["input_ids"]])
    assert tokens[0, 0] == 0 and (tokens[0, 1:] > 2).all(), "HF encodes like training: <bos> + text"
    with torch.no_grad():
        assert (hf_logits(out, tokens) - model(tokens)).abs().max().item() <= 1e-5
    with pytest.raises(FileExistsError, match="already holds a model"):
        export_hf(tmp_path / "run", tmp_path / "hf")


def test_resume_does_not_compare_init_from():
    cfg = load_config("tiny.yaml", TINY)
    meta = {"config": to_dict(cfg)}
    del meta["config"]["model"]["init_from"]  # a checkpoint from before the key, or one whose source moved
    check_compatible(meta, replace(cfg, model=replace(cfg.model, init_from="hf:/gone")), Path("ckpt"))
    with pytest.raises(CheckpointError, match="model.dim: checkpoint 32 vs run 64"):
        check_compatible(meta, replace(cfg, model=replace(cfg.model, dim=64)), Path("ckpt"))


def test_run_tokenizer_from_its_file_needs_no_data(tmp_path):
    cfg = load_config("tiny.yaml", [*TINY, "data.tokenizer.kind=byte", f"data.paths=[{tmp_path / 'gone.jsonl'}]"])
    assert run_tokenizer(cfg).vocab_size == 259


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1000") == 1000 and parse_size("1.5KB") == 1500
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five")


@pytest.mark.slow
def test_export_from_parallel_layouts_and_init_from_across_layouts(tmp_path, cache):
    """A trained run -> `exatrain export` -> HF (logits, AutoTokenizer); then `model.init_from` runs on one
    process, FSDP dp2, tp2 and DeepSpeed ZeRO-3 start from the same weights (same first loss), and their checkpoints, saved
    under those layouts, export to HF models with exatrain's logits."""
    short = ["train.steps=2", "checkpoint.every=0", "model.n_heads=4", "model.n_kv_heads=2"]  # GQA, tp2 divides it
    run(train_cmd(tmp_path / "src", *short), cache)
    hf = tmp_path / "hf"
    run([sys.executable, "-m", "exatrain", "export", str(tmp_path / "src"), str(hf), "--max-shard-size", "40KB"], cache)
    assert len(list(hf.glob("model-*.safetensors"))) > 1
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    src = load_run(tmp_path / "src")
    assert tok.bos_token_id == 0 and tok.pad_token == "<pad>" and len(tok) <= src.cfg.model.vocab_size
    tokens = torch.tensor([tok("The history of the city")["input_ids"]])
    with torch.no_grad():
        assert (hf_logits(hf, tokens) - src.model(tokens)).abs().max().item() <= 1e-5

    config = import_hf(hf, tmp_path / "one", "tiny.yaml", [*TINY, *short])
    run([sys.executable, "-m", "exatrain", "train", str(config)], cache)
    init = [f"model.init_from=hf:{hf}", *short]
    layouts = {"fsdp": ["parallel.dp_shard=2"], "tp": ["parallel.tp=2", "parallel.dp_shard=1"],
               # DeepSpeed holds the tied embedding/output matrix once in its checkpoints
               "deepspeed": ["parallel.dp_shard=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"]}
    for name, layout in layouts.items():
        run(torchrun_cmd(2, tmp_path / name, *init, *layout), cache, timeout=300)
    first = losses(tmp_path / "one")[1]
    assert first != pytest.approx(losses(tmp_path / "src")[1], rel=1e-3)  # it did not start from scratch
    for name in layouts:
        assert losses(tmp_path / name)[1] == pytest.approx(first, rel=1e-6), name
        out = export_hf(tmp_path / name, tmp_path / f"{name}_hf", tokenizer=False)
        with torch.no_grad():
            ours = load_run(tmp_path / name).model(tokens)
        assert (hf_logits(out, tokens) - ours).abs().max().item() <= 1e-5, name
