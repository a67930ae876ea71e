"""Shared pieces of the parallelism tests: a tiny config, synthetic batches, and a plain single-process
reference loop written without the engine, so the engine is checked against independent code."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from exatrain.config import JobConfig, load_config
from exatrain.data import Batch
from exatrain.model.llama import build_model, materialize
from exatrain.train.optim import param_groups

TINY = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
    "model.vocab_size=64", "model.max_seq_len=16", "model.tie_embeddings=false", "data.seq_len=16",
    "train.global_batch=8", "train.micro_batch=2", "train.seed=7", "optim.lr=0.01", "optim.grad_clip=0.5",
]
STEPS = 3


def tiny_cfg(overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    return load_config(None, TINY + list(overrides))


def global_batches(cfg: JobConfig, steps: int = STEPS, seed: int = 0) -> list[Batch]:
    """Random tokens packed as two documents per row, with ~10% of labels ignored."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, V, (B, T + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[torch.rand(B, T, generator=g) < 0.1] = -100
        cut = torch.randint(1, T, (B, 1), generator=g)
        doc_ids = (torch.arange(T)[None] >= cut).long()
        positions = torch.where(doc_ids == 0, torch.arange(T)[None], torch.arange(T)[None] - cut)
        out.append(Batch(tokens[:, :-1].contiguous(), labels, positions, doc_ids))
    return out


def n_labels(b: Batch) -> int:
    return int((b.labels != -100).sum())


def rank_micro_batches(b: Batch, dp_rank: int, dp_size: int, micro_batch: int) -> list[Batch]:
    """This data-parallel rank's rows of the global batch, split into micro-batches (as the trainer does)."""
    rows = b.tokens.shape[0] // dp_size
    sl = slice(dp_rank * rows, (dp_rank + 1) * rows)
    fields = {k: getattr(b, k)[sl].split(micro_batch) for k in ("tokens", "labels", "positions", "doc_ids")}
    return [Batch(**{k: v[i] for k, v in fields.items()}) for i in range(rows // micro_batch)]


@contextlib.contextmanager
def one_thread():
    """Tiny models run much faster single-threaded, and far more so on a shared, oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_thread()
def reference_run(cfg: JobConfig, batches: list[Batch], eval_batch: Batch | None = None) -> dict[str, list[float]]:
    """One process, whole global batch per step, plain fp32 torch: the ground truth for every layout.

    With `eval_batch`, also the summed CE and label count on it after training ("eval")."""
    model = materialize(build_model(cfg.model), "cpu", cfg.train.seed)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    losses, norms = [], []
    for b in batches:
        logits = model(b.tokens, b.positions, b.doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.flatten(), ignore_index=-100,
                               reduction="sum") / n_labels(b)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        for grp in opt.param_groups:
            grp["lr"] = cfg.optim.lr * grp["lr_scale"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out = {"loss": losses, "grad_norm": norms}
    if eval_batch is not None:
        with torch.no_grad():
            logits = model(eval_batch.tokens, eval_batch.positions, eval_batch.doc_ids)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), eval_batch.labels.flatten(), ignore_index=-100,
                                 reduction="sum")
        out["eval"] = [ce.item(), float(n_labels(eval_batch))]
    return out


def max_rel_err(got: dict[str, list[float]], ref: dict[str, list[float]]) -> float:
    keys = [k for k in ("loss", "grad_norm", "eval") if k in got and k in ref]
    return max(abs(a - b) / max(abs(b), 1e-12) for k in keys for a, b in zip(got[k], ref[k], strict=True))
