"""Argument checks and `out` handling shared by the reference's operations."""
import numpy as np


def f32_array(name, a, ndim):
    """`a` as an array, refused unless float32 with `ndim` dimensions (as the kernels refuse it)."""
    a = np.asarray(a)
    if a.dtype != np.float32 or a.ndim != ndim:
        raise TypeError(f"{name} must be a float32 array with {ndim} dimensions, "
                        f"got {a.dtype} with shape {a.shape}")
    return a


def finish(result, out):
    """`result`, or written into `out` (which may alias an input: `result` is complete first)."""
    if out is None:
        return result
    out[...] = result
    return out
