"""Copies that arrange the U-Net's activations (numerics §12, §13): channel concatenation and
its split, zero padding and the crop back, all one kernel that places a window of one array's
channels into another's; and the residual's elementwise sum."""
import numpy as np
from numba import cuda, float32

from .activation import THREADS, blocks
from .arrays import Operand, launch_stream, output, result


@cuda.jit(cache=True)
def _place(src, dst, src_channels, src_h, src_w, src_c0, dst_channels, dst_h, dst_w, dst_c0,
           channels, count):
    """dst[n, dst_c0 + c, h, w] = src[n, src_c0 + c, h, w] for c < channels, or +0 where
    (h, w) is outside src (zero padding); one thread per element written."""
    i = cuda.grid(1)
    if i < count:
        w = i % dst_w
        t = i // dst_w
        h = t % dst_h
        t = t // dst_h
        c = t % channels
        n = t // channels
        v = float32(0)
        if h < src_h and w < src_w:
            v = src[((n * src_channels + src_c0 + c) * src_h + h) * src_w + w]
        dst[((n * dst_channels + dst_c0 + c) * dst_h + h) * dst_w + w] = v


def _place_all(src, dst, src_c0, dst_c0, channels):
    """Launch _place for device arrays src and dst (N, C, H, W): channels of src from src_c0
    into dst from dst_c0, dst's whole image size."""
    n, cs, hs, ws = src.shape
    _, cd, hd, wd = dst.shape
    count = n * channels * hd * wd
    if count:
        _place[blocks(count), THREADS, launch_stream()](
            src.reshape(src.size), dst.reshape(dst.size), cs, hs, ws, src_c0, cd, hd, wd, dst_c0,
            channels, count)


def concat_channels(a, b, out=None):
    """(N, Ca + Cb, H, W): a's channels, then b's (copies)."""
    a, b = Operand("a", a, 4), Operand("b", b, 4)
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a {a.shape} and b {b.shape} differ in batch or image size")
    ca = a.shape[1]
    out_op, y = output("out", out, (a.shape[0], ca + b.shape[1]) + a.shape[2:], a)
    _place_all(a.device, y, 0, 0, ca)
    _place_all(b.device, y, 0, ca, b.shape[1])
    return result(out_op, y, a)


def split_channels(g, channels, out=None):
    """(g[:, :channels], g[:, channels:]), copied; `out` a pair of arrays to write them into."""
    g = Operand("g", g, 4)
    n, c, h, w = g.shape
    if not 0 < channels < c:
        raise ValueError(f"cannot split {c} channels after channel {channels}")
    shapes = (n, channels, h, w), (n, c - channels, h, w)
    parts = [output(f"out[{k}]", None if out is None else out[k], shape, g)
             for k, shape in enumerate(shapes)]
    _place_all(g.device, parts[0][1], 0, 0, channels)
    _place_all(g.device, parts[1][1], channels, 0, c - channels)
    return tuple(result(op, dev, g) for op, dev in parts)


def pad_zeros(x, height, width, out=None):
    """x at the top left of a (N, C, height, width) array of +0."""
    x = Operand("x", x, 4)
    n, c, h, w = x.shape
    if height < h or width < w:
        raise ValueError(f"cannot pad {h} x {w} to {height} x {width}")
    out_op, y = output("out", out, (n, c, height, width), x)
    _place_all(x.device, y, 0, 0, c)
    return result(out_op, y, x)


def crop(x, height, width, out=None):
    """The top-left height x width pixels of x, copied."""
    x = Operand("x", x, 4)
    n, c, h, w = x.shape
    if height > h or width > w:
        raise ValueError(f"cannot crop {h} x {w} to {height} x {width}")
    out_op, y = output("out", out, (n, c, height, width), x)
    _place_all(x.device, y, 0, 0, c)
    return result(out_op, y, x)


@cuda.jit(cache=True)
def _add(a, b, c):
    i = cuda.grid(1)
    if i < a.size:
        c[i] = a[i] + b[i]


def add(a, b, out=None):
    """a + b, one float32 addition per element (numerics §12); out may be a or b."""
    a, b = Operand("a", a, 4), Operand("b", b, 4)
    if a.shape != b.shape:
        raise ValueError(f"b has shape {b.shape}, expected {a.shape}")
    out_op, y = output("out", out, a.shape, a)
    size = int(np.prod(a.shape))
    if size:
        _add[blocks(size), THREADS, launch_stream()](
            a.device.reshape(size), b.device.reshape(size), y.reshape(size))
    return result(out_op, y, a)
