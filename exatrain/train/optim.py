"""Optimizer construction: AdamW over named parameter groups, with muP's learning-rate scaling.

The model carries the forward-pass half of muP (init std/√m, embedding and residual
multipliers, logits × 1/m, attention 1/d_head); the optimizer carries the other half:
with Adam, hidden matrices (fan-in grows with width) train at lr/m, everything else at lr.
Groups are chosen from parameter *names* (module path components), so the same rules apply
to plain, FSDP2-, TP-, compiled or checkpoint-wrapped modules, whose names only gain prefixes.

Weight decay: matrices only. Norm gains, biases and the token embedding get none. The
embedding is excluded because decay pulls rows of rare tokens (which seldom see gradient)
towards zero and shrinks the input scale that emb_mult sets (OLMo 2 drops it for stability);
when tied it is also the output head, which then goes undecayed too. torch's AdamW decays by
lr * weight_decay, so a muP hidden matrix decays at 1/m of the base rate per step.
"""

from __future__ import annotations

import torch
from torch import nn

from exatrain.config import JobConfig
from exatrain.model.llama import width_mult


def classify(name: str, ndim: int) -> str:
    """embedding | output | vector (norms, biases, other <2-D) | hidden (width x width matrices)."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    if owner == "tok_embeddings":
        return "embedding"
    if owner == "output":
        return "output"
    if ndim < 2 or owner.endswith("norm") or parts[-1] == "bias":
        return "vector"
    return "hidden"


def param_groups(model: nn.Module, cfg: JobConfig) -> list[dict]:
    """Torch optimizer groups with "params", "weight_decay", "lr_scale" and a "name" for logging.

    The trainer sets group["lr"] = schedule_lr * group["lr_scale"] every step. Empty groups are
    dropped (a pipeline stage may own no embedding). A tied weight appears once, as embedding.
    """
    m = width_mult(cfg.model)
    wd = cfg.optim.weight_decay
    rules = {  # kind -> (weight_decay, lr_scale); a tied head split off on a pipeline stage is treated as the embedding
        "embedding": (0.0, 1.0),
        "output": (0.0 if cfg.model.tie_embeddings else wd, 1.0),
        "vector": (0.0, 1.0),
        "hidden": (wd, 1.0 / m),
    }
    params: dict[str, list[nn.Parameter]] = {kind: [] for kind in rules}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[classify(name, p.ndim)].append(p)
    return [{"name": kind, "params": params[kind], "weight_decay": rules[kind][0], "lr_scale": rules[kind][1]}
            for kind in rules if params[kind]]


def adamw(groups: list[dict], cfg: JobConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups from `param_groups`, each at optim.lr x its lr_scale until `set_lr`."""
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def build_optimizer(part: nn.Module, cfg: JobConfig) -> torch.optim.Optimizer:
    return adamw(param_groups(part, cfg), cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's LR for this step, scaled per group (muP)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
