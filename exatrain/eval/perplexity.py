"""Metadata-conditioned perplexity of a trained run on its held-out documents (DESIGN.md §5).

MeCo's claim at inference is that a prefix steers the model: the real one (the document's
own domain) should help, a fabricated one (`wikipedia.org`) shifts it, and after the cooldown
the plain document must still work. So each held-out document is scored under several
conditions that differ only in the prompt before the text:

- `none`: `<bos> text`, as after the cooldown and for a standard model;
- `real`: `<bos> URL: <the document's domain>\n\n text`, the layout of training;
- any other string: that value as the metadata (a URL or a bare domain for `field: url`).

Only text tokens count, and every condition scores the same ones: the first window of each
document, sized so that the longest prompt plus the text fits the training context. The first
window is where metadata can act at all: in training a document continued in the next packed
row starts over at position 0 without its prefix.

Weights come from the run's latest complete checkpoint (or a given `step_*` directory); the
model is rebuilt from the config stored in the checkpoint and only the model half of the DCP
state is read, so no optimizer or process group is needed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from exatrain.config import JobConfig, from_dict
from exatrain.data import IGNORE_INDEX, build_data, metadata_prompt
from exatrain.model.convert import convert_model
from exatrain.model.llama import Transformer, build_model, materialize
from exatrain.train.checkpoint import (
    ENGINE,
    CheckpointError,
    list_checkpoints,
    load_model_weights,
    stored_keys,
    verify,
)

NONE, REAL = "none", "real"


@dataclass
class LoadedRun:
    model: Transformer
    cfg: JobConfig
    checkpoint: Path
    step: int
    tokens_seen: int


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step_*` directory as given, else the latest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / "meta.json").is_file() or path.name.startswith("step_"):
        return path
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"no complete checkpoint under {path / 'checkpoints'}: pass a run directory trained "
                              f"with checkpoint.save_final=true (or checkpoint.every > 0) or a step_* directory")
    return found[-1]


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The trained model of a run directory or checkpoint, in eval mode, in fp32."""
    ckpt = resolve_checkpoint(path)
    meta = verify(ckpt)
    cfg = from_dict(meta["config"])
    # Embedding and output matrix are read under their own names whenever the checkpoint holds both (native
    # engines do, equal when training kept them tied), so the evaluated function is always the trained one;
    # a DeepSpeed checkpoint holds a tied matrix once, and the model is built tied to read it. Converted
    # modules (model.converters) are rebuilt so their parameters and buffers load too.
    both = not cfg.model.tie_embeddings or f"{ENGINE}.model.output.weight" in stored_keys(ckpt)
    model = build_model(dataclasses.replace(cfg.model, tie_embeddings=not both))
    convert_model(model, cfg)
    model = materialize(model, device, cfg.train.seed)
    load_model_weights(ckpt, model)
    model.eval()
    return LoadedRun(model, cfg, ckpt, meta["step"], meta["tokens_seen"])


@torch.no_grad()
def _score(model: Transformer, rows: list[tuple[list[int], int]], device: torch.device) -> list[float]:
    """Summed NLL of the last `n` tokens of each (ids, n) row; rows are right-padded in one batch."""
    width = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, n) in enumerate(rows):
        seq = torch.tensor(ids, dtype=torch.long)
        tokens[r, :len(ids) - 1] = seq[:-1]
        labels[r, len(ids) - 1 - n:len(ids) - 1] = seq[-n:]
    logits = model(tokens.to(device)).float()
    nll = F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(len(rows), width)
    return nll.sum(1).tolist()


def evaluate_perplexity(path: str | Path, conditions: tuple[str, ...] | list[str] = (NONE, REAL),
                        max_docs: int | None = None, batch_size: int = 16,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """Per-document and overall text perplexity of a run's held-out documents under each condition.

    Returns {"checkpoint", "step", "tokens_seen", "meco_enabled", "context", "conditions",
    "summary": {condition: {"documents", "tokens", "loss", "ppl", "doc_ppl_median"}},
    "documents": [{"doc", "domain", "tokens", "ppl": {condition: ppl}}]}; `loss` is the mean NLL
    per text token and `ppl` its exp. Documents without a real metadata value are left out of every
    condition when `real` is asked for (unless the run's `data.meco.missing` is `fallback`).
    """
    if not conditions:
        raise ValueError("give at least one condition: none, real or a metadata value")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, got {max_docs}")
    device = torch.device(device)
    run = load_run(path, device)
    cfg, meco = run.cfg, run.cfg.data.meco
    data = build_data(cfg, 0, 1)
    store, tok = data.val.store, data.tokenizer
    fixed = {c: metadata_prompt(tok, meco, "", None if c == NONE else c) for c in conditions if c != REAL}
    docs, rows = [], []
    for doc in (int(d) for d in data.val.docs):
        i = int(store.meta_index[doc])
        domain = store.meta_values[i] if i >= 0 else (meco.fallback if meco.missing == "fallback" else None)
        if domain is None and REAL in conditions:
            continue
        prompts = {c: fixed[c] if c in fixed else metadata_prompt(tok, meco, "", domain) for c in conditions}
        longest = max(map(len, prompts.values()))
        n = min(int(store.offsets[doc + 1] - store.offsets[doc]), cfg.data.seq_len + 1 - longest)
        if n < 1:
            raise ValueError(f"a metadata prompt of {longest} tokens leaves no room for text "
                             f"in the context of {cfg.data.seq_len} tokens")
        text = store.tokens[store.offsets[doc]:store.offsets[doc] + n].astype(np.int64).tolist()
        docs.append({"doc": doc, "domain": domain, "tokens": n})
        rows.append({c: (p + text, n) for c, p in prompts.items()})
        if max_docs is not None and len(docs) == max_docs:
            break
    if not docs:
        raise ValueError(f"no held-out documents to evaluate in {run.checkpoint} (all lack '{meco.field}' metadata?)")
    nll: dict[str, list[float]] = {c: [] for c in conditions}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for c in conditions:
            nll[c] += _score(run.model, [r[c] for r in chunk], device)
    total = sum(d["tokens"] for d in docs)
    summary = {}
    for c in conditions:
        doc_ppl = [math.exp(s / d["tokens"]) for s, d in zip(nll[c], docs)]
        for d, p in zip(docs, doc_ppl):
            d.setdefault("ppl", {})[c] = p
        loss = sum(nll[c]) / total
        summary[c] = {"documents": len(docs), "tokens": total, "loss": loss, "ppl": math.exp(loss),
                      "doc_ppl_median": float(np.median(doc_ppl))}
    return {"checkpoint": str(run.checkpoint), "step": run.step, "tokens_seen": run.tokens_seen,
            "meco_enabled": meco.enabled, "context": cfg.data.seq_len, "conditions": list(conditions),
            "summary": summary, "documents": docs}


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the summary, with the change against `none` where it was evaluated."""
    s = result["summary"]
    base = s.get(NONE)
    lines = [f"{result['checkpoint']} (step {result['step']}, {result['tokens_seen']:,} tokens, "
             f"MeCo {'on' if result['meco_enabled'] else 'off'}): first {result['context']}-token window "
             f"of {next(iter(s.values()))['documents']} held-out documents", "",
             "| metadata | text tokens | loss | ppl | median doc ppl | Δ loss vs none |",
             "|---|---:|---:|---:|---:|---:|"]
    for c, r in s.items():
        delta = f"{r['loss'] - base['loss']:+.4f}" if base else "n/a"
        lines.append(f"| {c} | {r['tokens']:,} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['doc_ppl_median']:.2f} "
                     f"| {delta} |")
    return "\n".join(lines)
