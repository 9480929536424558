"""Pure-NumPy reference of every kernel: the bits the GPU must reproduce (docs/numerics.md).

`cryokern.kernels` offers the same functions with the same signatures on the GPU.
"""
from .conv import (conv2d_backward_data, conv2d_backward_weights, conv2d_forward,
                   relu_backward)
from .fma import fma32
from .loss import mse_grad, mse_loss, mse_loss_and_grad
from .optim import adam_update, sgd_update
from .reduce import sum_images

__all__ = ["fma32", "conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights",
           "relu_backward", "mse_loss", "mse_grad", "mse_loss_and_grad", "sgd_update",
           "adam_update", "sum_images"]
