"""x2 nearest-neighbour upsampling and its gradient, compiled for the CPU (numerics §11): rows
on the cores."""
from numba import njit, prange

from ..contract import halved_shape
from .activation import ZERO, mask_args, masked
from .arrays import Output, operand, same_elements


@njit(parallel=True, cache=True)
def _forward(x, y):
    planes, h, w = x.shape
    for job in prange(planes * h):
        p = job // h
        i = job - p * h
        for j in range(w):
            v = x[p, i, j]
            y[p, 2 * i, 2 * j] = v
            y[p, 2 * i, 2 * j + 1] = v
            y[p, 2 * i + 1, 2 * j] = v
            y[p, 2 * i + 1, 2 * j + 1] = v


@njit(parallel=True, cache=True)
def _backward(gy, mask, act, slope, gx):
    planes, h, w = gx.shape
    for job in prange(planes * h):
        p = job // h
        i = job - p * h
        top, bottom = gy[p, 2 * i], gy[p, 2 * i + 1]
        for j in range(w):
            g = ((top[2 * j] + top[2 * j + 1]) + bottom[2 * j]) + bottom[2 * j + 1]
            m = ZERO if mask is None else mask[p, i, j]
            gx[p, i, j] = masked(g, m, act, slope)


def _planes(a):
    n, c, h, w = a.shape
    return a.reshape(n * c, h, w)


def upsample2x_forward(x, out=None):
    """y[n,c,2i+a,2j+b] = x[n,c,i,j], a and b in {0, 1}."""
    x = operand("x", x, 4)
    n, c, h, w = x.shape
    dst = Output(out, (n, c, 2 * h, 2 * w), inputs=(x,))
    _forward(_planes(x), _planes(dst.array))
    return dst.done()


def upsample2x_backward(gy, out=None, relu_output=None, leaky_slope=None):
    """gx[i,j] = ((gy[2i,2j] + gy[2i,2j+1]) + gy[2i+1,2j]) + gy[2i+1,2j+1] in float32 (from the
    first term, not from +0), then the optional mask of relu_output (numerics §11, §9b); `out`
    may be relu_output itself."""
    gy = operand("gy", gy, 4)
    shape = halved_shape(gy.shape, "the gradient of a x2 upsampling")
    mask, act, slope = mask_args(relu_output, leaky_slope, shape)
    inputs = (gy,) if mask is None or same_elements(out, mask) else (gy, mask)
    dst = Output(out, shape, inputs=inputs)
    _backward(_planes(gy), None if mask is None else _planes(mask), act, slope,
              _planes(dst.array))
    return dst.done()
