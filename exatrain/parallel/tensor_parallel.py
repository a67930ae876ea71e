"""Megatron-style tensor + sequence parallelism for the Llama blocks, expressed as DTensor plans.

Attention heads and FFN columns are split over the `tp` mesh dim (colwise wq/wk/wv/w1/w3,
rowwise wo/w2), so each block needs one all-reduce (or, with sequence parallelism, one
all-gather + one reduce-scatter) per sub-layer. With sequence parallelism the residual
stream and the norms hold T/tp tokens per rank, cutting activation memory by tp.
The embedding is split over the vocabulary (rowwise) and the output head over the vocabulary
(colwise); with loss parallelism the logits stay vocab-sharded into the cross-entropy, so the
full (B, T, V) logits never exist on one rank.

The plan is applied after model converters ran (exatrain.parallel.parallelize), so it sees converted
modules: a converted Linear may carry `tp_styles = {"colwise": ..., "rowwise": ..., "prepare_input": ...}`
(e.g. torchao's float8 styles) that replace the default style classes for it; the input preparation of
the attention and feed-forward sub-layers follows the styles of their first projection (wq, w1).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tensor_parallel(part: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool,
                          compile_workaround: bool) -> None:
    """Shard one model part (a whole Transformer or a pipeline stage of it) over `tp_mesh` in place.

    `compile_workaround` clones the embedding output: with torch.compile on TP blocks the
    backward otherwise fails or yields wrong embedding gradients (DESIGN.md §11).
    """
    tp = tp_mesh.size()
    seq = Shard(1) if sequence_parallel else Replicate()
    root_plan: dict[str, object] = {}
    if part.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if part.norm is not None and sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    if part.output is not None:
        root_plan["output"] = ColwiseParallel(input_layouts=seq,
                                              output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                              use_local_output=not loss_parallel)
    parallelize_module(part, tp_mesh, root_plan)
    if part.tok_embeddings is not None and part.output is not None and part.cfg.tie_embeddings:
        part.output.weight = part.tok_embeddings.weight  # both are Shard(0) over the vocabulary
    if compile_workaround and part.tok_embeddings is not None:
        part.tok_embeddings.register_forward_hook(lambda _m, _i, out: out.clone())

    for block in part.layers.values():
        plan: dict[str, object] = {
            "attention.wq": _style(block, "attention.wq", "colwise"),
            "attention.wk": _style(block, "attention.wk", "colwise"),
            "attention.wv": _style(block, "attention.wv", "colwise"),
            "attention.wo": _style(block, "attention.wo", "rowwise", output_layouts=seq),
            "feed_forward.w1": _style(block, "feed_forward.w1", "colwise"),
            "feed_forward.w2": _style(block, "feed_forward.w2", "rowwise", output_layouts=seq),
            "feed_forward.w3": _style(block, "feed_forward.w3", "colwise"),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                "attention": _style(block, "attention.wq", "prepare_input", input_layouts=(seq, None, None, None),
                                    desired_input_layouts=(Replicate(), None, None, None)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": _style(block, "feed_forward.w1", "prepare_input", input_layouts=(seq,),
                                       desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
        block.attention.head_offset = tp_mesh.get_local_rank() * (block.attention.n_heads // tp)


_DEFAULT_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "prepare_input": PrepareModuleInput}


def _style(block: nn.Module, fqn: str, kind: str, **kwargs: Any) -> Any:
    """The `kind` style for block's submodule `fqn`: its own `tp_styles[kind]` if a converter set one."""
    cls = getattr(block.get_submodule(fqn), "tp_styles", {}).get(kind, _DEFAULT_STYLES[kind])
    return cls(**kwargs)
