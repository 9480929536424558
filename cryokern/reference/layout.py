"""Copies that fit images to the U-Net's pooling grid, zero padding and the crop back, and the
residual's sum (numerics §12, §13). (Concatenation needs no copy: the convolutions read two
arrays.)"""
import numpy as np

from ..contract import same_shape
from .arrays import f32_array, finish


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
