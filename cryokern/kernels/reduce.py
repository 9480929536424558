"""Numerics §4 steps 3-5: fold float32 partials (N, T, K) in float64, tiles then images."""
import numpy as np
from numba import cuda, float32, float64


@cuda.jit(cache=True)
def _fold_kernel(partials, out32, out64):
    j = cuda.grid(1)
    if j >= partials.shape[2]:
        return
    total = float64(0)
    for n in range(partials.shape[0]):
        per_image = float64(partials[n, 0, j])
        for t in range(1, partials.shape[1]):
            per_image = per_image + float64(partials[n, t, j])
        total = per_image if n == 0 else total + per_image
    if out32.size > 0:
        out32[j] = float32(total)
    if out64.size > 0:
        out64[j] = total


_EMPTY = {}


def _empty(dtype):
    if dtype not in _EMPTY:
        _EMPTY[dtype] = cuda.device_array(0, dtype)
    return _EMPTY[dtype]


def fold_partials(partials, out32=None, out64=None):
    """Write the folded totals as float32 into out32 and/or float64 into out64 (length K)."""
    k = partials.shape[2]
    _fold_kernel[-(-k // 128), 128](partials,
                                    _empty(np.float32) if out32 is None else out32,
                                    _empty(np.float64) if out64 is None else out64)
