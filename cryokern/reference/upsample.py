"""x2 nearest-neighbour upsampling and its gradient, a fixed four-term sum (numerics §11)."""
import numpy as np

from ..contract import halved_shape, same_shape
from .activation import mask_gradient
from .arrays import f32_array, finish


def upsample2x_forward(x, out=None):
    """y[n,c,2i+a,2j+b] = x[n,c,i,j], a and b in {0, 1}."""
    x = f32_array("x", x, 4)
    return finish(np.repeat(np.repeat(x, 2, axis=2), 2, axis=3), out)


def upsample2x_backward(gy, out=None, relu_output=None, leaky_slope=None):
    """gx[i,j] = ((gy[2i,2j] + gy[2i,2j+1]) + gy[2i+1,2j]) + gy[2i+1,2j+1] in float32, then the
    optional mask of relu_output (numerics §9b)."""
    gy = f32_array("gy", gy, 4)
    halved_shape(gy.shape, "the gradient of a x2 upsampling")
    gx = ((gy[:, :, 0::2, 0::2] + gy[:, :, 0::2, 1::2]) + gy[:, :, 1::2, 0::2]) \
        + gy[:, :, 1::2, 1::2]
    if relu_output is not None:
        gx = mask_gradient(gx, same_shape("relu_output", f32_array("relu_output", relu_output, 4),
                                          gx.shape), leaky_slope)
    return finish(gx, out)
