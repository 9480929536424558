"""fma32 against exact rational arithmetic: random values, constructed ties, subnormals, specials."""
import math
from fractions import Fraction

import numpy as np
import pytest

from cryokern.reference import fma32

F32_MAX = Fraction(float(np.finfo(np.float32).max))


def round_to_float32(x: Fraction, zero_sign: float) -> np.float32:
    """Round an exact rational to the nearest float32, ties to even (IEEE round-to-nearest)."""
    if x == 0:
        return np.float32(math.copysign(0.0, zero_sign))
    sign = -1 if x < 0 else 1
    mag = abs(x)
    exp = mag.numerator.bit_length() - mag.denominator.bit_length()
    if Fraction(2) ** exp > mag:
        exp -= 1
    quantum = Fraction(2) ** (max(exp, -126) - 23)
    q, rem = divmod(mag, quantum)
    if rem * 2 > quantum or (rem * 2 == quantum and q % 2 == 1):
        q += 1
    result = q * quantum
    if result > F32_MAX:
        return np.float32(sign * np.inf)
    return np.float32(sign * float(result))


def exact_fma(a, b, c) -> np.float32:
    a, b, c = (np.float32(v) for v in (a, b, c))
    x = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if x == 0:
        product_negative = math.copysign(1, a) * math.copysign(1, b) < 0
        both_negative_zero = product_negative and math.copysign(1, c) < 0 and (a == 0 or b == 0)
        return np.float32(-0.0 if both_negative_zero else 0.0) if c == 0 or a * b == 0 \
            else np.float32(0.0)
    return round_to_float32(x, 1.0)


def assert_bits_equal(got, want):
    got = np.asarray(got, np.float32).reshape(-1)
    want = np.asarray(want, np.float32).reshape(-1)
    bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, f"{bad.size} mismatches, first at {bad[0]}: {got[bad[0]]!r} != {want[bad[0]]!r}"


def random_float32(rng, n, exp_lo, exp_hi):
    mant = rng.uniform(1, 2, n)
    return (rng.choice([-1, 1], n) * mant * 2.0 ** rng.integers(exp_lo, exp_hi, n)).astype(np.float32)


def test_random_normal_range():
    rng = np.random.default_rng(1)
    a, b, c = (random_float32(rng, 3000, -20, 20) for _ in range(3))
    assert_bits_equal(fma32(a, b, c), [exact_fma(*t) for t in zip(a, b, c)])


def test_random_with_cancellation():
    rng = np.random.default_rng(2)
    a, b = (random_float32(rng, 3000, -4, 4) for _ in range(2))
    c = (-(a.astype(np.float64) * b) * (1 + rng.normal(0, 1e-6, 3000))).astype(np.float32)
    assert_bits_equal(fma32(a, b, c), [exact_fma(*t) for t in zip(a, b, c)])


def test_constructed_double_rounding_tie():
    # a*b = 2**-24 * (1 - 2**-46): the float64 sum lands on the float32 midpoint above c, and
    # ties-to-even would round up; the exact value lies below the midpoint, so c is right.
    a = np.float32(1 + 2 ** -23)
    b = np.float32(2 ** -24 * (1 - 2 ** -23))
    c = np.float32(1 + 2 ** -23)
    naive = np.float32(float(a) * float(b) + float(c))
    assert naive != c  # the trap is real
    assert fma32(a, b, c) == c == exact_fma(a, b, c)


def test_random_ties():
    """Products within 2**-29 relative of half an ulp of c: the float64 sum hits the midpoint."""
    rng = np.random.default_rng(3)
    n = 4000
    c = random_float32(rng, n, -30, 30)
    ulp = np.spacing(np.abs(c)).astype(np.float64)
    k = rng.integers(1, 300, n).astype(np.float64)
    t = k * 2.0 ** -23
    a = ((1 + t) * rng.choice([-1, 1], n)).astype(np.float32)
    b = ((1 - t) * ulp / 2).astype(np.float32)
    got = fma32(a, b, c)
    want = [exact_fma(*v) for v in zip(a, b, c)]
    assert_bits_equal(got, want)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert np.count_nonzero(naive != np.asarray(want)) > n // 10  # most cases trap double rounding


def test_subnormal_results_and_operands():
    rng = np.random.default_rng(4)
    a = random_float32(rng, 3000, -80, -60)
    b = random_float32(rng, 3000, -80, -60)
    c = np.concatenate([random_float32(rng, 1500, -149, -126),
                        (rng.integers(-2 ** 23, 2 ** 23, 1500) * 2.0 ** -149).astype(np.float32)])
    assert_bits_equal(fma32(a, b, c), [exact_fma(*t) for t in zip(a, b, c)])


def test_subnormal_ties():
    # c on the subnormal grid, a*b just under half its spacing 2**-149: double rounding trap
    k = np.arange(1, 200, dtype=np.float64)
    a = (1 + k * 2.0 ** -23).astype(np.float32)
    b = np.full(k.size, (1 - 2.0 ** -23) * 2.0 ** -150, np.float32)
    c = (np.arange(1, 200) * 2.0 ** -149).astype(np.float32)
    assert_bits_equal(fma32(a, b, c), [exact_fma(*t) for t in zip(a, b, c)])


def test_overflow_boundary():
    big = np.float32(np.finfo(np.float32).max)
    half_ulp = np.float32(2.0 ** 103)
    cases = [(big, 1, half_ulp), (big, 1, np.float32(2.0 ** 103 * (1 - 2 ** -23))),
             (big, 2, -big), (big, big, 0), (-big, 2, big)]
    for a, b, c in cases:
        assert_bits_equal(fma32(a, b, c), exact_fma(a, b, c))


def test_signed_zeros():
    z, nz = np.float32(0.0), np.float32(-0.0)
    cases = [(z, 1, z, 0.0), (nz, 1, nz, -0.0), (z, -1, nz, -0.0), (nz, 1, z, 0.0),
             (1, 1, -1, 0.0), (np.float32(2 ** -100), np.float32(-2 ** -100), nz, -0.0),
             (np.float32(2 ** -100), np.float32(-2 ** -100), z, -0.0)]
    for a, b, c, want in cases:
        got = fma32(a, b, c)
        assert got == 0 and math.copysign(1, got) == math.copysign(1, want), (a, b, c, got)


@pytest.mark.parametrize("a,b,c,want", [
    (np.inf, 1, 1, np.inf), (np.inf, -1, 1, -np.inf), (np.inf, 0, 1, np.nan),
    (np.inf, 1, -np.inf, np.nan), (1, 1, np.inf, np.inf), (np.nan, 1, 1, np.nan),
    (1, 1, np.nan, np.nan), (0, np.nan, 0, np.nan),
])
def test_inf_and_nan(a, b, c, want):
    with np.errstate(invalid="ignore"):
        got = fma32(a, b, c)
    if np.isnan(want):
        assert np.isnan(got)
    else:
        assert got == want


def test_broadcasting_and_dtype():
    out = fma32(np.ones((2, 1), np.float32), np.arange(3, dtype=np.float32), 0.5)
    assert out.shape == (2, 3) and out.dtype == np.float32
    assert isinstance(fma32(1, 2, 3), np.float32)
