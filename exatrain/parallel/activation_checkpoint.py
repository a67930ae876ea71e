"""Activation checkpointing per transformer block (train.activation_checkpointing).

full: keep only each block's input, recompute the whole block in backward (least memory).
selective: keep the outputs of matmuls, attention and collectives, recompute the cheap
pointwise work (norms, RoPE, SiLU, residual adds) - most of the memory saving of norm/activation
tensors at a few percent of extra compute, and no collective is ever re-issued under TP.
Zero-bubble pipeline schedules run two backward passes over each block (input grads, then
weight grads), which torch's op-level selective checkpointing forbids; there "selective"
checkpoints every other block fully instead (layer-level selective, about half the saving).
Wrapping uses torch's checkpoint_wrapper, whose FQN prefix DCP strips, so checkpoints stay
layout- and AC-independent.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


def _selective_policy(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(part: nn.Module, mode: str, split_backward: bool = False) -> None:
    """Wrap the blocks of `part.layers` in place; mode is none | selective | full.

    `split_backward`: the pipeline schedule computes input and weight gradients separately.
    """
    if mode == "none":
        return
    for key, block in list(part.layers.named_children()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif split_backward:
            if int(key) % 2:
                continue
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False,
                                         context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
        part.layers.register_module(key, wrapped)
