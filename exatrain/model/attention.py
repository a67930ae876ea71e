"""Attention backends behind one call signature, registered by name (`model.attention`).

A registered backend is a factory `(model_cfg, layer_idx) -> attention function`, so a backend
may differ per layer (S2's hybrid models keep some layers dense). Every attention function takes q (B, H, T, D), k and v (B, Hkv, T, D) and optional per-token document
ids (B, T) and returns (B, H, T, D). Grouped-query heads are expanded here, once, so
backends only see matching head counts. `head_offset` is the global index of the first
local head; it matters for patterns that differ per head (S2) under tensor parallelism.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from exatrain.config import JobConfig, ModelConfig, require
from exatrain.model.documents import documents
from exatrain.registry import ATTENTION, config_validator


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None,
                 scale: float, head_offset: int) -> torch.Tensor: ...


def expand_kv(k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat KV heads so that each query head has its own (GQA -> MHA layout)."""
    rep = n_heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def causal_document_mask(doc_ids: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, T) mask: causal and, when doc_ids is given, within one document."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal[None, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def sdpa_attention(q, k, v, *, doc_ids, scale, head_offset):
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if documents(doc_ids) is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = causal_document_mask(doc_ids, q.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def reference_attention(q, k, v, *, doc_ids, scale, head_offset, mask: torch.Tensor | None = None):
    """Plain softmax(QK^T)V in fp32 with an explicit boolean mask; the ground truth for tests."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if mask is None:
        mask = causal_document_mask(doc_ids, q.shape[2], q.device)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def flash_attention(q, k, v, *, doc_ids, scale, head_offset):
    """flash-attn 2 on CUDA/ROCm; packed documents use the varlen kernel with the host-derived boundaries."""
    try:
        fa = importlib.import_module("flash_attn")
    except ImportError as exc:
        raise RuntimeError("model.attention=flash needs the GPU extra: pip install 'exatrain[gpu]'") from exc
    if not q.is_cuda:
        raise RuntimeError("model.attention=flash runs on GPU only; use model.attention=sdpa on CPU")
    B, H, T, D = q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    docs = documents(doc_ids)
    if docs is None:
        return fa.flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=True).transpose(1, 2)
    cu, longest = docs.cu_seqlens, docs.max_seqlen
    out = fa.flash_attn_varlen_func(qt.reshape(B * T, H, D), kt.reshape(B * T, -1, D), vt.reshape(B * T, -1, D),
                                    cu, cu, longest, longest, softmax_scale=scale, causal=True)
    return out.view(B, T, H, D).transpose(1, 2)


AttentionFactory = Callable[[ModelConfig, int], AttentionFn]

for _name, _fn in (("sdpa", sdpa_attention), ("reference", reference_attention), ("flash", flash_attention)):
    ATTENTION.register(_name, lambda _cfg, _layer, fn=_fn: fn)


# Backends whose GPU kernels have no usable fp32 path: flash-attn rejects fp32 inputs at the first forward, and
# fp32 S2 tiles fill the 64 KiB LDS of an MI250X and spill (benchmarks/RESULTS.md, S2 kernels).
HALF_ONLY_ON_GPU = ("flash", "s2")


def runs_on_gpu(device: str) -> bool:
    """Whether train.device puts the job on a GPU ("auto": whenever one is visible, as the trainer decides)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


@config_validator
def validate_gpu_attention(cfg: JobConfig) -> None:
    """flash and s2 on GPU need a 16-bit compute dtype; caught here instead of in the first forward."""
    attention = cfg.model.attention
    if attention in HALF_ONLY_ON_GPU and runs_on_gpu(cfg.train.device):
        require(cfg.train.dtype != "fp32", "train.dtype",
                f"model.attention={attention} on GPU (train.device={cfg.train.device}) runs in bf16/fp16 only, "
                f"got fp32; set train.dtype=bf16 (or bf16_params), or model.attention=sdpa for fp32")


def layer_attention(cfg: ModelConfig, layer_idx: int) -> AttentionFn:
    """The attention function of layer `layer_idx`, from the backend registered as `cfg.attention`."""
    factory: AttentionFactory = ATTENTION.get(cfg.attention)
    return factory(cfg, layer_idx)


def default_scale(head_dim: int, mup: bool) -> float:
    """1/sqrt(d) normally; muP uses 1/d so attention logits stay O(1) as width grows."""
    return 1.0 / head_dim if mup else 1.0 / math.sqrt(head_dim)
