"""2x2 max-pooling, stride 2: the selected element of each window and its gradient
(numerics §10)."""
import numpy as np

from ..contract import halved_shape, same_shape
from .activation import mask_gradient
from .arrays import f32_array, finish

OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))     # a window's elements, in row-major order


def _windows(x):
    return [x[:, :, a::2, b::2] for a, b in OFFSETS]


def selection(x):
    """Index 0..3 (in OFFSETS) of each window's selected element: its first NaN if any, else
    its first maximum (a later element replaces it only when strictly greater)."""
    windows = _windows(x)
    chosen = np.zeros(windows[0].shape, np.int8)
    best = windows[0]
    settled = np.isnan(best)          # a NaN is selected, and nothing replaces it
    for k, v in enumerate(windows[1:], start=1):
        take = ~settled & (np.isnan(v) | (v > best))
        chosen[take] = k
        best = np.where(take, v, best)
        settled |= np.isnan(v)
    return chosen


def maxpool2x2_forward(x, out=None):
    """y[n,c,i,j] = the selected element of x[n,c,2i:2i+2,2j:2j+2], copied."""
    x = f32_array("x", x, 4)
    halved_shape(x.shape)
    stacked = np.stack(_windows(x), axis=-1)
    y = np.take_along_axis(stacked, selection(x)[..., None], axis=-1)[..., 0]
    return finish(y, out)


def maxpool2x2_backward(gy, x, out=None, add=None, relu_output=None, leaky_slope=None):
    """gx: gy at each window's selected element and +0 at the others; with `add`, add + that
    (one float32 addition, add first); then the optional mask of relu_output (numerics §9b)."""
    gy = f32_array("gy", gy, 4)
    x = f32_array("x", x, 4)
    same_shape("gy", gy, halved_shape(x.shape))
    chosen = selection(x)
    gx = np.empty_like(x)
    for k, (a, b) in enumerate(OFFSETS):
        gx[:, :, a::2, b::2] = np.where(chosen == k, gy, np.float32(0))
    if add is not None:
        gx = same_shape("add", f32_array("add", add, 4), x.shape) + gx
    if relu_output is not None:
        gx = mask_gradient(gx, same_shape("relu_output", f32_array("relu_output", relu_output, 4),
                                          x.shape), leaky_slope)
    return finish(gx, out)
