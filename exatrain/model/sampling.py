"""K sampled continuations of one prompt, with one layer's hidden state at each one's last token.

EigenScore (DESIGN.md §6, exatrain.eval.eigenscore) needs, per prompt, K answers sampled with
temperature / top-k / top-p (INSIDE: K = 10, T = 0.5, top-p 0.99, top-k 10) and the hidden state of
a middle layer at the last generated token of each. The K samples of a prompt form one batch of K
identical prompts decoded with the KV cache (exatrain.model.generate.KVCache), so no row is ever
padded; prompts of different lengths go in separate batches (the cache has no padding mask).

"Last generated token": the state at the position of the last sampled token that is not `eos_id`.
It is computed when that token is fed back, so decoding runs one forward past the last sample;
a row that stops at eos keeps the state of the token before it (its prompt's last token if eos came
first). INSIDE's code reads HF's `hidden_states[num_tokens - 2]` instead, the state one position
earlier (the one that predicted the last token), and for a one-token answer the prompt's first
token: we follow the paper's definition.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exatrain.model.generate import KVCache
from exatrain.model.llama import Transformer


def middle_layer(n_layers: int) -> int:
    """INSIDE's layer: HF `hidden_states[len // 2]` of the n_layers + 1 states, i.e. block (n_layers + 1)//2 − 1.

    (For n_layers = 1 HF's entry would be the final-normed output; here it is block 0's raw output.)
    """
    return max((n_layers + 1) // 2 - 1, 0)


@contextmanager
def capture(module: nn.Module, inputs: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record `module`'s output (or first positional input) of each call in the yielded dict under "h"."""
    box: dict[str, Tensor] = {}
    if inputs:
        handle = module.register_forward_pre_hook(lambda m, args: box.__setitem__("h", args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: box.__setitem__("h", out))
    try:
        yield box
    finally:
        handle.remove()


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Scale by 1/temperature, then keep the top_k largest, then the smallest set of those whose
    probability reaches top_p (HF's order and tie rule: a token goes when the mass strictly above it
    already reaches top_p); removed logits become −inf. top_k 0 and top_p 1 disable a filter."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_above = probs.cumsum(-1) - probs
        drop = mass_above >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@dataclass
class Samples:
    tokens: Tensor  # (K, T + max_new_tokens): prompt, samples, eos_id after a row stopped
    generated: Tensor  # (K,) sampled tokens before eos (or max_new_tokens)
    hidden: Tensor  # (K, D) the captured state at each row's last non-eos token


@torch.no_grad()
def sample_with_hidden(model: Transformer, prompt: Sequence[int] | Tensor, k: int, max_new_tokens: int, *,
                       temperature: float = 0.5, top_k: int = 10, top_p: float = 0.99, layer: int | None = None,
                       eos_id: int | None = None, generator: torch.Generator | None = None) -> Samples:
    """Sample k continuations of `prompt` (token ids, BOS included if the model was trained with one)
    and capture block `layer`'s output (default `middle_layer`) at each one's last token.

    temperature 0 decodes greedily (all k rows equal). Decoding stops early once every row hit eos.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device).reshape(1, -1)
    T = prompt.shape[1]
    if T == 0 or k < 1 or max_new_tokens < 1:
        raise ValueError(f"need a non-empty prompt, k >= 1 and max_new_tokens >= 1 (got {T}, {k}, {max_new_tokens})")
    layer = middle_layer(model.cfg.n_layers) if layer is None else layer
    cache = KVCache(model, k, T + max_new_tokens)
    tokens = prompt.expand(k, T)
    generated = torch.zeros(k, dtype=torch.long, device=device)
    done = torch.zeros(k, dtype=torch.bool, device=device)
    with capture(model.layers[str(layer)]) as box:
        logits = model(tokens, positions=torch.arange(T, device=device).expand(k, T), cache=cache)[:, -1]
        hidden = box["h"][:, -1].clone()
        for step in range(max_new_tokens):
            if temperature > 0:
                probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            generated += (~done).long()
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
            positions = torch.full((k, 1), T + step, device=device)
            logits = model(nxt[:, None], positions=positions, cache=cache)[:, -1]
            hidden = torch.where(done[:, None], hidden, box["h"][:, -1])
    if tokens.shape[1] < T + max_new_tokens:  # every row stopped early: pad with eos
        pad = torch.full((k, T + max_new_tokens - tokens.shape[1]), eos_id, dtype=torch.long, device=device)
        tokens = torch.cat([tokens, pad], dim=1)
    return Samples(tokens=tokens, generated=generated, hidden=hidden)
