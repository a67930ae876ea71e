"""The closed-form logit-sharpness maximiser is the maximum (monotonicity, every box vertex, random feasible points,
projected gradient ascent), φ_ε follows its definition, and both sharpness measures are deterministic no-grad
evaluations that leave the model untouched."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from exatrain.config import ModelConfig
from exatrain.eval.sharpness import (
    filter_normalized_direction,
    last_token_logits,
    logit_sharpness,
    max_cross_entropy_in_box,
    weight_sharpness,
)
from exatrain.model.llama import build_model, materialize

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64, max_seq_len=16,
                  tie_embeddings=False)


def small_problem(seed: int, v: int = 8, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, v, generator=g, dtype=torch.float64) * 3)
    t = torch.randint(0, v, (rows,), generator=g)
    return z, t


def test_cross_entropy_is_monotone_in_each_logit():
    """∂CE/∂z_t < 0 and ∂CE/∂z_i > 0 everywhere, so each coordinate's worst value is a box end."""
    for seed in range(20):
        z, t = small_problem(seed)
        z.requires_grad_()
        F.cross_entropy(z, t, reduction="sum").backward()
        target = F.one_hot(t, z.shape[1]).bool()
        assert (z.grad[target] < 0).all() and (z.grad[~target] > 0).all()


def test_closed_form_is_the_best_vertex_and_beats_every_feasible_point():
    eps = 0.05
    vertices = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=8)), dtype=torch.float64)  # 256 sign patterns
    for seed in range(10):
        z, t = small_problem(seed)
        closed = max_cross_entropy_in_box(z, t, eps)
        radius = eps * (z.abs() + 1)
        for r in range(z.shape[0]):
            all_vertices = F.cross_entropy(z[r] + vertices * radius[r], t[r].expand(len(vertices)), reduction="none")
            assert torch.isclose(all_vertices.max(), closed[r], rtol=0, atol=1e-12)
            g = torch.Generator().manual_seed(seed * 100 + r)
            inside = (torch.rand(20000, 8, generator=g, dtype=torch.float64) * 2 - 1) * radius[r]
            sampled = F.cross_entropy(z[r] + inside, t[r].expand(len(inside)), reduction="none")
            assert (sampled <= closed[r] + 1e-12).all()


def test_projected_gradient_ascent_converges_to_the_closed_form():
    eps = 0.1
    for seed in range(5):
        z, t = small_problem(seed, v=6, rows=3)
        radius = eps * (z.abs() + 1)
        best = torch.full((3,), -float("inf"), dtype=torch.float64)
        g = torch.Generator().manual_seed(seed)
        for _ in range(8):  # random starts inside the box
            y = ((torch.rand(z.shape, generator=g, dtype=torch.float64) * 2 - 1) * radius).requires_grad_()
            for _ in range(200):
                loss = F.cross_entropy(z + y, t, reduction="sum")
                (grad,) = torch.autograd.grad(loss, y)
                with torch.no_grad():
                    y.copy_(torch.maximum(torch.minimum(y + 0.05 * grad.sign() * radius, radius), -radius))
            best = torch.maximum(best, F.cross_entropy(z + y.detach(), t, reduction="none"))
        closed = max_cross_entropy_in_box(z, t, eps)
        assert torch.allclose(best, closed, rtol=0, atol=1e-10)


def test_phi_definition_on_a_hand_example():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([0])
    eps = 0.01
    worst = torch.tensor([[2.0 - eps * 3, 0.0 + eps * 1, -1.0 + eps * 2]])
    assert torch.equal(max_cross_entropy_in_box(z, t, eps), F.cross_entropy(worst, t, reduction="none"))

    class Fixed(torch.nn.Module):
        def forward(self, tokens):
            return z[:, None].expand(1, tokens.shape[1], 3)

    labels = torch.tensor([[1, 2, 0, -100]])  # the last labelled position is index 2 (target 0)
    s = logit_sharpness(Fixed(), torch.zeros(1, 4, dtype=torch.long), labels, epsilon=eps)
    # computed in float64 (φ is a small difference of two losses)
    worst64 = torch.tensor([[2.0 - eps * 3, 0.0 + eps * 1, -1.0 + eps * 2]], dtype=torch.float64)
    f, fmax = F.cross_entropy(z.double(), t).item(), F.cross_entropy(worst64, t).item()
    assert abs(s.phi - 100 * (fmax - f) / (1 + f)) < 1e-9 and s.loss == f


def test_last_token_logits_skips_ignored_positions_and_rows():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])
    z, t = last_token_logits(logits, labels)
    assert torch.equal(z, logits[0, 1][None]) and t.tolist() == [2]


def model_and_batch():
    model = materialize(build_model(CFG), "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (4, 16), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    return model, tokens, labels


def test_logit_sharpness_on_the_model_is_deterministic_and_gradient_free():
    model, tokens, labels = model_and_batch()
    a = logit_sharpness(model, tokens, labels, epsilon=1e-3)
    b = logit_sharpness(model, tokens, labels, epsilon=1e-3)
    assert a == b and a.phi > 0 and all(p.grad is None for p in model.parameters())
    assert logit_sharpness(model, tokens, labels, epsilon=0.0).phi == 0.0
    small, double = a.phi, logit_sharpness(model, tokens, labels, epsilon=2e-3).phi
    assert 1.9 < double / small < 2.1  # first order in ε


def test_filter_normalized_direction():
    w = torch.randn(6, 5) * torch.arange(1, 7)[:, None]
    d = filter_normalized_direction(w, torch.Generator().manual_seed(0))
    assert torch.allclose(d.norm(dim=1), w.norm(dim=1))
    assert torch.equal(filter_normalized_direction(torch.ones(5), torch.Generator()), torch.zeros(5))


def test_weight_sharpness_is_seeded_and_restores_weights():
    model, tokens, labels = model_and_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = weight_sharpness(model, tokens, labels, n_directions=4, radius=0.1, seed=3)
    b = weight_sharpness(model, tokens, labels, n_directions=4, radius=0.1, seed=3)
    c = weight_sharpness(model, tokens, labels, n_directions=4, radius=0.1, seed=4)
    assert a == b and a != c and a.mean_increase <= a.max_increase
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert weight_sharpness(model, tokens, labels, n_directions=2, radius=0.0).max_increase == 0.0
    assert all(p.grad is None for p in model.parameters())
