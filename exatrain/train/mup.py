"""The muP coordinate check (DESIGN.md §8): activation scale vs width over a few Adam steps.

muP itself lives in the model (init, multipliers) and in exatrain.train.optim (per-group LR scaling).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from exatrain.config import JobConfig
from exatrain.model.llama import build_model, materialize
from exatrain.train.optim import param_groups


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
        mcfg = replace(cfg.model, dim=width, n_heads=n_heads, n_kv_heads=n_heads, ffn_hidden=0)
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
