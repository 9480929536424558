"""ReLU and LeakyReLU, and the gradient masks that undo them from the stored output
(numerics §0, §9)."""
import numpy as np

from ..contract import DEFAULT_LEAKY_SLOPE, leaky_slope as _slope, same_shape
from .arrays import f32_array, finish


def activate(v, relu=False, leaky_slope=None):
    """The convolutions' epilogue: v as it is, relu(v), or leaky(v) = v if v > 0 else slope*v."""
    if relu and leaky_slope is not None:
        raise ValueError("relu and leaky_slope exclude each other")
    if relu:
        return np.where(v <= 0, np.float32(0), v)
    if leaky_slope is not None:
        return np.where(v > 0, v, _slope(leaky_slope) * v)
    return v


def mask_gradient(g, y, leaky_slope=None):
    """g where the activation's output y > 0; elsewhere +0 (ReLU) or slope * g (leaky)."""
    if leaky_slope is None:
        return np.where(y > 0, g, np.float32(0))
    return np.where(y > 0, g, _slope(leaky_slope) * g)


def leaky_relu(x, slope=DEFAULT_LEAKY_SLOPE, out=None):
    """x if x > 0 else slope * x, elementwise (one float32 product where x <= 0)."""
    x = f32_array("x", x, 4)
    return finish(activate(x, leaky_slope=slope), out)


def leaky_relu_backward(gy, y, slope=DEFAULT_LEAKY_SLOPE, out=None):
    """gy where the forward output y > 0, else slope * gy."""
    gy = f32_array("gy", gy, 4)
    y = same_shape("y", f32_array("y", y, 4), gy.shape)
    return finish(mask_gradient(gy, y, slope), out)
