"""Copies that arrange activations for the U-Net: channel concatenation and its split, zero
padding to the pooling grid and the crop back, and the residual's sum (numerics §12, §13)."""
import numpy as np

from .arrays import f32_array, finish, same_shape


def concat_channels(a, b, out=None):
    """(N, Ca + Cb, H, W): a's channels, then b's."""
    a = f32_array("a", a, 4)
    b = f32_array("b", b, 4)
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a {a.shape} and b {b.shape} differ in batch or image size")
    return finish(np.concatenate([a, b], axis=1), out)


def split_channels(g, channels, out=None):
    """(g[:, :channels], g[:, channels:]), copied; `out` a pair of arrays to write them into."""
    g = f32_array("g", g, 4)
    if not 0 < channels < g.shape[1]:
        raise ValueError(f"cannot split {g.shape[1]} channels after channel {channels}")
    parts = np.array(g[:, :channels]), np.array(g[:, channels:])
    if out is None:
        return parts
    for o, p in zip(out, parts):
        o[...] = p
    return out


def pad_zeros(x, height, width, out=None):
    """x at the top left of a (N, C, height, width) array of +0."""
    x = f32_array("x", x, 4)
    n, c, h, w = x.shape
    if height < h or width < w:
        raise ValueError(f"cannot pad {h} x {w} to {height} x {width}")
    y = np.zeros((n, c, height, width), np.float32)
    y[:, :, :h, :w] = x
    return finish(y, out)


def crop(x, height, width, out=None):
    """The top-left height x width pixels of x, copied."""
    x = f32_array("x", x, 4)
    if height > x.shape[2] or width > x.shape[3]:
        raise ValueError(f"cannot crop {x.shape[2]} x {x.shape[3]} to {height} x {width}")
    return finish(np.array(x[:, :, :height, :width]), out)


def add(a, b, out=None):
    """a + b, one float32 addition per element (the residual: network output first)."""
    a = f32_array("a", a, 4)
    b = same_shape("b", f32_array("b", b, 4), a.shape)
    return finish(a + b, out)
