"""Pure-NumPy reference of every kernel: the bits the GPU must reproduce (docs/numerics.md).

`cryokern.kernels` offers the same functions with the same signatures on the GPU.
"""
from .activation import leaky_relu, leaky_relu_backward
from .conv import (conv2d_backward_data, conv2d_backward_weights, conv2d_forward,
                   relu_backward)
from .fma import fma32
from .layout import add, crop, pad_zeros
from .loss import mse_grad, mse_loss, mse_loss_and_grad
from .optim import adam_update, sgd_update
from .pool import maxpool2x2_backward, maxpool2x2_forward
from .reduce import sum_images
from .upsample import upsample2x_backward, upsample2x_forward

__all__ = ["fma32", "conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights",
           "relu_backward", "leaky_relu", "leaky_relu_backward", "maxpool2x2_forward",
           "maxpool2x2_backward", "upsample2x_forward", "upsample2x_backward",
           "pad_zeros", "crop", "add", "mse_loss",
           "mse_grad", "mse_loss_and_grad", "sgd_update", "adam_update", "sum_images"]
