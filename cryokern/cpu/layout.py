"""Zero padding, the crop back and the residual's sum (numerics §12, §13) on the CPU: copies
and one float32 addition per element, which NumPy does at memory speed with the contract's
bits, so nothing here is compiled."""
import numpy as np

from ..contract import same_shape
from .arrays import Output, operand


def pad_zeros(x, height, width, out=None):
    """x at the top left of a (N, C, height, width) array of +0."""
    x = operand("x", x, 4)
    n, c, h, w = x.shape
    if height < h or width < w:
        raise ValueError(f"cannot pad {h} x {w} to {height} x {width}")
    dst = Output(out, (n, c, height, width), inputs=(x,))
    dst.array[:, :, h:, :] = 0
    dst.array[:, :, :h, w:] = 0
    dst.array[:, :, :h, :w] = x
    return dst.done()


def crop(x, height, width, out=None):
    """The top-left height x width pixels of x, copied."""
    x = operand("x", x, 4)
    if height > x.shape[2] or width > x.shape[3]:
        raise ValueError(f"cannot crop {x.shape[2]} x {x.shape[3]} to {height} x {width}")
    dst = Output(out, x.shape[:2] + (height, width), inputs=(x,))
    dst.array[...] = x[:, :, :height, :width]
    return dst.done()


def add(a, b, out=None):
    """a + b, one float32 addition per element (the residual: network output first); out may
    be a or b."""
    a = operand("a", a, 4)
    b = same_shape("b", operand("b", b, 4), a.shape)
    dst = Output(out, a.shape)        # elementwise: NumPy reads each element before writing it
    np.add(a, b, out=dst.array)
    return dst.done()
