"""Autoregressive generation with a KV cache, for dense and S2 models.

`KVCache` holds one cache per layer: a dense one for dense layers, S2's pruned one (local ring +
the far blocks each KV head can still read) for S2 layers. The prompt is run in one forward
(S2 layers use their fast path), then tokens are decoded one at a time. `generate(...,
use_cache=False)` recomputes the whole sequence every step: the reference the cache must match.
"""

from __future__ import annotations

import torch

from exatrain.model.llama import Transformer
from exatrain.model.s2 import S2Attention
from exatrain.model.s2.kv_cache import DenseLayerCache, S2LayerCache


class KVCache:
    def __init__(self, model: Transformer, batch: int, max_len: int):
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={model.cfg.max_seq_len}")
        ref = next(model.parameters())
        self.layers: dict[int, DenseLayerCache | S2LayerCache] = {}
        self.dense_bytes = 0
        for block in model.layers.values():
            a = block.attention
            shape = (a.head_dim, max_len, ref.dtype, ref.device)
            if isinstance(a.attend, S2Attention):
                units = a.attend.pattern.local_units(a.head_offset, a.n_heads)
                self.layers[block.layer_idx] = S2LayerCache(a.attend.pattern, units, batch, *shape)
            else:
                self.layers[block.layer_idx] = DenseLayerCache(batch, a.n_kv_heads, *shape)
            self.dense_bytes += 2 * batch * a.n_kv_heads * max_len * a.head_dim * ref.element_size()

    def layer(self, idx: int) -> DenseLayerCache | S2LayerCache:
        return self.layers[idx]

    @property
    def length(self) -> int:
        return next(iter(self.layers.values())).length

    def nbytes(self) -> int:
        """Bytes this cache holds; compare with `dense_bytes`, a full cache of the same capacity."""
        return sum(c.nbytes() for c in self.layers.values())


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt (B, T) -> (B, T + max_new_tokens). Greedy when temperature == 0."""
    B, T = prompt.shape
    tokens = prompt
    cache = KVCache(model, B, T + max_new_tokens - 1) if use_cache and max_new_tokens > 0 else None
    step_input, positions = prompt, torch.arange(T, device=prompt.device).expand(B, T)
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(tokens)[:, -1]
        else:
            logits = model(step_input, positions=positions, cache=cache)[:, -1]
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        step_input, positions = nxt, torch.full((B, 1), tokens.shape[1] - 1, device=prompt.device)
    return tokens
