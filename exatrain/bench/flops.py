"""Model FLOPs for MFU (DESIGN.md §3), in either camp's attention convention, and the Megatron paper formula.

Every convention counts 6 FLOPs per parameter per token for training (2 forward, 4 backward: the
6·N term) and never counts recomputation (activation checkpointing, flash attention's backward);
they differ only in the score matmuls QKᵀ and AV, d·T multiply-adds each per token and layer:
- `palm` (the default): 12·L·d·T, the *full* T×T score matrix although the causal mask leaves half
  of it; PaLM (appendix B) and torchtitan (`get_num_flop_per_token`: "we follow the convention and
  do not account for sparsity in causal attention") count it so;
- `megatron`: 6·L·d·T, the causal half, as Megatron-LM's `num_floating_point_operations`
  (megatron/training/training.py: core attention `query_projection_size * seq_length / 2 * 2`).
So the same run has a higher MFU under `palm`; `metrics.flops_convention` picks the one the trainer
and the bench report (`flops_per_token_by_convention` gives both), so MFU compares with either camp.
Document masking is ignored in both (a packed sequence counts as one sequence of length T).
`megatron_flops_per_iteration` is the older formula of the Megatron paper (Narayanan et al. 2021),
whose s/6h term is the full matrix like `palm`; its c factor counts recomputation, because that is
how the Frontier paper's tooling (Megatron-DeepSpeed) reports hardware FLOPs.
"""

from __future__ import annotations

from exatrain.config import ModelConfig
from exatrain.model.llama import ffn_hidden_dim

# Attention FLOPs per token, layer, model dim and context token (QKᵀ and AV, forward + backward).
ATTENTION_FLOPS = {"palm": 12, "megatron": 6}


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
    heads (dense heads count 1), so either convention's d·T term is kept and only scaled; dense
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


def flops_per_token(model_cfg: ModelConfig, seq_len: int, convention: str = "palm") -> float:
    """Training (forward + backward) model FLOPs per token: 6·N + the attention term of `convention`."""
    if convention not in ATTENTION_FLOPS:
        raise ValueError(f"unknown FLOP convention {convention!r}; expected one of {', '.join(ATTENTION_FLOPS)}")
    attention = ATTENTION_FLOPS[convention] * dense_equivalent_attention_layers(model_cfg, seq_len) * model_cfg.dim
    return 6.0 * non_embedding_params(model_cfg) + attention * seq_len


def flops_per_token_by_convention(model_cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    return {c: flops_per_token(model_cfg, seq_len, c) for c in ATTENTION_FLOPS}


def mfu_formula(convention: str) -> str:
    """How MFU is computed under `convention`, for reports."""
    return (f"model FLOPs per token 6·N + {ATTENTION_FLOPS[convention]}·L·d·T ({convention} convention, "
            f"{'full T x T' if convention == 'palm' else 'causal half of the'} attention; exatrain.bench.flops: "
            "N non-embedding params incl. the output head), x tokens/s, / (devices x peak)")


def megatron_flops_per_iteration(model_cfg: ModelConfig, batch: int, seq_len: int, recompute: bool) -> float:
    """Narayanan et al. (2021): 24·c·B·s·l·h²·(1 + s/6h + V/16lh), c = 4 with full recompute, else 3.

    `batch` is the global batch in sequences. The formula assumes a GPT block (MHA, 4h GELU MLP) and
    scales the logit term by c too, exactly as Megatron-DeepSpeed's throughput calculator does. Its
    attention term (72·B·s·l·h²·s/6h = 12·l·h·s per token at c = 3) is the full matrix, the `palm`
    convention, unlike today's Megatron-LM code. It is here to reproduce the Frontier paper's TFLOP/s,
    not for MFU (use `flops_per_token`).
    """
    if model_cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set before counting FLOPs")
    c = 4 if recompute else 3
    s, l, h, v = seq_len, model_cfg.n_layers, model_cfg.dim, model_cfg.vocab_size
    return 24.0 * c * batch * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))
