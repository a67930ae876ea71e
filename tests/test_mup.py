"""muP: parameter groups (per-group LR and decay), init scaling, and the coordinate check."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from exatrain.config import load_config
from exatrain.model.llama import build_model, materialize
from exatrain.train.mup import coord_check
from exatrain.train.optim import classify, param_groups


def job(*extra: str):
    return load_config(None, ["model.vocab_size=256", "model.dim=512", "model.n_heads=4", "model.n_layers=2",
                              "model.mup.base_dim=128", "optim.weight_decay=0.1", *extra])


def groups_by_name(model, cfg) -> dict[str, dict]:
    return {g["name"]: g for g in param_groups(model, cfg)}


def test_mup_groups_lr_scale_and_decay():
    cfg = job("model.mup.enabled=true")
    model = materialize(build_model(cfg.model), "cpu", 0)
    g = groups_by_name(model, cfg)
    assert set(g) == {"embedding", "vector", "hidden"}  # tied: no separate output group
    assert g["hidden"]["lr_scale"] == pytest.approx(128 / 512)
    assert (g["embedding"]["lr_scale"], g["vector"]["lr_scale"]) == (1.0, 1.0)
    assert g["hidden"]["weight_decay"] == 0.1
    assert g["embedding"]["weight_decay"] == 0.0 and g["vector"]["weight_decay"] == 0.0
    assert g["embedding"]["params"] == [model.tok_embeddings.weight]
    assert all(p.ndim == 1 for p in g["vector"]["params"])
    assert len(g["hidden"]["params"]) == 2 * 7
    ids = [id(p) for grp in g.values() for p in grp["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_untied_output_and_standard_parametrization():
    cfg = job("model.mup.enabled=true", "model.tie_embeddings=false")
    model = materialize(build_model(cfg.model), "cpu", 0)
    g = groups_by_name(model, cfg)
    assert g["output"]["params"] == [model.output.weight]
    assert (g["output"]["lr_scale"], g["output"]["weight_decay"]) == (1.0, 0.1)
    sp = job()
    assert {grp["lr_scale"] for grp in param_groups(materialize(build_model(sp.model), "cpu", 0), sp)} == {1.0}


def test_trainer_style_lr_per_group():
    """group["lr"] = schedule_lr * lr_scale; one AdamW step moves hidden weights m times less than embeddings."""
    cfg = job("model.mup.enabled=true")
    model = materialize(build_model(cfg.model), "cpu", 0)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
    for grp in opt.param_groups:
        grp["lr"] = 1e-2 * grp["lr_scale"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 256, (2, 16))).logsumexp(-1).mean().backward()
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert step["layers.0.attention.wq.weight"] == pytest.approx(1e-2 / 4, rel=0.05)
    assert step["tok_embeddings.weight"] == pytest.approx(1e-2, rel=0.05)


@pytest.mark.parametrize("name, kind", [
    ("tok_embeddings.weight", "embedding"),
    ("_orig_mod.tok_embeddings.weight", "embedding"),
    ("module.output.weight", "output"),
    ("layers.3._checkpoint_wrapped_module.attention.wq.weight", "hidden"),
    ("layers.0.feed_forward.w2.weight", "hidden"),
    ("layers.0.ffn_norm.weight", "vector"),
    ("norm.weight", "vector"),
    ("layers.0.attention.wq.bias", "vector"),
])
def test_classify_ignores_wrapper_prefixes(name, kind):
    assert classify(name, 1 if kind == "vector" else 2) == kind


def test_groups_survive_fsdp2_wrapping():
    """fully_shard keeps parameter names (DTensor params, global ndim): same groups as the plain module."""
    script = textwrap.dedent("""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from exatrain.config import load_config
        from exatrain.model.llama import build_model
        from exatrain.train.optim import param_groups
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        cfg = load_config(None, ["model.vocab_size=256", "model.dim=512", "model.n_heads=4", "model.n_layers=2",
                                 "model.mup.enabled=true", "model.mup.base_dim=128"])
        model = build_model(cfg.model)
        plain = [(g["name"], len(g["params"]), g["lr_scale"], g["weight_decay"]) for g in param_groups(model, cfg)]
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = [(g["name"], len(g["params"]), g["lr_scale"], g["weight_decay"]) for g in param_groups(model, cfg)]
        assert type(next(model.parameters())).__name__ == "DTensor"
        assert plain == sharded, (plain, sharded)
        dist.destroy_process_group()
        print("OK", sharded)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_mup_init_scaling():
    cfg = job("model.mup.enabled=true", "model.tie_embeddings=false", "model.init_std=0.02")
    model = materialize(build_model(cfg.model), "cpu", 0)
    m, layers = 512 / 128, 2
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.output.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers["0"].attention.wq.weight.std().item() == pytest.approx(0.02 / m**0.5, rel=0.05)
    assert model.layers["0"].feed_forward.w2.weight.std().item() == pytest.approx(
        0.02 / (2 * layers * m) ** 0.5, rel=0.05)
    assert model.layers["0"].attention.scale == pytest.approx(1 / 128)
    assert model.logit_mult == pytest.approx(1 / m)


def _growth(record: dict[int, dict[str, list[float]]], key: str) -> float:
    """Final-step activation at the widest width over the narrowest."""
    widths = sorted(record)
    return record[widths[-1]][key][-1] / record[widths[0]][key][-1]


@pytest.fixture
def one_thread():
    """Tiny ops: a second OpenMP thread only adds barrier stalls, badly so on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_coord_check_flat_under_mup_grows_under_sp(one_thread):
    common = ["model.n_layers=2", "model.vocab_size=128", "data.seq_len=16", "model.max_seq_len=16",
              "model.multiple_of=16", "model.mup.base_dim=64", "optim.lr=1e-2"]
    widths = [64, 128, 256]
    mup = coord_check(load_config(None, [*common, "model.mup.enabled=true"]), widths, steps=3)
    sp = coord_check(load_config(None, [*common, "model.mup.enabled=false"]), widths, steps=3)
    for key in ("attention", "ffn", "residual"):
        assert 0.5 < _growth(mup, key) < 2.0, (key, mup)
        assert _growth(sp, key) > 4.0, (key, sp)
