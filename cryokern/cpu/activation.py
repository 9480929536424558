"""LeakyReLU and the gradient masks of ReLU and LeakyReLU, compiled for the CPU (numerics §9).

The convolutions, the pooling and the upsampling apply the same rules through activated() and
masked(), inlined into their loops. numba's on-disk cache keys a compiled function on its own
file only: after editing this file, clear the cache (or touch conv.py, pool.py, upsample.py).
"""
import numpy as np
from numba import njit, prange

from ..contract import DEFAULT_LEAKY_SLOPE, leaky_slope as slope_f32, same_shape
from .arrays import Output, operand

ZERO = np.float32(0)
PLAIN, RELU, LEAKY = 0, 1, 2          # no activation / mask, ReLU's, LeakyReLU's


@njit(cache=True, inline="always")
def activated(v, act, slope):
    """v (PLAIN); +0 where v <= 0, so NaN stays and -0 becomes +0 (RELU); slope * v where
    not v > 0, so -0 stays -0 and NaN stays NaN (LEAKY)."""
    if act == RELU:
        return ZERO if v <= ZERO else v
    if act == LEAKY:
        return v if v > ZERO else slope * v
    return v


@njit(cache=True, inline="always")
def masked(g, y, act, slope):
    """g where the activation's output y > 0 (or PLAIN: no mask); else +0 (RELU) or slope * g
    (LEAKY): a NaN output takes the else."""
    if act == PLAIN or y > ZERO:
        return g
    if act == RELU:
        return ZERO
    return slope * g


def mask_args(relu_output, leaky_slope, shape):
    """(mask array or None, act, float32 slope) of a backward operation's optional mask."""
    if relu_output is None:
        if leaky_slope is not None:
            raise ValueError("leaky_slope needs relu_output, the activation's stored output")
        return None, PLAIN, ZERO
    m = same_shape("relu_output", operand("relu_output", relu_output, 4), shape)
    if leaky_slope is None:
        return m, RELU, ZERO
    return m, LEAKY, slope_f32(leaky_slope)


@njit(parallel=True, cache=True)
def _leaky(x, slope, y):
    for i in prange(x.size):
        y[i] = activated(x[i], LEAKY, slope)


@njit(parallel=True, cache=True)
def mask_elements(gy, y, act, slope, gx):
    for i in prange(gy.size):
        gx[i] = masked(gy[i], y[i], act, slope)


def leaky_relu(x, slope=DEFAULT_LEAKY_SLOPE, out=None):
    """x if x > 0 else slope * x, elementwise (numerics §9a); out may be x."""
    s = slope_f32(slope)
    x = operand("x", x, 4)
    dst = Output(out, x.shape)        # elementwise: each element read, then written
    _leaky(x.reshape(-1), s, dst.array.reshape(-1))
    return dst.done()


def leaky_relu_backward(gy, y, slope=DEFAULT_LEAKY_SLOPE, out=None):
    """gy where the forward output y > 0, else slope * gy (numerics §9a); out may be gy or y."""
    gy = operand("gy", gy, 4)
    m, act, s = mask_args(y, slope, gy.shape)
    dst = Output(out, gy.shape)
    mask_elements(gy.reshape(-1), m.reshape(-1), act, s, dst.array.reshape(-1))
    return dst.done()
