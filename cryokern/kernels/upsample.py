"""x2 nearest-neighbour upsampling (numerics §11): forward, one thread per output element;
backward, one thread per input element summing its four in a fixed order. Each backward
thread reads its own mask element before writing it, so `out` may be `relu_output`."""
import numpy as np
from numba import cuda

from ..contract import halved_shape
from .activation import NO_MASK, THREADS, Mask, blocks, masked
from .arrays import Operand, launch_stream, output, result


@cuda.jit(cache=True)
def _forward(x, y, width, count):
    i = cuda.grid(1)
    if i < count:
        row = i // (2 * width)                  # output row over all planes
        y[i] = x[(row // 2) * width + (i - row * 2 * width) // 2]


@cuda.jit(cache=True)
def _backward(gy, m, mode, slope, gx, width, count):
    i = cuda.grid(1)
    if i < count:
        row = i // width
        e = (2 * row) * (2 * width) + 2 * (i - row * width)
        g = ((gy[e] + gy[e + 1]) + gy[e + 2 * width]) + gy[e + 2 * width + 1]
        if mode != NO_MASK:
            g = masked(g, m[i], mode, slope)
        gx[i] = g


def upsample2x_forward(x, out=None):
    """y[n,c,2i+a,2j+b] = x[n,c,i,j]."""
    x = Operand("x", x, 4)
    n, c, h, w = x.shape
    out_op, y = output("out", out, (n, c, 2 * h, 2 * w), x)
    count = 4 * int(np.prod(x.shape))
    if count:
        _forward[blocks(count), THREADS, launch_stream()](
            x.device.reshape(x.device.size), y.reshape(count), w, count)
    return result(out_op, y, x)


def upsample2x_backward(gy, out=None, relu_output=None, leaky_slope=None):
    """gx = ((g00 + g01) + g10) + g11 of each 2x2 block of gy, then the mask (§11, §9b)."""
    gy = Operand("gy", gy, 4)
    shape = halved_shape(gy.shape, "the gradient of a x2 upsampling")
    mask = Mask(relu_output, leaky_slope, shape)
    out_op, gx = output("out", out, shape, gy)
    count = int(np.prod(shape))
    if count:
        _backward[blocks(count), THREADS, launch_stream()](
            gy.device.reshape(gy.device.size), *mask.args(), gx.reshape(count), shape[3], count)
    return result(out_op, gx, gy)
