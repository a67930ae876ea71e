"""Optimizer parameter groups for CerebrasGPT-style muP, and the muP coordinate check (DESIGN.md §8).

The model carries the forward-pass half of muP (init std/√m, embedding and residual
multipliers, logits × 1/m, attention 1/d_head); this module carries the optimizer half:
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

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from exatrain.config import JobConfig
from exatrain.model.llama import build_model, materialize, width_mult


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


def coord_check(cfg: JobConfig, widths: list[int], steps: int, batch: int = 4, seed: int = 0,
                n_heads: int = 4) -> dict[int, dict[str, list[float]]]:
    """Mean |coordinate| of activations vs width over a few Adam steps (Yang et al. 2021, Tensor Programs V).

    For each width trains `cfg.model` (dim replaced, mup as configured) on one fixed batch of
    random tokens at lr = cfg.optim.lr * lr_scale, recording before every step and after the
    last: the embedding output, attention and FFN branch outputs (mean over layers), the
    residual stream after the last block, and the logits. Under muP the curves are flat in
    width; under standard parametrization they grow with it once training starts.
    """
    out: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        mcfg = replace(cfg.model, dim=width, n_heads=n_heads, n_kv_heads=0)
        model = materialize(build_model(mcfg), "cpu", seed)
        job = replace(cfg, model=mcfg)
        groups = param_groups(model, job)
        for g in groups:
            g["lr"] = cfg.optim.lr * g["lr_scale"]
        opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, mcfg.vocab_size, (batch, cfg.data.seq_len + 1), generator=gen)
        record: dict[str, list[float]] = {"embedding": [], "attention": [], "ffn": [], "residual": [], "logits": []}
        sums: dict[str, list[float]] = {}

        def hook(key: str):
            return lambda _m, _i, o: sums.setdefault(key, []).append(o.detach().abs().mean().item())

        handles = [model.tok_embeddings.register_forward_hook(hook("embedding"))]
        for layer in model.layers.values():
            handles.append(layer.attention.register_forward_hook(hook("attention")))
            handles.append(layer.feed_forward.register_forward_hook(hook("ffn")))
        handles.append(list(model.layers.values())[-1].register_forward_hook(hook("residual")))
        for step in range(steps + 1):
            sums.clear()
            logits = model(tokens[:, :-1])
            for key, vals in sums.items():
                record[key].append(sum(vals) / len(vals))
            record["logits"].append(logits.detach().abs().mean().item())
            if step == steps:
                break
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for h in handles:
            h.remove()
        out[width] = record
    return out
