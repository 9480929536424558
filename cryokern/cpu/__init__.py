"""The reference's operations compiled for the CPU (numba @njit), with the reference's bits.

Same function names and signatures as `cryokern.reference` (docs/numerics.md is the contract
both follow); arrays are NumPy arrays. Where the reference spends its time emulating the exact
fma in float64 over whole arrays, this calls the CPU's fma instruction (fma.py) in loops that
run independent outputs on all cores and in SIMD lanes.

The contract's tile sizes reach the compiled loops as arguments, not as globals: numba's
on-disk cache (cache=True) is invalidated by a change to a function's own file only, so a
constant from contract.py frozen into a cached function would outlive a change there.

Cold start (an empty cache: 1-10 s of compiling per function on 2 cores): each compiled function
is called with one set of argument types (an absent optional array is passed as another array
of the same type, with a flag where the loop must know, not as None, which numba would compile
separately), most copies are element loops (an array-to-array slice assignment compiles numba's
shape-mismatch message, ~1-3 s), and train compiles the functions a run needs in worker
processes before its first step (precompile.py).
"""
import os

# numba's OpenMP threads wait for work asleep rather than spinning, unless the environment says
# otherwise: set before the OpenMP runtime loads (at the first parallel call). On 2 cores,
# workers spinning beside train's loader threads (or other programs) stalled the step: the
# warm demo took 22.9 s against 3.1 s asleep, the step's median 59 ms against 11 ms
# (bench/RESULTS.md, 2026-11-30). On an idle machine spinning is a little faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .activation import leaky_relu, leaky_relu_backward  # noqa: E402
from .conv import (conv2d_backward_data, conv2d_backward_weights,  # noqa: E402
                   conv2d_forward, relu_backward)
from .layout import add, crop, pad_zeros  # noqa: E402
from .loss import mse_grad, mse_loss, mse_loss_and_grad  # noqa: E402
from .optim import adam_update, sgd_update  # noqa: E402
from .pool import maxpool2x2_backward, maxpool2x2_forward  # noqa: E402
from .reduce import sum_images  # noqa: E402
from .upsample import upsample2x_backward, upsample2x_forward  # noqa: E402

__all__ = ["conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights", "relu_backward",
           "leaky_relu", "leaky_relu_backward", "maxpool2x2_forward", "maxpool2x2_backward",
           "upsample2x_forward", "upsample2x_backward", "pad_zeros", "crop", "add", "mse_loss",
           "mse_grad", "mse_loss_and_grad", "sgd_update", "adam_update", "sum_images",
           "cpu_backend"]


def cpu_backend():
    """The Backend of this package: NumPy arrays, computed by compiled loops."""
    import sys

    from ..backends import host_backend
    return host_backend("cpu", sys.modules[__name__])
