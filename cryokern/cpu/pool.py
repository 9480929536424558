"""2x2 max-pooling, stride 2, compiled for the CPU (numerics §10): rows of windows on the
cores. The backward pass recomputes each window's selection from x (nothing is stored) and
reads a whole window before writing it, so `out` may be `add`, `relu_output` or x itself."""
from numba import njit, prange

from ..contract import halved_shape, same_shape
from .activation import ZERO, mask_args, masked
from .arrays import Output, operand, same_elements


@njit(cache=True, inline="always")
def _selected(v0, v1, v2, v3):
    """0..3: the window's first NaN in row-major order, else its first maximum (a later
    element replaces the choice only when strictly greater, so -0 and +0 tie)."""
    k = 0
    best = v0
    if best == best and (v1 != v1 or v1 > best):
        k = 1
        best = v1
    if best == best and (v2 != v2 or v2 > best):
        k = 2
        best = v2
    if best == best and (v3 != v3 or v3 > best):
        k = 3
    return k


@njit(parallel=True, cache=True)
def _forward(x, y):
    planes, half_h, half_w = y.shape
    for job in prange(planes * half_h):
        p = job // half_h
        i = job - p * half_h
        top, bottom = x[p, 2 * i], x[p, 2 * i + 1]
        for j in range(half_w):
            v0, v1, v2, v3 = top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]
            k = _selected(v0, v1, v2, v3)
            y[p, i, j] = v0 if k == 0 else v1 if k == 1 else v2 if k == 2 else v3


@njit(cache=True, inline="always")
def _element(g, chosen, add, mask, act, slope, p, r, c):
    """One element's gradient: g if chosen else +0, `add` first (§10), then the mask (§9b)."""
    v = g if chosen else ZERO
    if add is not None:
        v = add[p, r, c] + v
    if mask is not None:
        v = masked(v, mask[p, r, c], act, slope)
    return v


@njit(parallel=True, cache=True)
def _backward(gy, x, add, mask, act, slope, gx):
    planes, half_h, half_w = gy.shape
    for job in prange(planes * half_h):
        p = job // half_h
        i = job - p * half_h
        r0, r1 = 2 * i, 2 * i + 1
        for j in range(half_w):
            c0, c1 = 2 * j, 2 * j + 1
            k = _selected(x[p, r0, c0], x[p, r0, c1], x[p, r1, c0], x[p, r1, c1])
            g = gy[p, i, j]
            g0 = _element(g, k == 0, add, mask, act, slope, p, r0, c0)
            g1 = _element(g, k == 1, add, mask, act, slope, p, r0, c1)
            g2 = _element(g, k == 2, add, mask, act, slope, p, r1, c0)
            g3 = _element(g, k == 3, add, mask, act, slope, p, r1, c1)
            gx[p, r0, c0] = g0
            gx[p, r0, c1] = g1
            gx[p, r1, c0] = g2
            gx[p, r1, c1] = g3


def _planes(a):
    n, c, h, w = a.shape
    return a.reshape(n * c, h, w)


def maxpool2x2_forward(x, out=None):
    """y = each 2x2 window's selected element, copied: its first NaN, else its first maximum."""
    x = operand("x", x, 4)
    shape = halved_shape(x.shape)
    dst = Output(out, shape, inputs=(x,))
    _forward(_planes(x), _planes(dst.array))
    return dst.done()


def maxpool2x2_backward(gy, x, out=None, add=None, relu_output=None, leaky_slope=None):
    """gy routed to each window's selected element (+0 to the others), added to `add` (add
    first), then masked by relu_output (numerics §10, §9b)."""
    gy, x = operand("gy", gy, 4), operand("x", x, 4)
    shape = halved_shape(x.shape)
    same_shape("gy", gy, shape)
    if add is not None:
        add = same_shape("add", operand("add", add, 4), x.shape)
    mask, act, slope = mask_args(relu_output, leaky_slope, x.shape)
    window_local = [a for a in (x, add, mask) if a is not None]
    inputs = [gy] + [a for a in window_local if not same_elements(out, a)]
    dst = Output(out, x.shape, inputs=inputs)
    _backward(_planes(gy), _planes(x), None if add is None else _planes(add),
              None if mask is None else _planes(mask), act, slope, _planes(dst.array))
    return dst.done()
