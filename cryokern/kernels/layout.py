"""Copies that fit images to the U-Net's pooling grid (numerics §13): zero padding and the crop
back, one kernel that places a window of one array into another; and the residual's
elementwise sum (§12)."""
import numpy as np
from numba import cuda, float32

from ..contract import same_shape
from .activation import THREADS, blocks
from .arrays import Operand, launch_stream, output, result


@cuda.jit(cache=True)
def _place(src, dst, src_h, src_w, dst_h, dst_w, count):
    """dst[p, h, w] = src[p, h, w] over planes p, or +0 where (h, w) is outside src (zero
    padding); one thread per element written."""
    i = cuda.grid(1)
    if i < count:
        w = i % dst_w
        t = i // dst_w
        h = t % dst_h
        p = t // dst_h
        v = float32(0)
        if h < src_h and w < src_w:
            v = src[(p * src_h + h) * src_w + w]
        dst[i] = v


def _place_all(src, dst):
    """Launch _place for device arrays src and dst (N, C, H, W) of the same N and C."""
    count = dst.size
    if count:
        _place[blocks(count), THREADS, launch_stream()](
            src.reshape(src.size), dst.reshape(count), src.shape[2], src.shape[3],
            dst.shape[2], dst.shape[3], count)


def pad_zeros(x, height, width, out=None):
    """x at the top left of a (N, C, height, width) array of +0."""
    x = Operand("x", x, 4)
    n, c, h, w = x.shape
    if height < h or width < w:
        raise ValueError(f"cannot pad {h} x {w} to {height} x {width}")
    out_op, y = output("out", out, (n, c, height, width), x)
    _place_all(x.device, y)
    return result(out_op, y, x)


def crop(x, height, width, out=None):
    """The top-left height x width pixels of x, copied."""
    x = Operand("x", x, 4)
    n, c, h, w = x.shape
    if height > h or width > w:
        raise ValueError(f"cannot crop {h} x {w} to {height} x {width}")
    out_op, y = output("out", out, (n, c, height, width), x)
    _place_all(x.device, y)
    return result(out_op, y, x)


@cuda.jit(cache=True)
def _add(a, b, c):
    i = cuda.grid(1)
    if i < a.size:
        c[i] = a[i] + b[i]


def add(a, b, out=None):
    """a + b, one float32 addition per element (numerics §12); out may be a or b."""
    a = Operand("a", a, 4)
    b = same_shape("b", Operand("b", b, 4), a.shape)
    out_op, y = output("out", out, a.shape, a)
    size = int(np.prod(a.shape))
    if size:
        _add[blocks(size), THREADS, launch_stream()](
            a.device.reshape(size), b.device.reshape(size), y.reshape(size))
    return result(out_op, y, a)
