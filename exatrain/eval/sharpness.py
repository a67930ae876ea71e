"""Loss-landscape sharpness for the precision studies (DESIGN.md §7).

Logit sharpness ("To FP8 and Back Again"'s use of Keskar et al.'s metric): perturb the last-token logits x
of a fixed batch inside the box C_ε = {|y_i| <= ε(|x_i| + 1)} and report
    φ_ε = 100 · (max_{y ∈ C_ε} f(x + y) − f(x)) / (1 + f(x)),  f = mean cross-entropy over the batch rows.
The max needs no search: CE(z, t) = logsumexp(z) − z_t falls as z_t rises (∂/∂z_t = p_t − 1 < 0) and rises with
every other logit (∂/∂z_i = p_i > 0), each on the whole line, so the maximiser is the box vertex with the target
logit lowered by ε(|z_t|+1) and all others raised by ε(|z_i|+1); the batch mean separates over rows. It costs one
forward pass, so it can run every few hundred steps on models where Hessian-based sharpness is out of reach.

Weight sharpness: the mean and max loss increase along seeded random directions in weight space, each tensor's
direction filter-normalised (Li et al. 2018: every row scaled to the norm of the weight row it perturbs, so the
measure does not change when a layer's scale is moved into the next; 1-D parameters such as norm gains get no
perturbation, as in Li et al.). Parameters are restored bit-for-bit afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from exatrain.data.batch import IGNORE_INDEX


@dataclass(frozen=True)
class LogitSharpness:
    phi: float        # φ_ε, in percent
    loss: float       # f(x): mean last-token cross-entropy
    max_loss: float   # f(x + y*)

    @classmethod
    def of(cls, loss: float, max_loss: float) -> LogitSharpness:
        return cls(phi=100.0 * (max_loss - loss) / (1.0 + loss), loss=loss, max_loss=max_loss)


@dataclass(frozen=True)
class WeightSharpness:
    mean_increase: float
    max_increase: float
    loss: float       # the unperturbed loss


def last_token_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits and (B, T) labels -> fp32 (B', V) logits and (B',) targets at each row's last labelled
    position; rows without any label are dropped."""
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    last = last_positions(labels)
    rows = last >= 0
    z = logits[rows, last[rows]].float()
    return z, labels[rows, last[rows]]


def last_positions(labels: torch.Tensor) -> torch.Tensor:
    """Each row's last labelled position, -1 for a row without labels."""
    positions = torch.arange(labels.shape[1], device=labels.device)
    return torch.where(labels != IGNORE_INDEX, positions, -1).amax(dim=1)


def max_cross_entropy_in_box(z: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-row max of CE(z + y, t) over |y_i| <= ε(|z_i| + 1): the vertex described in the module docstring."""
    radius = epsilon * (z.abs() + 1)
    is_target = F.one_hot(targets, z.shape[-1]).bool()
    worst = torch.where(is_target, z - radius, z + radius)
    return F.cross_entropy(worst, targets, reduction="none")


@torch.no_grad()
def logit_sharpness(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, epsilon: float = 1e-3,
                    **model_kwargs) -> LogitSharpness:
    """φ_ε of `model` on a fixed batch (tokens and labels (B, T); labels -100 = ignored)."""
    z, t = last_token_logits(model(tokens, **model_kwargs), labels)
    z = z.double()  # φ is a small difference of two losses: computed in float64
    return LogitSharpness.of(F.cross_entropy(z, t).item(), max_cross_entropy_in_box(z, t, epsilon).mean().item())


def filter_normalized_direction(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian direction with each row (dim-0 slice) scaled to the norm of the same row of `weight`; zero for
    1-D tensors."""
    if weight.dim() < 2:
        return torch.zeros_like(weight)
    d = torch.randn(weight.shape, generator=generator, dtype=torch.float32, device=generator.device)
    d = d.to(weight.device)
    w_rows, d_rows = weight.float().flatten(1), d.flatten(1)
    scale = w_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (d_rows * scale).view_as(weight).to(weight.dtype)


def _mean_token_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, model_kwargs: dict) -> float:
    logits = model(tokens, **model_kwargs)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX).item()


@torch.no_grad()
def weight_sharpness(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, n_directions: int = 8,
                     radius: float = 0.05, seed: int = 0, **model_kwargs) -> WeightSharpness:
    """Loss increase of the mean token CE at w + radius·d over `n_directions` seeded filter-normalised d.

    Plain (non-DTensor) parameters: run it on a single-process model or a gathered copy.
    """
    return perturbation_sharpness(list(model.parameters()),
                                  lambda: _mean_token_loss(model, tokens, labels, model_kwargs),
                                  n_directions, radius, seed)


@torch.no_grad()
def perturbation_sharpness(parameters: list[torch.Tensor], loss: Callable[[], float], n_directions: int = 8,
                           radius: float = 0.05, seed: int = 0) -> WeightSharpness:
    """`loss()` at w + radius·d minus at w, over `n_directions` seeded filter-normalised directions d of the
    matrices among `parameters` (1-D ones are not perturbed); the parameters are restored bit-for-bit."""
    params = [p for p in parameters if p.dim() >= 2]
    if any(isinstance(p, DTensor) for p in params):
        raise TypeError("weight_sharpness perturbs plain parameters; evaluate a gathered single-process copy")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    saved = [p.detach().clone() for p in params]
    base = loss()
    increases = []
    try:
        for _ in range(n_directions):
            for p, w in zip(params, saved):
                p.copy_(w + radius * filter_normalized_direction(w, generator))
            increases.append(loss() - base)
    finally:
        for p, w in zip(params, saved):
            p.copy_(w)
    return WeightSharpness(mean_increase=sum(increases) / len(increases), max_increase=max(increases), loss=base)
