"""The simulator's scalar fma stand-in equals fma32 (including the double-rounding traps)."""
import numpy as np

from conftest import _exact_scalar_fma
from cryokern.reference import fma32


def test_scalar_stand_in_matches_fma32(rng):
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = rng.standard_normal(2000).astype(np.float32)
    t = np.float32(1 + 2 ** -23)
    a = np.append(a, [t, np.float32(1e-30)])
    b = np.append(b, [np.float32(2 ** -24 * (1 - 2 ** -23)), np.float32(1e-10)])
    c = np.append(c, [t, np.float32(0)])
    got = np.array([_exact_scalar_fma(*v) for v in zip(a, b, c)], np.float32)
    assert np.array_equal(got.view(np.uint32), fma32(a, b, c).view(np.uint32))


def test_scalar_stand_in_signs_exact_zeros_as_fma32():
    """Zero sums, which the stand-in rounds itself: every sign of a zero product and addend,
    and a product that cancels the addend."""
    z = [np.float32(0), np.float32(-0.0), np.float32(1.5)]
    cases = [(a, b, c) for a in z for b in z[:2] for c in z[:2]] + \
        [(np.float32(3), np.float32(0.5), np.float32(-1.5)),
         (np.float32(-3), np.float32(0.5), np.float32(1.5))]
    got = np.array([_exact_scalar_fma(*v) for v in cases], np.float32)
    want = fma32(*(np.array(v, np.float32) for v in zip(*cases)))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
