"""Arguments checked and made C-contiguous float32, and outputs that may not be written into
directly (absent, strided, or overlapping an input the kernel still reads)."""
import numpy as np


def operand(name, a, ndim=None):
    """`a` as a C-contiguous float32 NumPy array (the same array when it already is one)."""
    a = np.asarray(a)
    if a.dtype != np.float32 or (ndim is not None and a.ndim != ndim):
        raise TypeError(f"{name} must be a float32 array with {ndim} dimensions, "
                        f"got {a.dtype} with shape {a.shape}")
    return np.ascontiguousarray(a)


class Output:
    """Where a kernel writes a result of `shape`: `out` itself when it is a C-contiguous float32
    array that shares no memory with `inputs`, else a new array copied into `out` by done()."""

    def __init__(self, out, shape, inputs=()):
        shape = tuple(shape)
        if out is not None and tuple(np.shape(out)) != shape:
            raise ValueError(f"out has shape {np.shape(out)}, expected {shape}")
        direct = (out is not None and isinstance(out, np.ndarray) and out.dtype == np.float32
                  and out.flags.c_contiguous
                  and not any(np.may_share_memory(out, a) for a in inputs))
        self.out = out
        self.array = out if direct else np.empty(shape, np.float32)

    def done(self):
        if self.out is None:
            return self.array
        if self.array is not self.out:
            self.out[...] = self.array
        return self.out


def same_elements(a, b):
    """True when a and b are views of the same elements (same start, shape and strides): an
    in-place kernel that reads each element before writing it may then take one as the other."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
            and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])
