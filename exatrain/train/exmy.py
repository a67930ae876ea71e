"""Simulated ExMy floating-point formats: exact quantise-dequantise of fp32 tensors (DESIGN.md §7).

"To FP8 and Back Again" simulates narrower formats inside fp32 GEMMs to see which bits training
needs. `ExMy` describes the value set (sign, `exponent_bits`, `mantissa_bits`, `bias`, subnormals
kept or flushed, the special-value variant) and how fp32 values are mapped onto it (`rounding`,
`overflow`); `quantize` returns the nearest-by-that-rule value, still stored in fp32.

Variants (how the all-ones exponent is used):
  ieee  the all-ones exponent holds ±inf and NaNs (bf16, fp16, float8_e5m2)
  fn    the all-ones exponent holds normal numbers, only all-ones mantissa is NaN, no inf (float8_e4m3fn)
  fnuz  every code is a number except the negative-zero code, which is the one NaN; no -0, no inf,
        default bias 2^(e-1) (float8_e4m3fnuz/e5m2fnuz, AMD MI300)
Rounding: nearest (ties to even), truncate (toward zero: the paper's mantissa masking), stochastic
(up with probability equal to the discarded fraction; unbiased). Overflow of a finite value:
"inf" gives ±inf (NaN for fn/fnuz, which have no inf), "saturate" gives ±max finite. Truncation
never overflows to inf (IEEE round-toward-zero returns ±max), and inputs that are ±inf stay ±inf
in ieee formats. Flushed subnormals (subnormals=False) flush results below the smallest normal to
a signed zero after rounding, like hardware flush-to-zero.

How: with p = 2^max(e_x, emin) built from the exponent bits of |x|, s = |x|/p·2^m is exact in
fp32 and the format's values near x are the integers near s; rounding s is one torch op, and
scaling back is exact again (~6 ns/element on one core, no Python loops). Formats whose normal
range lies outside fp32's are rejected (m <= 23 then keeps their subnormals inside fp32's), so
every result is exact. (Only with a bias < 1, |x|/p can underflow for |x| < 2^(emin-126): those
round to zero anyway, and stochastic rounding's up-probability is off by < 2^-149.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from exatrain.config import ConfigError

VARIANTS = ("ieee", "fn", "fnuz")
ROUNDINGS = ("nearest", "truncate", "stochastic")
OVERFLOWS = ("inf", "saturate")
ALIASES = {"fp32": "e8m23", "tf32": "e8m10", "bf16": "e8m7", "fp16": "e5m10"}
_NAME = re.compile(r"e(\d+)m(\d+)(fnuz|fn)?")
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_bias(exponent_bits: int, variant: str = "ieee") -> int:
    return 2 ** (exponent_bits - 1) if variant == "fnuz" else 2 ** (exponent_bits - 1) - 1


def _emax(e: int, m: int, bias: int, variant: str) -> int:
    """Exponent of the largest finite value."""
    top = 2**e - 1 - bias  # the all-ones exponent field
    if variant == "ieee" or (variant == "fn" and m == 0):  # fn with m=0: the all-ones code is only NaN
        return top - 1
    return top


def _max_finite(e: int, m: int, bias: int, variant: str) -> float:
    """fn gives up the all-ones mantissa of the top binade to NaN (448 = 1.75·2^8 for e4m3fn)."""
    if variant == "fn":
        significand = 2.0 - 2.0 ** (1 - m) if m > 0 else 1.0
    else:
        significand = 2.0 - 2.0**-m
    return significand * 2.0 ** _emax(e, m, bias, variant)


def check_format(spec: Mapping[str, Any], key: str) -> None:
    """Validate ExMy fields (a dict or an ExMy's fields) and name the offending `key.field`."""

    def need(cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}.{name}: {msg}")

    e, m = spec.get("exponent_bits"), spec.get("mantissa_bits")
    need(isinstance(e, int) and not isinstance(e, bool) and 1 <= e <= 8, "exponent_bits",
         f"must be in [1, 8] (simulated inside fp32), got {e!r}")
    need(isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= 23, "mantissa_bits",
         f"must be in [0, 23] (simulated inside fp32), got {m!r}")
    variant = spec.get("variant", "ieee")
    need(variant in VARIANTS, "variant", f"got {variant!r}, expected one of {', '.join(VARIANTS)}")
    rounding = spec.get("rounding", "nearest")
    need(rounding in ROUNDINGS, "rounding", f"got {rounding!r}, expected one of {', '.join(ROUNDINGS)}")
    overflow = spec.get("overflow", "inf")
    need(overflow in OVERFLOWS, "overflow", f"got {overflow!r}, expected one of {', '.join(OVERFLOWS)}")
    need(isinstance(spec.get("subnormals", True), bool), "subnormals", "must be true or false")
    bias = spec.get("bias")
    bias = default_bias(e, variant) if bias is None else bias
    need(isinstance(bias, int) and not isinstance(bias, bool), "bias", f"must be an integer, got {bias!r}")
    emin, emax = 1 - bias, _emax(e, m, bias, variant)
    need(emax >= emin, "exponent_bits", f"e{e}m{m} {variant} with bias {bias} has no normal numbers")
    need(emax <= 127, "bias", f"{bias} puts the largest value at 2^{emax}, beyond fp32 (needs bias >= {bias + emax - 127})")
    need(emin >= -126, "bias", f"{bias} puts the smallest normal at 2^{emin}, below fp32's 2^-126 "
                               f"(needs bias <= {bias + emin + 126})")


@dataclass(frozen=True)
class ExMy:
    """A simulated floating-point format and how values are rounded onto it (see the module docstring)."""

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None  # None: 2^(e-1)-1 (ieee, fn) or 2^(e-1) (fnuz)
    subnormals: bool = True
    overflow: str = "inf"
    variant: str = "ieee"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        check_format({f.name: getattr(self, f.name) for f in fields(self)}, "ExMy")
        if self.bias is None:
            object.__setattr__(self, "bias", default_bias(self.exponent_bits, self.variant))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], key: str) -> ExMy:
        """Build from a config mapping; errors name `key.<field>` (e.g. precision.formats.x.bias)."""
        unknown = set(spec) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{key}: unknown field(s) {', '.join(sorted(unknown))}")
        check_format(spec, key)
        return cls(**spec)

    @classmethod
    def parse(cls, name: str, key: str = "format", **options: Any) -> ExMy:
        """'e8m3', 'e4m3fn', 'e5m2fnuz', or an alias (fp32, tf32, bf16, fp16); `options` set the other fields."""
        match = _NAME.fullmatch(ALIASES.get(name.lower(), name.lower()))
        if match is None:
            raise ConfigError(f"{key}: cannot parse format {name!r}; write eXmY[fn|fnuz] (e.g. e8m3, e4m3fn) "
                              f"or one of {', '.join(ALIASES)}")
        spec = {"exponent_bits": int(match[1]), "mantissa_bits": int(match[2]),
                "variant": match[3] or "ieee", **options}
        return cls.from_dict(spec, key)

    @property
    def name(self) -> str:
        suffix = "" if self.variant == "ieee" else self.variant
        return f"e{self.exponent_bits}m{self.mantissa_bits}{suffix}"

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return _emax(self.exponent_bits, self.mantissa_bits, self.bias, self.variant)

    @property
    def max_finite(self) -> float:
        return _max_finite(self.exponent_bits, self.mantissa_bits, self.bias, self.variant)

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mantissa_bits)

    @property
    def is_fp32(self) -> bool:
        """Every fp32 value is representable, so quantisation is the identity."""
        return (self.exponent_bits, self.mantissa_bits, self.bias, self.variant, self.subnormals) == (8, 23, 127, "ieee", True)


def torch_format(dtype: torch.dtype) -> ExMy:
    """The ExMy matching torch's fp32 -> `dtype` cast on CPU (round to nearest even).

    torch 2.13's CPU cast to float8_e4m3fn saturates (±inf and overflow give ±448); e5m2 overflows
    to ±inf; the fnuz casts give NaN.
    """
    table = {
        torch.float32: ExMy(8, 23),
        torch.bfloat16: ExMy(8, 7),
        torch.float16: ExMy(5, 10),
        torch.float8_e5m2: ExMy(5, 2),
        torch.float8_e4m3fn: ExMy(4, 3, variant="fn", overflow="saturate"),
        torch.float8_e4m3fnuz: ExMy(4, 3, variant="fnuz"),
        torch.float8_e5m2fnuz: ExMy(5, 2, variant="fnuz"),
    }
    if dtype not in table:
        raise ValueError(f"no ExMy equivalent for {dtype}")
    return table[dtype]


def _binade(a: torch.Tensor, fmt: ExMy) -> torch.Tensor:
    """2^max(e_x, emin) for each |x|, from its exponent bits: always a normal fp32 number, so exact.

    inf/NaN are clamped to the top fp32 binade (they stay inf/NaN through the division).
    """
    field = (a.view(torch.int32) >> 23).clamp_(min=fmt.emin + 127, max=254)
    return (field << 23).view(torch.float32)


def quantize(x: torch.Tensor, fmt: ExMy, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round `x` onto `fmt` and return it in x's dtype (fp32, bf16 or fp16 in; computed in fp32).

    `generator` drives stochastic rounding (default: the global RNG of x's device).
    """
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"quantize takes float32/bfloat16/float16 tensors, got {x.dtype}")
    if fmt.is_fp32:
        return x
    return _quantize(x.float(), fmt, generator).to(x.dtype)


def _quantize(x: torch.Tensor, fmt: ExMy, generator: torch.Generator | None) -> torch.Tensor:
    """NaN flows through every step unchanged; ±inf gives s = inf and is then mapped like an overflow."""
    a = x.abs()
    p = _binade(a, fmt)
    m = fmt.mantissa_bits
    s = (a / p).mul_(2.0**m)  # exact: power-of-two scalings; the fmt's values are the integers in s
    if fmt.rounding == "nearest":
        r = s.round_()  # half to even
    elif fmt.rounding == "truncate":
        r = s.trunc_()
    else:
        r = s.floor()
        u = torch.rand(s.shape, generator=generator, device=s.device)
        r = r.add_((u < s.sub_(r)).float())
    y = r.mul_(2.0**-m).mul_(p)  # exact (fmt values fit fp32); +inf when rounding up past 2^127
    over = y > fmt.max_finite  # finite overflow, and inf inputs
    saturate = fmt.rounding == "truncate" or fmt.overflow == "saturate"
    if saturate:
        y = y.masked_fill_(over, fmt.max_finite)
    else:
        y = y.masked_fill_(over, float("inf") if fmt.variant == "ieee" else float("nan"))
    if saturate and (fmt.variant == "ieee" or fmt.overflow == "inf"):  # inf inputs differ from finite overflow
        y = y.masked_fill_(torch.isinf(a), float("inf") if fmt.variant == "ieee" else float("nan"))
    if not fmt.subnormals:
        y = y.masked_fill_(y < fmt.min_normal, 0.0)
    y = torch.copysign(y, x)  # keeps -0 and the sign of values that round to zero
    if fmt.variant == "fnuz":
        y = y.masked_fill_(y == 0, 0.0)  # no negative zero
    return y
