"""Model FLOPs for MFU, in the PaLM/torchtitan convention and in the Megatron one (DESIGN.md §3).

Convention (PaLM appendix B, torchtitan, Megatron all agree): training costs 6 FLOPs per parameter per
token (2 forward, 4 backward) plus 12·L·d·T per token for the QKᵀ and AV matmuls, counted over the
*full* T×T score matrix. The causal mask means a kernel only needs the lower triangle, i.e. half of
that term; we deliberately do not halve it, so our MFU compares one-to-one with the numbers those
papers and frameworks publish. Document masking is ignored likewise (a packed sequence counts as
one sequence of length T). Recomputation under activation checkpointing is not model work and is
never counted here; `megatron_flops_per_iteration` is the exception because its c factor is how
the Frontier paper's tooling (Megatron-DeepSpeed) reports hardware FLOPs.
"""

from __future__ import annotations

from exatrain.config import ModelConfig
from exatrain.model.llama import ffn_hidden_dim


def non_embedding_params(cfg: ModelConfig) -> int:
    """N for the 6·N term: every matmul weight a token passes through, norms included.

    The input embedding is a lookup (no FLOPs) and is excluded; the output projection is a matmul
    and is counted once, whether or not it shares its weight with the embedding. This equals
    `count_params(model)` for a tied model and `count_params(model, exclude_embeddings=True)`
    for an untied one, computed analytically so that planning a 1T model builds nothing.
    """
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set before counting FLOPs (the trainer fills it from the tokenizer)")
    d, kv_dim = cfg.dim, (cfg.n_kv_heads or cfg.n_heads) * (cfg.dim // cfg.n_heads)
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ffn_hidden_dim(cfg) + 2 * d
    return cfg.n_layers * per_layer + d + cfg.vocab_size * d


def dense_equivalent_attention_layers(cfg: ModelConfig, seq_len: int) -> float:
    """How many dense layers' worth of attention score work the model does at `seq_len`.

    An S2 sparse layer counts as its attended fraction of the causal block pairs, averaged over
    heads (dense heads count 1), so the 12·d·T convention above is kept and only scaled; dense
    layers of a hybrid model count 1.
    """
    if cfg.attention != "s2":
        return float(cfg.n_layers)
    try:
        from exatrain.model.s2.pattern import S2Pattern, is_dense_layer
    except ImportError as exc:
        raise NotImplementedError(
            "FLOP accounting for model.attention='s2' needs the attended block fraction from "
            f"exatrain.model.s2.pattern (S2Pattern.attended_fraction, is_dense_layer), which is not available: {exc}"
        ) from None
    fraction = S2Pattern.from_config(cfg).attended_fraction(seq_len)
    sparse = sum(not is_dense_layer(cfg, i) for i in range(cfg.n_layers))
    return (cfg.n_layers - sparse) + sparse * fraction


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token: 6·N + 12·L_attn·d·T (see module docstring)."""
    attention = 12 * dense_equivalent_attention_layers(model_cfg, seq_len) * model_cfg.dim * seq_len
    return 6.0 * non_embedding_params(model_cfg) + attention


def megatron_flops_per_iteration(model_cfg: ModelConfig, batch: int, seq_len: int, recompute: bool) -> float:
    """Narayanan et al. (2021): 24·c·B·s·l·h²·(1 + s/6h + V/16lh), c = 4 with full recompute, else 3.

    `batch` is the global batch in sequences. The formula assumes a GPT block (MHA, 4h GELU MLP) and
    scales the logit term by c too, exactly as Megatron-DeepSpeed's throughput calculator does; it is
    here to reproduce the Frontier paper's TFLOP/s, not for MFU (use `flops_per_token`).
    """
    if model_cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set before counting FLOPs")
    c = 4 if recompute else 3
    s, l, h, v = seq_len, model_cfg.n_layers, model_cfg.dim, model_cfg.vocab_size
    return 24.0 * c * batch * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
