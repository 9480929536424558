"""2x2 max-pooling, stride 2 (numerics §10): one thread per window, forward and backward. The
backward pass recomputes each window's selection from x (nothing is stored) and reads and
writes only its own window, so `out` may alias `add`, `relu_output` or x."""
import numpy as np
from numba import cuda, float32

from ..contract import halved_shape, same_shape
from .activation import NO_MASK, THREADS, Mask, blocks, masked
from .arrays import Operand, launch_stream, output, placeholder, result


@cuda.jit(device=True)
def selected(v0, v1, v2, v3):
    """0..3: the window's first NaN in row-major order, else its first maximum."""
    k = 0
    best = v0
    if best == best:
        if v1 != v1 or v1 > best:
            k = 1
            best = v1
    if best == best:
        if v2 != v2 or v2 > best:
            k = 2
            best = v2
    if best == best:
        if v3 != v3 or v3 > best:
            k = 3
    return k


@cuda.jit(cache=True)
def _forward(x, y, half_w, width, count):
    i = cuda.grid(1)
    if i < count:
        row = i // half_w                       # over all planes: (n * C + c) * H/2 + r
        e = (2 * row) * width + 2 * (i - row * half_w)
        v0, v1, v2, v3 = x[e], x[e + 1], x[e + width], x[e + width + 1]
        k = selected(v0, v1, v2, v3)
        if k == 0:
            y[i] = v0
        elif k == 1:
            y[i] = v1
        elif k == 2:
            y[i] = v2
        else:
            y[i] = v3


@cuda.jit(device=True)
def _element(g, e, a, has_add, m, mode, slope):
    """One element's gradient: add first, then the mask (§10, §9b)."""
    if has_add:
        g = a[e] + g
    if mode != NO_MASK:
        g = masked(g, m[e], mode, slope)
    return g


@cuda.jit(cache=True)
def _backward(gy, x, a, has_add, m, mode, slope, gx, half_w, width, count):
    i = cuda.grid(1)
    if i < count:
        row = i // half_w
        e = (2 * row) * width + 2 * (i - row * half_w)
        k = selected(x[e], x[e + 1], x[e + width], x[e + width + 1])
        g = gy[i]
        z = float32(0)
        g0 = _element(g if k == 0 else z, e, a, has_add, m, mode, slope)
        g1 = _element(g if k == 1 else z, e + 1, a, has_add, m, mode, slope)
        g2 = _element(g if k == 2 else z, e + width, a, has_add, m, mode, slope)
        g3 = _element(g if k == 3 else z, e + width + 1, a, has_add, m, mode, slope)
        gx[e] = g0
        gx[e + 1] = g1
        gx[e + width] = g2
        gx[e + width + 1] = g3


def maxpool2x2_forward(x, out=None):
    """y = each 2x2 window's selected element: its first NaN, else its first maximum."""
    x = Operand("x", x, 4)
    shape = halved_shape(x.shape)
    out_op, y = output("out", out, shape, x)
    count = int(np.prod(shape))
    if count:
        _forward[blocks(count), THREADS, launch_stream()](
            x.device.reshape(x.device.size), y.reshape(count), shape[3], x.shape[3], count)
    return result(out_op, y, x)


def maxpool2x2_backward(gy, x, out=None, add=None, relu_output=None, leaky_slope=None):
    """gy routed to each window's selected element (+0 to the others), added to `add` (add
    first), then masked by relu_output (numerics §10, §9b)."""
    gy, x = Operand("gy", gy, 4), Operand("x", x, 4)
    shape = halved_shape(x.shape)
    same_shape("gy", gy, shape)
    if add is not None:
        add = same_shape("add", Operand("add", add, 4), x.shape)
    mask = Mask(relu_output, leaky_slope, x.shape)
    out_op, gx = output("out", out, x.shape, gy)
    count = int(np.prod(shape))
    if count:
        _backward[blocks(count), THREADS, launch_stream()](
            gy.device.reshape(count), x.device.reshape(x.device.size),
            placeholder(1) if add is None else add.device.reshape(add.device.size),
            add is not None, *mask.args(), gx.reshape(gx.size), shape[3], x.shape[3], count)
    return result(out_op, gx, gy)
