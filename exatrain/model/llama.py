"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.

Module names (tok_embeddings, layers.N.attention.wq, feed_forward.w1, norm, output) follow
the torchtitan/Meta layout so tensor-parallel plans and HF conversion can name them.
Build on the meta device with `build_model`, then `materialize` on the target device:
large models never allocate twice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from exatrain.config import ConfigError, JobConfig, ModelConfig, require
from exatrain.model.attention import default_scale, layer_attention
from exatrain.registry import config_resolver, config_validator


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """model.ffn_hidden, or Llama's 2/3 · 4·dim rounded up to model.multiple_of when it is 0."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    hidden = int(2 * 4 * cfg.dim / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


@config_resolver
def resolve_model(cfg: JobConfig) -> None:
    """Fill the derived model sizes so the run's config.yaml states the model it trains."""
    m = cfg.model
    m.n_kv_heads = m.n_kv_heads or m.n_heads
    if m.dim > 0 and m.multiple_of > 0:
        m.ffn_hidden = ffn_hidden_dim(m)


@config_validator
def validate_model(cfg: JobConfig) -> None:
    m = cfg.model
    for key in ("dim", "n_layers", "n_heads", "max_seq_len", "ffn_hidden", "multiple_of", "vocab_multiple_of"):
        require(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    require(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    require(m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
            f"{m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    require((m.dim // m.n_heads) % 2 == 0, "model.dim", "head dim (dim / n_heads) must be even for RoPE")
    require(m.vocab_size > 0, "model.vocab_size", "must be positive (0 = the tokenizer's, set at resolution)")
    for key in ("base_dim", "emb_mult", "res_mult"):
        require(getattr(m.mup, key) > 0, f"model.mup.{key}", "must be positive")


def width_mult(cfg: ModelConfig) -> float:
    return cfg.dim / cfg.mup.base_dim if cfg.mup.enabled else 1.0


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D/2). Rotates interleaved pairs."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.scale = default_scale(self.head_dim, cfg.mup.enabled)
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.attend = layer_attention(cfg, layer_idx)
        self.head_offset = 0

    def forward(self, x, cos, sin, doc_ids, cache=None):
        """`cache` (a layer cache from exatrain.model.generate) stores this step's K/V and attends over it."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = self.attend if cache is None else cache.attend
        out = attend(q, k, v, doc_ids=doc_ids, scale=self.scale, head_offset=self.head_offset)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden_dim(cfg))
        self.res_mult = cfg.mup.res_mult if cfg.mup.enabled else 1.0

    def forward(self, x, cos, sin, doc_ids, cache=None):
        extra = () if cache is None else (cache,)  # keep the attention call's arity for TP input plans
        x = x + self.res_mult * self.attention(self.attention_norm(x), cos, sin, doc_ids, *extra)
        return x + self.res_mult * self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. Pipeline stages delete the parts they do not own (None modules are skipped)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set: load the config with exatrain.config.load_config, "
                              "which takes it from the tokenizer")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        head_dim = cfg.dim // cfg.n_heads
        cos, sin = rope_tables(head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.emb_mult = cfg.mup.emb_mult if cfg.mup.enabled else 1.0
        self.logit_mult = 1.0 / width_mult(cfg)

    def tie_weights(self) -> None:
        """Share the embedding and output matrix; re-run after `to_empty`, which unties them."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def rope(self, positions: torch.Tensor | None, T: int):
        if positions is None:
            return self.rope_cos[:T][None, None], self.rope_sin[:T][None, None]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); a middle pipeline stage takes and returns hidden states.

        `cache` (exatrain.model.generate.KVCache) is for incremental decoding; pass `positions` with it.
        """
        h = self.tok_embeddings(tokens) * self.emb_mult if self.tok_embeddings is not None else tokens
        cos, sin = self.rope(positions, h.shape[1])
        for layer in self.layers.values():
            if cache is None:
                h = layer(h, cos, sin, doc_ids)
            else:
                h = layer(h, cos, sin, doc_ids, cache.layer(layer.layer_idx))
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
            if self.logit_mult != 1.0:
                h = h * self.logit_mult
        return h

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, std) for input projections, depth-scaled std for output projections (GPT-2/Llama style).

        Under muP hidden matrices use std / sqrt(width_mult) (DESIGN.md §8).
        """
        cfg = self.cfg
        std = cfg.init_std
        hidden_std = std / math.sqrt(width_mult(cfg))
        out_std = hidden_std / math.sqrt(2 * cfg.n_layers)
        head_dim = cfg.dim // cfg.n_heads
        cos, sin = rope_tables(head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            a, f = layer.attention, layer.feed_forward
            for lin in (a.wq, a.wk, a.wv, f.w1, f.w3):
                nn.init.normal_(lin.weight, std=hidden_std)
            for lin in (a.wo, f.w2):
                nn.init.normal_(lin.weight, std=out_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not cfg.tie_embeddings:
            # Width-independent std: under muP the 1/width_mult logit multiplier already does the scaling.
            nn.init.normal_(self.output.weight, std=std)
        for module in self.modules():  # modules added by model converters (exatrain.model.convert)
            if hasattr(module, "init_state"):
                module.init_state()


def build_model(cfg: ModelConfig) -> Transformer:
    """Construct on the meta device: no memory is touched until `materialize`."""
    with torch.device("meta"):
        return Transformer(cfg)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate storage on `device` and initialise deterministically from `seed`."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, Transformer):
                m.tie_weights()
                m.init_weights()
    return model


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if exclude_embeddings and name.startswith("tok_embeddings"):
            continue
        total += p.numel()
    return total
