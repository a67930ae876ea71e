"""S2-Attention (DESIGN.md §4): per-head strided block-sparse attention, the attention backend `s2`.

`layer_attention(cfg, i)` gives one layer's attention: None for the dense layers of a hybrid
model (the registered backend runs SDPA there), else an `S2Attention` with the backend signature.
It runs the fastest implementation for the device: the block-sparse CPU path (blocksparse.py) on
CPU, the Triton kernels (triton_kernel.py) on GPUs. `force_impl("reference")` pins one for tests.
`validate_s2` is the config check of `model.s2`, run once when a config is loaded.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from exatrain.config import JobConfig, ModelConfig, require
from exatrain.model.attention import sdpa_attention
from exatrain.model.documents import documents
from exatrain.model.s2.blocksparse import blocksparse_attention
from exatrain.model.s2.pattern import S2Pattern, is_dense_layer
from exatrain.model.s2.reference import reference_s2_attention
from exatrain.registry import ATTENTION, config_validator

__all__ = ["S2Attention", "S2Pattern", "attended_fraction", "force_impl", "is_dense_layer", "layer_attention"]

IMPLS = ("reference", "blocksparse", "triton")
_forced: str | None = None


@contextmanager
def force_impl(name: str | None) -> Iterator[None]:
    """Run every S2 layer with one implementation (None: choose by device) inside the block."""
    global _forced
    if name is not None and name not in IMPLS:
        raise ValueError(f"unknown S2 implementation {name!r}; available: {', '.join(IMPLS)}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def select_impl(device: torch.device) -> str:
    if _forced is not None:
        return _forced
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("model.attention=s2 on GPU needs Triton: pip install 'exatrain[gpu]'")
        return "triton"
    return "blocksparse"


def _run(impl: str):
    if impl == "reference":
        return reference_s2_attention
    if impl == "blocksparse":
        return blocksparse_attention
    from exatrain.model.s2.triton_kernel import triton_attention

    return triton_attention


class S2Attention:
    """Backend callable of one sparse layer; `pattern` is read by the sparse KV cache.

    Calls stay out of torch.compile graphs: the CPU path is a loop of fused kernel calls over
    data-dependent pieces and the Triton path launches its own kernels, so tracing them gains nothing.
    """

    def __init__(self, pattern: S2Pattern):
        self.pattern = pattern

    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None,
                 scale: float, head_offset: int) -> torch.Tensor:
        fn = _run(select_impl(q.device))
        if documents(doc_ids) is None:  # one document per row: plain causal, for every backend
            doc_ids = None
        return fn(q, k, v, self.pattern, doc_ids=doc_ids, scale=scale, head_offset=head_offset)

    def __repr__(self) -> str:
        return f"S2Attention({self.pattern})"


def layer_attention(cfg: ModelConfig, layer_idx: int) -> S2Attention | None:
    """None for a dense layer of a hybrid model, else the layer's S2 attention."""
    if is_dense_layer(cfg, layer_idx):
        return None
    return S2Attention(S2Pattern.from_config(cfg))


ATTENTION.register("s2", lambda cfg, layer_idx: layer_attention(cfg, layer_idx) or sdpa_attention)


@config_validator
def validate_s2(cfg: JobConfig) -> None:
    """model.s2 of an S2 model: the pattern's own checks, the hybrid layers, a block smaller than the
    sequence, and warnings (once, here) when the pattern is dense at data.seq_len or the sparse heads
    cannot cover every stride phase."""
    m = cfg.model
    if m.attention != "s2":
        return
    pattern = S2Pattern.from_config(m)
    require(m.s2.dense_period >= 0, "model.s2.dense_period", f"must be >= 0 (0: none), got {m.s2.dense_period}")
    require(all(0 <= i < m.n_layers for i in m.s2.dense_layers), "model.s2.dense_layers",
            f"layer indices must be in [0, {m.n_layers}), got {m.s2.dense_layers}")
    T = cfg.data.seq_len
    require(m.s2.block_size < T, "model.s2.block_size",
            f"{m.s2.block_size} >= data.seq_len={T}: one block per sequence makes S2 dense attention; "
            f"use a block_size below data.seq_len (or model.attention=sdpa)")
    n_blocks = -(-T // m.s2.block_size)
    if (pattern.n_sparse_units == 0 or m.s2.vert_stride == 1
            or (n_blocks <= m.s2.local_blocks + 1 and pattern.attended_fraction(T) == 1.0)):
        warnings.warn(f"S2 pattern is dense at data.seq_len={T}: model.s2.local_blocks={m.s2.local_blocks} x "
                      f"model.s2.block_size={m.s2.block_size}, vert_stride={m.s2.vert_stride}, num_dense_heads="
                      f"{m.s2.num_dense_heads} read every block; training runs dense attention at S2's cost.",
                      stacklevel=2)
    if not pattern.covers_context:
        phases = len({p for p in pattern.unit_phase if p >= 0})
        warnings.warn(f"S2 pattern: {pattern.n_sparse_units} sparse KV heads (stride step "
                      f"max(1, vert_stride // n_heads)) cannot cover all {pattern.vert_stride} stride phases, only "
                      f"{phases}; far context is only partly visible. Use a smaller model.s2.vert_stride or more "
                      f"KV heads.", stacklevel=2)


def attended_fraction(cfg: ModelConfig, seq_len: int) -> float:
    """Attended / causal block pairs, averaged over heads and layers (dense layers count 1.0)."""
    pattern = S2Pattern.from_config(cfg)
    sparse = pattern.attended_fraction(seq_len)
    return sum(1.0 if is_dense_layer(cfg, i) else sparse for i in range(cfg.n_layers)) / cfg.n_layers
