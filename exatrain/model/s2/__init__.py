"""S2-Attention (DESIGN.md §4): per-head strided block-sparse attention as an attention backend.

`layer_attention(cfg, i)` is the integration point the model calls for each layer: None for the
dense layers of a hybrid model, else an `S2Attention` with the backend signature. It runs the
fastest implementation for the device: the block-sparse CPU path (blocksparse.py) on CPU, the
Triton kernels (triton_kernel.py) on GPUs. `force_impl("reference")` pins one for tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from exatrain.config import ModelConfig
from exatrain.model.s2.blocksparse import blocksparse_attention
from exatrain.model.s2.pattern import S2Pattern, is_dense_layer
from exatrain.model.s2.reference import reference_s2_attention

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
        return fn(q, k, v, self.pattern, doc_ids=doc_ids, scale=scale, head_offset=head_offset)

    def __repr__(self) -> str:
        return f"S2Attention({self.pattern})"


def layer_attention(cfg: ModelConfig, layer_idx: int) -> S2Attention | None:
    """None for a dense layer of a hybrid model, else the layer's S2 attention."""
    if is_dense_layer(cfg, layer_idx):
        return None
    return S2Attention(S2Pattern.from_config(cfg))


def attended_fraction(cfg: ModelConfig, seq_len: int) -> float:
    """Attended / causal block pairs, averaged over heads and layers (dense layers count 1.0)."""
    pattern = S2Pattern.from_config(cfg)
    sparse = pattern.attended_fraction(seq_len)
    return sum(1.0 if is_dense_layer(cfg, i) else sparse for i in range(cfg.n_layers)) / cfg.n_layers
