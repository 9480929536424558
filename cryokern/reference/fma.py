"""Correctly rounded float32 fused multiply-add in NumPy, as the GPU's fma.rn.f32 computes it.

Why it is exact: a float32 x float32 product has at most 48 significant bits, so it is exact in
float64. The float64 sum s = p + c is rounded once; converting s to float32 then rounds a second
time, which differs from a single rounding only when s lands exactly on a float32 midpoint (or
in the float32 subnormal range, where midpoints have other bit patterns). Those rare elements are
recomputed with the float64 rounding error of the sum (TwoSum) and rounded to odd: a float64
rounded to odd, then rounded to float32, is the correctly rounded float32 (53 >= 24 + 2 bits).
"""
import numpy as np

_LOW29 = np.int64((1 << 29) - 1)            # float64 mantissa bits below float32 precision
_MIDPOINT = np.int64(1 << 28)               # pattern of a float32 midpoint in those bits
_EXP_MASK = np.int64(0x7FF0000000000000)
_SMALLEST_NORMAL32 = np.int64(0x3810000000000000)   # bits of 2**-126 as float64


_CHUNK = 1 << 16   # elements per pass: keeps the float64 temporaries in cache (about 3x faster)


def fma32(a, b, c):
    """Elementwise float32 fma(a, b, c) = round32(a*b + c), with one rounding; broadcasts."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    c = np.asarray(c, np.float32)
    out = np.empty(np.broadcast_shapes(a.shape, b.shape, c.shape), np.float32)
    _fma_into(out, a, b, c)
    return out[()] if out.ndim == 0 else out


def _fma_into(out, a, b, c):
    """Fill out with fma32(a, b, c), splitting along leading axes into cache-sized pieces."""
    if out.size <= _CHUNK or out.ndim == 0:
        out[...] = _fma_block(a, b, c, out.shape)
        return
    rows = out.shape[0]
    step = max(1, _CHUNK // (out.size // rows))
    for start in range(0, rows, step):
        index = start if step == 1 else slice(start, start + step)
        pieces = [x[index] if x.ndim == out.ndim and x.shape[0] > 1
                  else (x[0] if x.ndim == out.ndim and step == 1 else x) for x in (a, b, c)]
        _fma_into(out[index], *pieces)


@np.errstate(over="ignore", invalid="ignore")   # inf and NaN results are legitimate
def _fma_block(a, b, c, shape):
    s = np.empty(shape, np.float64)
    np.multiply(a, b, out=s, dtype=np.float64)
    np.add(s, c, out=s, dtype=np.float64)
    bits = s.view(np.int64)
    suspect = (bits & _LOW29) == _MIDPOINT
    suspect |= (bits & _EXP_MASK) < _SMALLEST_NORMAL32
    if suspect.any():
        _round_to_odd(s, suspect, a, b, c)
    return s.astype(np.float32)


def _round_to_odd(s, mask, a, b, c):
    """Replace s[mask] by a*b+c rounded to odd in float64 (exact sum error from TwoSum)."""
    shape = s.shape
    p = np.broadcast_to(a, shape)[mask].astype(np.float64) * np.broadcast_to(b, shape)[mask]
    cm = np.broadcast_to(c, shape)[mask].astype(np.float64)
    sm = s[mask]
    with np.errstate(invalid="ignore"):
        bv = sm - p
        err = (p - (sm - bv)) + (cm - bv)
        inexact = np.isfinite(sm) & (err != 0)
    smb = sm.view(np.int64)
    fix = inexact & ((smb & 1) == 0)
    away_from_zero = (err > 0) == (sm > 0)
    smb[fix] += np.where(away_from_zero[fix], 1, -1)
    s[mask] = sm
