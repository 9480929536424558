"""numba.cuda kernels of the training step, bit-identical to `cryokern.reference`.

Same function names and signatures as the reference (fma32 aside: that is `cuda.fma` here).
Each takes NumPy or device arrays (anything with __cuda_array_interface__) and returns the
kind it was given; in-place functions update NumPy arguments in place too.
"""
import numpy as np
from numba import cuda

from .activation import leaky_relu, leaky_relu_backward
from .arrays import as_device_array, is_device_array
from .conv import (conv2d_backward_data, conv2d_backward_weights, conv2d_forward,
                   relu_backward)
from .layout import add, crop, pad_zeros
from .loss import mse_grad, mse_loss, mse_loss_and_grad
from .optim import adam_update, sgd_update
from .pool import maxpool2x2_backward, maxpool2x2_forward
from .reduce import sum_images
from .upsample import upsample2x_backward, upsample2x_forward
from .graph import Recorder
from .transfer import Uploads, fetch, fetch_arrays

__all__ = ["conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights", "relu_backward",
           "leaky_relu", "leaky_relu_backward", "maxpool2x2_forward", "maxpool2x2_backward",
           "upsample2x_forward", "upsample2x_backward", "pad_zeros", "crop", "add", "mse_loss",
           "mse_grad", "mse_loss_and_grad", "sgd_update", "adam_update", "sum_images",
           "gpu_backend"]


def _to_device(a):
    if is_device_array(a):
        return as_device_array(a)
    return cuda.to_device(np.ascontiguousarray(a, np.float32))


def _free_memory():
    """The current device's free memory in bytes (numba's simulator, which says infinite: the
    host's)."""
    from numba import config
    if config.ENABLE_CUDASIM:
        from ..backends import available_host_memory
        return available_host_memory()
    return cuda.current_context().get_memory_info()[0]


def gpu_backend():
    """The Backend whose arrays live on the current CUDA device."""
    import sys

    from ..backends import Backend
    return Backend("gpu", sys.modules[__name__], to_device=_to_device,
                   to_host=lambda a: a.copy_to_host(),
                   empty=lambda shape: cuda.device_array(shape, np.float32),
                   synchronize=cuda.synchronize,
                   host_empty=lambda shape: cuda.pinned_array(shape, np.float32),
                   copy_in=lambda dst, src: dst.copy_to_device(src),
                   copy_out=lambda dst, src: src.copy_to_host(dst),
                   empty64=lambda shape: cuda.device_array(shape, np.float64), fetch=fetch,
                   fetch_arrays=fetch_arrays, uploads=Uploads, recorder=Recorder,
                   free_memory=_free_memory)
