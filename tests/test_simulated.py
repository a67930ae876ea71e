"""Simulated GEMMs equal an explicit quantise-then-matmul reference, identity formats give exactly fp32, and the
converter works on a meta-device Transformer before weights exist."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from exatrain.config import ModelConfig
from exatrain.model.llama import build_model, materialize
from exatrain.train.exmy import ExMy, quantize
from exatrain.train.simulated import (
    GemmFormats,
    SimulatedLinear,
    simulated_linear,
    simulated_maker,
    swap_linears,
)

E8M3_TRUNC = ExMy(8, 3, rounding="truncate")
E5M2 = ExMy(5, 2)
FP32 = ExMy(8, 23)
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=16,
                  tie_embeddings=False)


def test_matches_explicit_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 16, generator=g, requires_grad=True)
    w = (torch.randn(12, 16, generator=g) * 0.3).requires_grad_()
    b = torch.randn(12, generator=g, requires_grad=True)
    go = torch.randn(6, 5, 12, generator=g) * 1e-3
    formats = GemmFormats(input=ExMy(4, 3, variant="fn", overflow="saturate"), weight=E8M3_TRUNC, grad_output=E5M2)
    out = simulated_linear(x, w, b, formats)
    out.backward(go)

    xq, wq, goq = quantize(x.detach(), formats.input), quantize(w.detach(), formats.weight), quantize(go, E5M2)
    assert not torch.equal(xq, x) and not torch.equal(goq, go)  # the formats really round
    ref_out = (xq.reshape(-1, 16) @ wq.T).reshape(6, 5, 12) + b.detach()
    ref_gx = (goq.reshape(-1, 12) @ wq).reshape(6, 5, 16)
    ref_gw = goq.reshape(-1, 12).T @ xq.reshape(-1, 16)
    assert torch.equal(out.detach(), ref_out) and torch.equal(x.grad, ref_gx) and torch.equal(w.grad, ref_gw)
    assert torch.equal(b.grad, go.sum((0, 1)))  # the bias is outside the GEMM: unrounded gradient


def test_roles_left_none_stay_fp32():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)
    out = simulated_linear(x, w, None, GemmFormats(weight=E8M3_TRUNC))
    assert torch.equal(out, F.linear(x, quantize(w, E8M3_TRUNC)))


def test_identity_formats_are_exactly_fp32():
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    sim = SimulatedLinear.from_linear(copy.deepcopy(plain), GemmFormats(FP32, FP32, FP32))
    x = torch.randn(3, 7, 16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), sim(x2)
    go = torch.randn_like(y1)
    y1.backward(go)
    y2.backward(go)
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(plain.weight.grad, sim.weight.grad) and torch.equal(plain.bias.grad, sim.bias.grad)


def convert(model: nn.Module, formats: GemmFormats) -> list[str]:
    return swap_linears(model, simulated_maker([("*", formats)]))


def test_meta_model_conversion_keeps_init_names_and_head():
    model = build_model(CFG)
    swapped = convert(model, GemmFormats(FP32, FP32, FP32))
    assert len(swapped) == 7 * CFG.n_layers and "output" not in swapped
    assert all(model.get_submodule(f).weight.is_meta for f in swapped)
    materialize(model, "cpu", seed=3)
    plain = materialize(build_model(CFG), "cpu", seed=3)
    assert type(model.output) is nn.Linear and isinstance(model.layers["0"].feed_forward.w2, SimulatedLinear)
    assert model.state_dict().keys() == plain.state_dict().keys()
    for (n1, p1), (_, p2) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p1, p2), n1  # same init from the same seed
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss1 = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss2 = F.cross_entropy(plain(tokens).flatten(0, 1), tokens.flatten())
    loss1.backward()
    loss2.backward()
    assert torch.equal(loss1, loss2)
    for (n1, p1), (_, p2) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p1.grad, p2.grad), n1


def test_rules_per_layer_type_exclusions_and_tied_head():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
    model = build_model(cfg)
    attn, ffn = GemmFormats(input=E8M3_TRUNC), GemmFormats(weight=E5M2)
    swapped = swap_linears(model, simulated_maker([("layers.*.attention.*", attn), ("layers.*.feed_forward.*", ffn)]),
                           exclude=("tok_embeddings", "layers.1.feed_forward"))
    assert "layers.1.feed_forward.w1" not in swapped and "layers.1.attention.wq" in swapped
    assert model.layers["0"].attention.wo.formats == attn and model.layers["0"].feed_forward.w3.formats == ffn
    assert type(model.layers["1"].feed_forward.w1) is nn.Linear
    head = swap_linears(model, simulated_maker([("output", attn)]), exclude=())
    assert head == ["output"]  # only plain Linears are visited: converted ones are not converted again
    materialize(model, "cpu", seed=0)
    assert model.output.weight is model.tok_embeddings.weight  # tying survives to_empty


def test_low_precision_training_moves_away_from_fp32_but_stays_finite():
    tokens = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))

    def train(formats: GemmFormats | None) -> list[float]:
        model = build_model(CFG)
        if formats is not None:
            convert(model, formats)
        materialize(model, "cpu", seed=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(4):
            loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    ref = train(None)
    low = train(GemmFormats(E8M3_TRUNC, E8M3_TRUNC, E8M3_TRUNC))
    assert all(torch.isfinite(torch.tensor(low))) and low != ref
    assert max(abs(a - b) / b for a, b in zip(low, ref)) < 0.05


def test_dtensor_operands_round_per_shard_and_resolve_partial(tmp_path):
    """On a one-rank mesh: a Shard/Replicate DTensor rounds its local values in place of layout; a Partial one is
    reduced (here: to itself) before rounding, since its shards are summands."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from exatrain.train.simulated import quantize_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
        for placement in (Shard(1), Replicate(), Partial()):
            d = quantize_tensor(DTensor.from_local(x, mesh, [placement]), E8M3_TRUNC)
            assert isinstance(d, DTensor) and torch.equal(d.full_tensor(), quantize(x, E8M3_TRUNC))
            assert d.placements == ((Replicate(),) if placement.is_partial() else (placement,))
    finally:
        dist.destroy_process_group()
