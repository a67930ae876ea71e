"""Simulated low-precision GEMMs ("masked GEMMs", DESIGN.md §7) and the linear-swapping model converter.

A simulated GEMM rounds its operands onto ExMy formats and multiplies them in fp32: activations
and weights in forward, the output gradient in backward (so both backward GEMMs, dgrad = go·W and
wgrad = goᵀ·x, see the rounded gradient and the rounded forward operands). Accumulation and the
master weights stay fp32, which isolates the effect of the operand formats, as in "To FP8 and Back
Again". Keep parameters fp32 (train.dtype=fp32) and TF32 off on GPUs, or the simulation is not exact.

It is built from two straight-through autograd Functions around F.linear rather than a hand-written
GEMM backward, so DTensor (tensor parallelism), FSDP2 and autograd place the GEMMs as usual; a
DTensor operand is rounded shard by shard (rounding is elementwise), after resolving a Partial
placement, whose shards are summands rather than values.

`swap_linears` runs on a meta-device model, before parallelisation and before weights exist: the
new modules share the old modules' Parameter objects, so tying, `to_empty` and `init_weights` work
unchanged. The LM head (`output`) and the embedding are left alone by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from exatrain.train.exmy import ExMy, quantize

DEFAULT_EXCLUDE: tuple[str, ...] = ("output", "tok_embeddings")


@dataclass(frozen=True)
class GemmFormats:
    """The ExMy of each GEMM operand role; None keeps that operand fp32."""

    input: ExMy | None = None
    weight: ExMy | None = None
    grad_output: ExMy | None = None

    @property
    def exact(self) -> bool:
        """Every operand stays fp32: nothing to simulate."""
        return self.input is None and self.weight is None and self.grad_output is None

    def describe(self) -> str:
        def one(f: ExMy | None) -> str:
            return "fp32" if f is None else f"{f.name}/{f.rounding}"

        return f"input={one(self.input)}, weight={one(self.weight)}, grad_output={one(self.grad_output)}"


def quantize_tensor(x: torch.Tensor, fmt: ExMy, generator: torch.Generator | None = None) -> torch.Tensor:
    """`quantize` for plain tensors and DTensors (per local shard; Partial is reduced first)."""
    if not isinstance(x, DTensor):
        return quantize(x, fmt, generator)
    if any(p.is_partial() for p in x.placements):
        x = x.redistribute(x.device_mesh, [Replicate() if p.is_partial() else p for p in x.placements])
    local = quantize(x.to_local(), fmt, generator)
    return DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())


class _RoundForward(torch.autograd.Function):
    """Round in forward; the gradient passes straight through (the GEMM differentiates w.r.t. the rounded operand)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: ExMy, generator: torch.Generator | None) -> torch.Tensor:
        return quantize_tensor(x, fmt, generator)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _RoundGradient(torch.autograd.Function):
    """Identity in forward; rounds the incoming gradient, which then feeds both backward GEMMs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: ExMy, generator: torch.Generator | None) -> torch.Tensor:
        ctx.fmt, ctx.generator = fmt, generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return quantize_tensor(grad, ctx.fmt, ctx.generator), None, None


def simulated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, formats: GemmFormats,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """y = round(x)·round(W)ᵀ (+ bias, added in fp32 outside the GEMM), with round(dy) in backward."""
    if formats.input is not None:
        x = _RoundForward.apply(x, formats.input, generator)
    if formats.weight is not None:
        weight = _RoundForward.apply(weight, formats.weight, generator)
    out = F.linear(x, weight)
    if formats.grad_output is not None:
        out = _RoundGradient.apply(out, formats.grad_output, generator)
    return out if bias is None else out + bias


class SimulatedLinear(nn.Linear):
    """nn.Linear whose GEMMs run on simulated ExMy operands. A subclass, so DTensor TP styles,
    FSDP2, init code and state dicts treat it as the Linear it replaces (same parameter names).

    `generator` drives stochastic rounding; None uses the device's global RNG, which the trainer's
    checkpoints already save, so resumed runs draw the same numbers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, formats: GemmFormats = GemmFormats(),
                 generator: torch.Generator | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.formats = formats
        self.generator = generator

    @classmethod
    def from_linear(cls, linear: nn.Linear, formats: GemmFormats,
                    generator: torch.Generator | None = None) -> SimulatedLinear:
        """Wrap `linear`'s own Parameters (works on meta tensors: nothing is allocated)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, formats=formats, generator=generator)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simulated_linear(x, self.weight, self.bias, self.formats, self.generator)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.formats.describe()}"


def matches(fqn: str, patterns: Sequence[str]) -> bool:
    """fnmatch on the FQN (`*` crosses dots); a plain name also matches everything under it."""
    return any(fnmatchcase(fqn, p) or fqn.startswith(p + ".") for p in patterns)


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None],
                 exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Replace every plain nn.Linear whose FQN is not in `exclude` by `make(fqn, linear)` (None: keep it).

    Only exact nn.Linear instances are visited, so converters do not stack. Returns the swapped FQNs.
    """
    swapped = []
    for fqn, module in list(model.named_modules()):
        if type(module) is not nn.Linear or matches(fqn, exclude):
            continue
        if not fqn:
            raise ValueError("swap_linears needs a container module, not a bare nn.Linear")
        new = make(fqn, module)
        if new is None:
            continue
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, new)
        swapped.append(fqn)
    return swapped


def simulated_maker(rules: Sequence[tuple[str, GemmFormats]],
                    generator: torch.Generator | None = None) -> Callable[[str, nn.Linear], nn.Module | None]:
    """A `make` for swap_linears: the first (pattern, formats) rule matching the FQN decides, e.g.
    [("layers.*.attention.*", attn), ("layers.*.feed_forward.*", ffn)]; no match, or a rule leaving every
    operand exact, keeps the Linear."""

    def make(fqn: str, linear: nn.Linear) -> nn.Module | None:
        formats = next((f for pattern, f in rules if matches(fqn, [pattern])), None)
        if formats is None or formats.exact:
            return None
        return SimulatedLinear.from_linear(linear, formats, generator)

    return make
