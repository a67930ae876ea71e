"""The engine contract: what the trainer asks of an engine, and the pieces every engine shares.

An engine owns a parallelised model and its optimizer. The loss of a step is
sum(token CE over the global batch) / global label count, and data-parallel gradients are
summed, so loss, gradients and updates equal one process running the whole global batch,
whatever the layout and gradient-accumulation split. Engines register a constructor under
their `parallel.engine` name (exatrain.registry.ENGINES).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from exatrain.data.batch import IGNORE_INDEX, Batch
from exatrain.model.documents import to_device

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class StepStats:
    """Global values of one optimizer step, identical on every rank (grad_norm is before clipping)."""

    loss: float
    grad_norm: float
    skipped: bool = False  # non-finite gradients: no optimizer step was taken


class Engine(Protocol):
    """What the trainer and callbacks use. `model_parts` are this rank's model pieces (one, or its
    pipeline stages), already parallelised; a checkpoint holds `state_dict()` under its FQN keys."""

    model_parts: list[nn.Module]

    def train_step(self, micro_batches: list[Batch], n_label_tokens: int, lr: float) -> StepStats:
        """Forward + backward every micro-batch, clip, step the optimizer at `lr` (× each group's lr_scale)."""
        ...

    def eval_loss(self, micro_batches: list[Batch]) -> tuple[float, int]:
        """Global summed token CE and global label count, without gradients."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """{"model": FQN -> tensor, "optim": flattened FQN-keyed optimizer state}; may be sharded DTensors."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes (AC, compile): the layout-independent FQN."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; works on vocab-sharded DTensor logits under loss_parallel."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def model_inputs(b: Batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tokens and the model's keyword inputs on `device`; positions are always given (pipeline stages
    split every keyword tensor into micro-batches)."""
    tokens = b.tokens.to(device)
    positions = b.positions if b.positions is not None else torch.arange(tokens.shape[1]).expand_as(tokens)
    kwargs = {"positions": positions.to(device)}
    if b.doc_ids is not None:  # boundaries derived here, on the host, once per micro-batch
        kwargs["doc_ids"] = to_device(b.doc_ids, device)
    return tokens, kwargs


def local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


T = TypeVar("T")


def last_forward_calls(calls: list[T], rows_of: Callable[[T], int], rows: int, what: str) -> list[T]:
    """The last of a hooked module's `calls` in one `Engine.eval_loss`, covering its `rows` rows once.

    A pipeline schedule switching from training to evaluation first re-runs each stage's forward for shape
    inference (torch.distributed.pipelining, on placeholder inputs): those calls come first and are dropped."""
    kept, seen = [], 0
    for call in reversed(calls):
        if seen >= rows:
            break
        kept.append(call)
        seen += rows_of(call)
    if seen != rows:
        raise RuntimeError(f"{what}: the evaluation forward recorded {seen} rows, expected {rows}")
    return kept[::-1]


def all_reduce_sums(values: list[float]) -> list[float]:
    """Element-wise sums over every rank in float64, one collective (the values themselves without a process
    group)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum(value: torch.Tensor) -> float:
    """Sum of a scalar over every rank (the value itself without a process group)."""
    return all_reduce_sums([float(value)])[0]
