"""EigenScore of a trained run: from the command line and, optionally, at checkpoints during training.

    exatrain eval RUN --eigenscore [--prompts FILE] [--max-prompts N] [--k K] [--method exact ...]

scores the run's latest checkpoint (or a `step_*` directory) in one process, like the perplexity
eval: the model is rebuilt from the checkpoint's config (model converters included, so a SeND mask is
applied as trained), K answers are sampled per prompt (exatrain.model.sampling) and their EigenScore
is computed by each method (exact, the paper's Chebyshev EES, SLQ; exatrain.eval.eigenscore). Settings
come from the run's `eigenscore:` section, overridden by the options.

During training (`eigenscore.every > 0`) the `eigenscore` callback does the same on rank 0 after each
checkpoint whose step is a multiple of `every` (and after the final one): it loads the weights just
written into a plain model (no collectives; the other ranks continue and wait at their next collective)
and logs `es_<method>` (the mean over prompts) and `es_seconds` as an eval record at that step. Cost:
reading the model's weights once plus P·K·(prompt + max_new_tokens) decoded tokens on one device, and a
second copy of the model in rank 0's memory while it runs: meant for models that fit on one device.
Sampling uses its own seeded generators, so training's random streams (and resume) are unaffected.

Prompts: `eigenscore.prompts`, else `send.prompts`, else the first DOC_PROMPT_TOKENS tokens of the
first held-out documents; `<bos>` + text, cut so that prompt + answer fit model.max_seq_len.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exatrain.config import ConfigError, EigenScoreConfig, JobConfig, require
from exatrain.data import build_data
from exatrain.data.prompts import encode_prompts, read_prompts
from exatrain.eval.eigenscore import METHODS, eigenscore
from exatrain.eval.hallucination import eigenscore_for_prompts
from exatrain.eval.perplexity import load_run
from exatrain.model.sampling import middle_layer
from exatrain.registry import CALLBACKS, config_resolver, config_validator
from exatrain.train.callback import Callback
from exatrain.train.send import layer_index

log = logging.getLogger("exatrain")

DOC_PROMPT_TOKENS = 16


def es_layer(cfg: EigenScoreConfig, n_layers: int) -> int:
    """The block whose output is embedded: eigenscore.layer, or INSIDE's middle block when null."""
    return middle_layer(n_layers) if cfg.layer is None else layer_index(cfg.layer, n_layers)


def prompt_source(job: JobConfig, path: str = "") -> str:
    return path or job.eigenscore.prompts or job.send.prompts


def prompt_ids(job: JobConfig, tokenizer, data=None, path: str = "", limit: int | None = None) -> list[list[int]]:
    """Token ids of the prompts to score (see the module docstring for where they come from)."""
    es = job.eigenscore
    limit = es.max_prompts if limit is None else limit
    room = job.model.max_seq_len - es.max_new_tokens
    source = prompt_source(job, path)
    if source:
        return encode_prompts(tokenizer, read_prompts(source, limit), room)
    if data is None:
        raise ValueError("no EigenScore prompts: set eigenscore.prompts or pass --prompts FILE")
    store, out = data.val.store, []
    for doc in data.val.docs[:limit if limit > 0 else None]:
        start = int(store.offsets[doc])
        end = min(int(store.offsets[doc + 1]), start + min(DOC_PROMPT_TOKENS, room - 1))
        out.append([tokenizer.bos_id, *store.tokens[start:end].astype(np.int64).tolist()])
    return out


def score(model: torch.nn.Module, prompts: list[list[int]], es: EigenScoreConfig, eos_id: int | None) -> dict[str, Any]:
    """Sample, embed and score every prompt by every method; timings per method.

    Returns {"layer", "prompts", "sampling_s", "methods": {method: {"mean", "std", "min", "max",
    "ms_per_prompt"}}, "abs_error_vs_exact": {method: mean |score − exact|} (when exact is computed),
    "per_prompt": [{method: score}]}.
    """
    layer = es_layer(es, model.cfg.n_layers)
    t0 = time.perf_counter()
    samples = eigenscore_for_prompts(model, prompts, k=es.k, max_new_tokens=es.max_new_tokens,
                                     temperature=es.temperature, top_k=es.top_k, top_p=es.top_p, layer=layer,
                                     eos_id=eos_id, methods=(), seed=es.sample_seed)
    sampling_s = time.perf_counter() - t0
    per_prompt: list[dict[str, float]] = [{} for _ in samples]
    methods: dict[str, dict[str, float]] = {}
    for method in es.methods:
        t0 = time.perf_counter()
        values = [eigenscore(s.hidden, es.alpha, method, moments=es.moments, probes=es.probes, seed=es.sample_seed)
                  for s in samples]
        elapsed = time.perf_counter() - t0
        for row, v in zip(per_prompt, values):
            row[method] = v
        methods[method] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
                           "min": min(values), "max": max(values), "ms_per_prompt": 1e3 * elapsed / len(values)}
    errors = {}
    if "exact" in methods:
        errors = {m: statistics.fmean(abs(r[m] - r["exact"]) for r in per_prompt) for m in methods if m != "exact"}
    return {"layer": layer, "prompts": len(prompts), "sampling_s": sampling_s, "methods": methods,
            "abs_error_vs_exact": errors, "per_prompt": per_prompt}


def evaluate_eigenscore(path: str | Path, prompts: str = "", max_prompts: int | None = None,
                        overrides: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """EigenScore of a run directory's latest checkpoint (or a step_* directory), one process.

    `overrides` replace fields of the run's `eigenscore:` section (k, methods, temperature, ...).
    """
    run = load_run(path, device)
    es = dataclasses.replace(run.cfg.eigenscore, **(overrides or {}))
    job = dataclasses.replace(run.cfg, eigenscore=es)
    check_eigenscore(job, in_use=True)
    data = build_data(job, 0, 1)
    ids = prompt_ids(job, data.tokenizer, data, prompts, max_prompts)
    if not ids:
        raise ValueError("no prompts to score")
    result = score(run.model, ids, es, data.tokenizer.eos_id)
    return {"checkpoint": str(run.checkpoint), "step": run.step, "tokens_seen": run.tokens_seen,
            "source": prompt_source(job, prompts) or f"held-out documents (first {DOC_PROMPT_TOKENS} tokens)",
            "k": es.k, "temperature": es.temperature, "top_p": es.top_p, "top_k": es.top_k,
            "max_new_tokens": es.max_new_tokens, "alpha": es.alpha, "moments": es.moments, "probes": es.probes,
            **result}


def format_table(result: dict[str, Any]) -> str:
    head = (f"{result['checkpoint']} (step {result['step']}): EigenScore of {result['prompts']} prompts from "
            f"{result['source']}, K={result['k']} samples (T={result['temperature']}, top-p {result['top_p']}, "
            f"top-k {result['top_k']}, {result['max_new_tokens']} new tokens), block {result['layer']}, "
            f"alpha={result['alpha']}, natural log; sampling {result['sampling_s']:.1f} s")
    lines = [head, "",
             "| method | mean | std | min | max | mean abs. error vs exact | ms per prompt |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, r in result["methods"].items():
        err = result["abs_error_vs_exact"].get(m)
        lines.append(f"| {m} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | {r['max']:.4f} | "
                     f"{'—' if err is None else f'{err:.4f}'} | {r['ms_per_prompt']:.2f} |")
    return "\n".join(lines)


class EigenScoreLogger(Callback):
    """The `eigenscore` callback: EigenScore of checkpoints during training (see the module docstring)."""

    name = "eigenscore"

    def __init__(self, job: JobConfig):
        self.job = job
        self.prompts: list[list[int]] | None = None

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        step, es = trainer.state.step, self.job.eigenscore
        if trainer.info.rank != 0 or not (step % es.every == 0 or step == self.job.train.steps):
            return
        t0 = time.perf_counter()
        if self.prompts is None:
            self.prompts = prompt_ids(self.job, trainer.data.tokenizer, trainer.data)
        run = load_run(path, trainer.device)
        result = score(run.model, self.prompts, es, trainer.data.tokenizer.eos_id)
        del run
        record = {f"es_{m}": r["mean"] for m, r in result["methods"].items()}
        trainer.metrics.log_eval(step, {**record, "es_seconds": time.perf_counter() - t0})


CALLBACKS.register("eigenscore", EigenScoreLogger)


@config_resolver
def add_eigenscore(cfg: JobConfig) -> None:
    if cfg.eigenscore.every > 0 and "eigenscore" not in cfg.train.callbacks:
        methods = [c for c in cfg.train.callbacks if c in ("meco", "send")]
        cfg.train.callbacks.insert(len(methods), "eigenscore")


def check_eigenscore(cfg: JobConfig, in_use: bool | None = None) -> None:
    """The eigenscore: section's settings; its fit to the model only when it is used (by the callback, or
    `in_use=True` from `exatrain eval --eigenscore`), so short-context models need not change the defaults."""
    e, m = cfg.eigenscore, cfg.model
    in_use = e.every > 0 if in_use is None else in_use
    require(e.k >= 2, "eigenscore.k", f"needs at least 2 samples per prompt, got {e.k}")
    require(e.temperature >= 0, "eigenscore.temperature", "must be >= 0 (0 = greedy: all samples equal)")
    require(0.0 < e.top_p <= 1.0, "eigenscore.top_p", "must be in (0, 1]")
    require(e.top_k >= 0, "eigenscore.top_k", "must be >= 0 (0 = no top-k filter)")
    require(e.max_new_tokens > 0, "eigenscore.max_new_tokens", "must be >= 1")
    require(not in_use or e.max_new_tokens < m.max_seq_len, "eigenscore.max_new_tokens",
            f"must be in 1..{m.max_seq_len - 1} (model.max_seq_len={m.max_seq_len} holds prompt + answer)")
    require(e.layer is None or -m.n_layers <= e.layer < m.n_layers, "eigenscore.layer",
            f"{e.layer} is out of range for model.n_layers={m.n_layers} (null = the middle block)")
    require(bool(e.methods) and set(e.methods) <= set(METHODS), "eigenscore.methods",
            f"got {list(e.methods)}, expected a non-empty list of {', '.join(METHODS)}")
    require(e.alpha > 0, "eigenscore.alpha", "must be positive")
    require(e.moments >= 1 and e.probes >= 1, "eigenscore.moments", "moments and probes must be >= 1")
    require(e.max_prompts >= 0, "eigenscore.max_prompts", "must be >= 0 (0 = all)")
    require(e.every >= 0, "eigenscore.every", "must be >= 0 (0 = only from `exatrain eval --eigenscore`)")
    if e.prompts:
        try:
            found = len(read_prompts(e.prompts, 1))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eigenscore.prompts: {exc}") from None
        require(found > 0, "eigenscore.prompts", f"{e.prompts} holds no prompts")
    if e.every > 0:
        c = cfg.checkpoint
        require(c.every > 0 and e.every % c.every == 0, "eigenscore.every",
                f"{e.every} must be a multiple of checkpoint.every={c.every}: EigenScore is computed from the "
                "checkpoints as they are written")
    require(e.every > 0 or "eigenscore" not in cfg.train.callbacks, "train.callbacks",
            "the eigenscore callback needs eigenscore.every > 0")


config_validator(check_eigenscore)
