"""LeakyReLU and the gradient masks of ReLU and LeakyReLU as device functions and elementwise
kernels (numerics §9). The convolutions fuse the same rules into their generated epilogues."""
import numpy as np
from numba import cuda, float32

from ..contract import DEFAULT_LEAKY_SLOPE, leaky_slope as slope_f32, same_shape
from .arrays import Operand, launch_stream, output, placeholder, result

NO_MASK, RELU_MASK, LEAKY_MASK = 0, 1, 2
THREADS = 256


@cuda.jit(device=True)
def masked(g, y, mode, slope):
    """§9b: g where y > 0; elsewhere +0 (RELU_MASK) or slope * g (LEAKY_MASK); g (NO_MASK).
    (pool.py and upsample.py call it: numba's on-disk cache keys their kernels on their own
    files, so after editing this function, clear the cache or touch those files.)"""
    if mode == NO_MASK or y > float32(0):
        return g
    if mode == RELU_MASK:
        return float32(0)
    return slope * g


class Mask:
    """The optional mask argument of a backward operation, as its kernels take it: the stored
    activation output (or a placeholder), the mode and the float32 slope."""

    def __init__(self, relu_output, leaky_slope, shape):
        if relu_output is None:
            if leaky_slope is not None:
                raise ValueError("leaky_slope needs relu_output, the activation's stored output")
            self.device, self.mode, self.slope = placeholder(1), NO_MASK, float32(0)
            return
        op = same_shape("relu_output", Operand("relu_output", relu_output, 4), shape)
        self.device = op.device.reshape(op.device.size)
        self.mode = RELU_MASK if leaky_slope is None else LEAKY_MASK
        self.slope = float32(0) if leaky_slope is None else slope_f32(leaky_slope)

    def args(self):
        return self.device, self.mode, self.slope


def blocks(size):
    return -(-size // THREADS)


@cuda.jit(cache=True)
def _leaky_kernel(x, y, slope):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        y[i] = v if v > float32(0) else slope * v


@cuda.jit(cache=True)
def _mask_kernel(gy, y, gx, mode, slope):
    i = cuda.grid(1)
    if i < gy.size:
        gx[i] = masked(gy[i], y[i], mode, slope)


def leaky_relu(x, slope=DEFAULT_LEAKY_SLOPE, out=None):
    """x if x > 0 else slope * x (numerics §9a)."""
    s = slope_f32(slope)
    x = Operand("x", x, 4)
    out_op, y = output("out", out, x.shape, x)
    size = int(np.prod(x.shape))
    if size:
        _leaky_kernel[blocks(size), THREADS, launch_stream()](
            x.device.reshape(size), y.reshape(size), s)
    return result(out_op, y, x)


def leaky_relu_backward(gy, y, slope=DEFAULT_LEAKY_SLOPE, out=None):
    """gy where y > 0, else slope * gy (numerics §9a); out may be gy or y."""
    s = slope_f32(slope)
    gy = Operand("gy", gy, 4)
    mask = Mask(y, s, gy.shape)
    out_op, gx = output("out", out, gy.shape, gy)
    size = int(np.prod(gy.shape))
    if size:
        _mask_kernel[blocks(size), THREADS, launch_stream()](
            gy.device.reshape(size), mask.device, gx.reshape(size), mask.mode, mask.slope)
    return result(out_op, gx, gy)
