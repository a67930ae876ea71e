"""ExMy quantisation is exact: checked value by value against an independent scalar reference that decodes
every code of the format into exact Fractions and rounds by comparison, and bit for bit against torch's own
float8/bf16/fp16 casts where the formats coincide."""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import pytest
import torch

from exatrain.config import ConfigError
from exatrain.train.exmy import ExMy, _quantize, quantize, torch_format

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------- independent reference


def decode(code: int, f: ExMy) -> Fraction | float:
    """Value of one encoding under the format's rules (sign | exponent field | mantissa field)."""
    e, m = f.exponent_bits, f.mantissa_bits
    sign, field, mant = code >> (e + m), (code >> m) & (2**e - 1), code & (2**m - 1)
    if f.variant == "ieee" and field == 2**e - 1:
        return NAN if mant else (-INF if sign else INF)
    if f.variant == "fn" and field == 2**e - 1 and mant == 2**m - 1:
        return NAN
    if f.variant == "fnuz" and sign and field == 0 and mant == 0:
        return NAN
    if field == 0:
        value = Fraction(mant, 2**m) * Fraction(2) ** (1 - f.bias)
    else:
        value = (1 + Fraction(mant, 2**m)) * Fraction(2) ** (field - f.bias)
    return -value if sign else value


class Reference:
    """All finite non-negative values of a format (with the parity of their mantissa code), by decoding."""

    def __init__(self, f: ExMy):
        self.f = f
        vals: dict[Fraction, int] = {}
        for code in range(2 ** (f.exponent_bits + f.mantissa_bits)):  # sign bit 0
            v = decode(code, f)
            if isinstance(v, Fraction):
                vals[v] = code & 1 if f.mantissa_bits > 0 else 0
        self.values = sorted(vals)
        self.parity = [vals[v] for v in self.values]
        self.max = self.values[-1]
        smallest_normal = Fraction(2) ** (1 - f.bias)
        self.min_normal = smallest_normal
        # the value after max were the exponent unbounded: max + its spacing; its mantissa parity
        top_ulp = Fraction(2) ** (f.emax - f.mantissa_bits)
        self.successor = self.max + top_ulp
        self.successor_parity = (self.parity[-1] + 1) % 2 if f.mantissa_bits > 0 else 0

    def __call__(self, x: float, u: float = 0.0) -> float:
        f = self.f
        if math.isnan(x):
            return NAN
        if math.isinf(x):
            y = INF if f.variant == "ieee" else (float(self.max) if f.overflow == "saturate" else NAN)
            return math.copysign(y, x)
        ax = Fraction(abs(x))
        if ax > self.max:
            lo, hi, lo_par, hi_par = self.max, self.successor, self.parity[-1], self.successor_parity
            if ax >= self.successor:
                lo = hi = self.successor  # unbounded rounding lands at or beyond the successor
        else:
            i = bisect.bisect_left(self.values, ax)
            if self.values[i] == ax:
                lo = hi = ax
                lo_par = hi_par = 0
            else:
                lo, hi = self.values[i - 1], self.values[i]
                lo_par, hi_par = self.parity[i - 1], self.parity[i]
        if lo == hi or f.rounding == "truncate":
            y = lo
        elif f.rounding == "stochastic":
            y = hi if Fraction(u) < (ax - lo) / (hi - lo) else lo
        else:
            mid = (lo + hi) / 2
            if ax != mid:
                y = lo if ax < mid else hi
            elif f.mantissa_bits == 0:
                y = lo if lo == 0 else hi  # m=0: ties go to the even multiple of lo's spacing (2^k vs 2·2^k)
            else:
                assert lo_par != hi_par
                y = lo if lo_par == 0 else hi
        if y > self.max:  # overflow
            if f.rounding == "truncate" or f.overflow == "saturate":
                y = self.max
            else:
                return math.copysign(INF if f.variant == "ieee" else NAN, x)
        if not f.subnormals and y < self.min_normal:
            y = Fraction(0)
        out = math.copysign(float(y), x)
        if f.variant == "fnuz" and out == 0:
            out = 0.0
        return out


def probe_values(f: ExMy, ref: Reference, n_random: int, seed: int) -> torch.Tensor:
    """Every value of the format (or a sample), the midpoints between neighbours, one fp32 ulp either side of
    each midpoint, values around max and the successor, fp32 subnormals, specials and random fp32 bit patterns."""
    g = torch.Generator().manual_seed(seed)
    vals = ref.values
    if len(vals) > 4000:
        idx = torch.randint(0, len(vals) - 1, (4000,), generator=g).tolist()
    else:
        idx = list(range(len(vals) - 1))
    pts: list[float] = []
    for i in idx:
        lo, hi = vals[i], vals[i + 1]
        mid = float((lo + hi) / 2)
        pts += [float(lo), mid, math.nextafter(mid, 0.0), math.nextafter(mid, INF)]
    big = [ref.max, (ref.max + ref.successor) / 2, ref.successor, ref.successor * 2]
    pts += [float(v) for v in big] + [math.nextafter(float(v), INF) for v in big]
    pts += [math.nextafter(float(v), 0.0) for v in big]
    pts += [0.0, INF, NAN, 2.0**-149, 2.0**-126, 3 * 2.0**-149, 1e-40, 3.4e38, float(ref.min_normal) / 3]
    x = torch.tensor(pts, dtype=torch.float64).float()  # python floats above fp32 range become inf here
    x = torch.cat([x, -x])
    bits = torch.randint(-(2**31), 2**31 - 1, (n_random,), generator=g, dtype=torch.int64).to(torch.int32)
    scaled = torch.randn(n_random, generator=g) * torch.exp2(torch.randint(-30, 30, (n_random,), generator=g).float())
    return torch.cat([x, bits.view(torch.float32), scaled])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


FORMATS = [
    ExMy(4, 3),
    ExMy(4, 3, variant="fn"),
    ExMy(4, 3, variant="fn", overflow="saturate"),
    ExMy(4, 3, variant="fnuz"),
    ExMy(5, 2),
    ExMy(5, 2, variant="fnuz", rounding="truncate"),
    ExMy(8, 3, rounding="truncate"),  # the paper's simulated formats
    ExMy(8, 4),
    ExMy(8, 5, subnormals=False),
    ExMy(8, 0),
    ExMy(3, 2, variant="fn", overflow="saturate"),
    ExMy(2, 1, variant="fn"),
    ExMy(5, 0, variant="fn"),
    ExMy(4, 3, bias=3, subnormals=False, overflow="saturate"),
    ExMy(6, 4, bias=40, rounding="truncate", overflow="saturate", variant="fnuz"),
    ExMy(8, 7),
    ExMy(5, 10, subnormals=False),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.rounding}-{f.overflow}-b{f.bias}"
                         f"{'' if f.subnormals else '-ftz'}")
def test_matches_reference(fmt: ExMy):
    ref = Reference(fmt)
    x = probe_values(fmt, ref, n_random=3000, seed=fmt.exponent_bits * 31 + fmt.mantissa_bits)
    got = quantize(x, fmt)
    want = torch.tensor([ref(v) for v in x.tolist()], dtype=torch.float32)
    bad = ~same_bits(got, want)
    assert not bad.any(), list(zip(x[bad][:8].tolist(), got[bad][:8].tolist(), want[bad][:8].tolist()))


def frexp_reference(x: float, f: ExMy) -> float:
    """For formats too wide to enumerate (ieee, nearest or truncate): the spacing of the binade from math.frexp."""
    if not math.isfinite(x) or x == 0:
        return x
    ax = Fraction(abs(x))
    spacing = Fraction(2) ** (max(math.frexp(abs(x))[1] - 1, f.emin) - f.mantissa_bits)
    n, rest = divmod(ax, spacing)
    if f.rounding == "nearest" and (rest > spacing / 2 or (rest == spacing / 2 and n % 2 == 1)):
        n += 1
    y = n * spacing
    if y > Fraction(f.max_finite):
        y = Fraction(f.max_finite) if f.rounding == "truncate" or f.overflow == "saturate" else INF
    if not f.subnormals and y < Fraction(f.min_normal):
        y = Fraction(0)
    return math.copysign(float(y), x)


@pytest.mark.parametrize("fmt", [ExMy(8, 10), ExMy(8, 16, rounding="truncate"), ExMy(7, 20, subnormals=False),
                                 ExMy(7, 12, bias=100, overflow="saturate")], ids=lambda f: f.name)
def test_wide_formats_match_frexp_reference(fmt: ExMy):
    g = torch.Generator().manual_seed(fmt.mantissa_bits)
    bits = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(4000, generator=g)])
    want = torch.tensor([frexp_reference(v, fmt) for v in x.tolist()], dtype=torch.float32)
    assert same_bits(quantize(x, fmt), want).all()


def test_stochastic_matches_reference_draw_for_draw():
    """Stochastic rounding uses one torch.rand draw per element from the given generator: same seed, same result."""
    for fmt in (ExMy(8, 3, rounding="stochastic"), ExMy(4, 3, variant="fn", rounding="stochastic"),
                ExMy(5, 2, rounding="stochastic", subnormals=False)):
        ref = Reference(fmt)
        x = probe_values(fmt, ref, n_random=2000, seed=3)
        got = quantize(x, fmt, generator=torch.Generator().manual_seed(11))
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(11))
        want = torch.tensor([ref(v, w) for v, w in zip(x.tolist(), u.tolist())], dtype=torch.float32)
        assert same_bits(got, want).all()


def test_stochastic_rounding_is_unbiased():
    fmt = ExMy(8, 3, rounding="stochastic")
    x = torch.tensor([1.0 + 1 / 64, 1.0 + 3 / 32, -(2.0 + 0.1), 3e-39, 0.3])  # off-grid, one fp32-subnormal
    n = 40000
    draws = quantize(x.repeat(n, 1), fmt, generator=torch.Generator().manual_seed(0)).double()
    lo = quantize(x, ExMy(8, 3, rounding="truncate")).double()
    hi = lo + torch.sign(x).double() * (2.0 ** (torch.floor(torch.log2(x.abs().double())).clamp(min=-126) - 3))
    p = ((x.double() - lo) / (hi - lo)).abs()
    sigma = (hi - lo).abs() * (p * (1 - p) / n).sqrt()
    assert ((draws.mean(0) - x.double()).abs() <= 4 * sigma).all(), (draws.mean(0), x)
    assert set(draws[:, 0].unique().tolist()) == {lo[0].item(), hi[0].item()}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz, torch.bfloat16, torch.float16])
def test_bit_exact_with_torch_casts(dtype: torch.dtype):
    fmt = torch_format(dtype)
    x = probe_values(fmt, Reference(fmt), n_random=200000, seed=5)
    assert same_bits(quantize(x, fmt), x.to(dtype).float()).all()


def test_saturating_cast_like_torchao():
    """torchao casts to fp8 by clamping to ±max then casting: the same as overflow='saturate' for finite inputs
    (an ieee format keeps a real ±inf, which the clamp would turn into ±max)."""
    x = probe_values(ExMy(5, 2), Reference(ExMy(5, 2)), n_random=20000, seed=9)
    x = x[x.isfinite()]
    fmt = ExMy(5, 2, overflow="saturate")
    want = x.clamp(-57344.0, 57344.0).to(torch.float8_e5m2).float()
    assert same_bits(quantize(x, fmt), want).all()


def test_edge_cases_by_hand():
    e4m3fn = ExMy(4, 3, variant="fn")
    x = torch.tensor([-0.0, 2.0**-9, 2.0**-10, 3 * 2.0**-10, 448.0, 464.0, 464.5, 480.0, INF, -INF, NAN, 1.0625,
                      1.1875])
    got = quantize(x, e4m3fn).tolist()
    assert math.copysign(1.0, got[0]) == -1.0 and got[0] == 0.0                  # -0 kept
    assert got[1] == 2.0**-9 and got[2] == 0.0 and got[3] == 2.0**-8            # smallest subnormal, ties to even
    assert got[4] == 448.0 and got[5] == 448.0                                  # max, tie to even (1.110b)
    assert all(math.isnan(v) for v in got[6:11])                                # overflow: fn has no inf
    assert got[11] == 1.0 and got[12] == 1.25                                   # ties to even mantissa
    assert quantize(torch.tensor([1e-3]), ExMy(4, 3, subnormals=False)).item() == 0.0
    assert quantize(torch.tensor([-1e-4]), ExMy(4, 3, variant="fnuz")).view(torch.int32).item() == 0  # +0 only
    trunc = ExMy(8, 3, rounding="truncate")
    got = quantize(torch.tensor([1.99, -1.99, 3e38, 3.4e38, INF]), trunc).tolist()
    assert got == [1.875, -1.875, 2.0**127 * 1.75, 2.0**127 * 1.875, INF]  # round toward zero never overflows
    e5m2 = ExMy(5, 2)
    assert quantize(torch.tensor([61440.0, 61439.0]), e5m2).tolist() == [INF, 57344.0]


def test_fp32_format_is_identity():
    x = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    fmt = ExMy(8, 23)
    assert fmt.is_fp32 and quantize(x, fmt) is x
    for rounding in ("nearest", "truncate", "stochastic"):  # the general path agrees
        assert same_bits(_quantize(x, ExMy(8, 23, rounding=rounding), None), x).all()


def test_low_precision_inputs():
    x = torch.randn(1000).bfloat16()
    y = quantize(x, ExMy(8, 3))
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), quantize(x.float(), ExMy(8, 3)))
    with pytest.raises(TypeError):
        quantize(x.double(), ExMy(8, 3))


def test_properties_and_parse():
    assert ExMy.parse("e4m3fn").max_finite == 448.0 and ExMy.parse("E5M2").max_finite == 57344.0
    assert ExMy.parse("e4m3fnuz").max_finite == 240.0 and ExMy.parse("e4m3fnuz").bias == 8
    assert ExMy.parse("bf16") == ExMy(8, 7) and ExMy.parse("tf32") == ExMy(8, 10) and ExMy.parse("fp32").is_fp32
    f = ExMy.parse("e8m3", rounding="truncate")
    assert (f.name, f.emin, f.emax, f.min_subnormal) == ("e8m3", -126, 127, 2.0**-129)
    assert ExMy(4, 3) == ExMy(4, 3, bias=7)


@pytest.mark.parametrize("spec,message", [
    ({"exponent_bits": 9, "mantissa_bits": 3}, "precision.formats.x.exponent_bits: must be in [1, 8]"),
    ({"exponent_bits": 4, "mantissa_bits": 24}, "precision.formats.x.mantissa_bits: must be in [0, 23]"),
    ({"exponent_bits": 4, "mantissa_bits": 3, "rounding": "up"}, "precision.formats.x.rounding: got 'up'"),
    ({"exponent_bits": 4, "mantissa_bits": 3, "overflow": "wrap"}, "precision.formats.x.overflow"),
    ({"exponent_bits": 4, "mantissa_bits": 3, "variant": "fnu"}, "precision.formats.x.variant"),
    ({"exponent_bits": 8, "mantissa_bits": 3, "bias": 100}, "precision.formats.x.bias: 100 puts the largest"),
    ({"exponent_bits": 8, "mantissa_bits": 3, "bias": 148}, "precision.formats.x.bias: 148 puts the smallest normal"),
    ({"exponent_bits": 1, "mantissa_bits": 3}, "has no normal numbers"),
    ({"exponent_bits": 4, "mantissa_bits": 3, "bias": 1.5}, "precision.formats.x.bias: must be an integer"),
    ({"exponent_bits": 4, "mantissa_bits": 3, "subnormal": True}, "unknown field(s) subnormal"),
])
def test_validation_names_the_key(spec, message):
    with pytest.raises(ConfigError, match=None) as err:
        ExMy.from_dict(spec, "precision.formats.x")
    assert message in str(err.value)


def test_parse_errors():
    with pytest.raises(ConfigError, match="precision.simulated.input: cannot parse format 'fp8'"):
        ExMy.parse("fp8", "precision.simulated.input")
    with pytest.raises(ConfigError, match=r"ExMy.exponent_bits"):
        ExMy(0, 3)
