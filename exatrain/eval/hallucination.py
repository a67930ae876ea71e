"""Hallucination measures: EigenScore of a model's answers (INSIDE; DESIGN.md §6) and the accuracy
of its answers to the synthetic fact questions (exatrain.data.facts), per frequency bucket.

EigenScore, per prompt: K sampled continuations (exatrain.model.sampling), the middle layer's hidden state
at each one's last token, and their EigenScore by every requested method (exact, the Chebyshev EES,
SLQ; exatrain.eval.eigenscore). A high score means the K answers disagree in the model's own
representation: a sign that the model is guessing.

A prompt's samples depend only on (seed, the prompt's tokens), not on its position in the list or
on the other prompts, so scores of the same prompt compare across checkpoints and subsets.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from exatrain.data.facts import Question
from exatrain.data.prompts import encode_prompts
from exatrain.data.tokenizer import Tokenizer
from exatrain.eval.eigenscore import METHODS, eigenscore
from exatrain.model.generate import generate
from exatrain.model.llama import Transformer
from exatrain.model.sampling import sample_with_hidden


@dataclass
class PromptEigenScore:
    prompt: list[int]
    tokens: Tensor  # (K, T + max_new_tokens)
    generated: Tensor  # (K,) tokens sampled before eos
    hidden: Tensor  # (K, D) embeddings the score is computed from
    scores: dict[str, float]  # method -> EigenScore (natural log)


def prompt_seed(seed: int, prompt: Sequence[int]) -> int:
    """A generator seed from the run seed and the prompt's tokens: CRC32, stable across runs and
    platforms. 32 bits because torch's CPU generator (mt19937) ignores the high half of a seed."""
    return zlib.crc32(np.asarray([seed, *prompt], dtype=np.int64).tobytes())


@torch.no_grad()
def eigenscore_for_prompts(model: Transformer, prompts: Sequence[Sequence[int]], *, k: int = 10,
                           max_new_tokens: int = 16, temperature: float = 0.5, top_k: int = 10,
                           top_p: float = 0.99, layer: int | None = None, eos_id: int | None = None,
                           methods: Sequence[str] = METHODS, alpha: float = 1e-3, standardize: bool = False,
                           moments: int = 20, probes: int = 20, seed: int = 0) -> list[PromptEigenScore]:
    """EigenScore per prompt (token ids, BOS included as in training). Defaults are INSIDE's."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown EigenScore methods {sorted(unknown)}; choose from {METHODS}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(prompt_seed(seed, prompt))
            s = sample_with_hidden(model, prompt, k, max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, layer=layer, eos_id=eos_id, generator=gen)
            scores = {m: eigenscore(s.hidden, alpha, m, standardize=standardize, moments=moments, probes=probes,
                                    seed=seed) for m in methods}
            out.append(PromptEigenScore(list(prompt), s.tokens, s.generated, s.hidden, scores))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def answer_accuracy(model: Transformer, tokenizer: Tokenizer, questions: Sequence[Question],
                    batch_size: int = 64) -> list[bool]:
    """Greedy-decode each question (`<bos>` + prompt) and compare token for token with " " + answer.

    Questions are batched by prompt length (the KV cache has no padding mask), so batching does
    not change any answer.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = list(zip(encode_prompts(tokenizer, [q.prompt for q in questions]),
                       tokenizer.encode_batch([" " + q.answer for q in questions])))
    correct = [False] * len(questions)
    by_length: dict[int, list[int]] = {}
    for i, (prompt, _) in enumerate(encoded):
        by_length.setdefault(len(prompt), []).append(i)
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                rows = group[start:start + batch_size]
                prompts = torch.tensor([encoded[i][0] for i in rows], device=device)
                n_new = max(len(encoded[i][1]) for i in rows)
                out = generate(model, prompts, n_new)[:, prompts.shape[1]:].tolist()
                for i, gen in zip(rows, out):
                    answer = encoded[i][1]
                    correct[i] = gen[:len(answer)] == answer
    finally:
        model.train(was_training)
    return correct


def accuracy_by_bucket(questions: Sequence[Question], correct: Sequence[bool]) -> dict[str, dict[str, float]]:
    """{bucket: {"n": count, "accuracy": fraction}} plus "all"."""
    out: dict[str, dict[str, float]] = {}
    for name in sorted({q.bucket for q in questions}) + ["all"]:
        hits = [c for q, c in zip(questions, correct) if name in ("all", q.bucket)]
        out[name] = {"n": len(hits), "accuracy": sum(hits) / len(hits)}
    return out
