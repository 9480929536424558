"""Taking NumPy or device arrays in, giving the same kind back, reusable scratch buffers, and
the stream kernels are launched on."""
import contextlib
import threading

import numpy as np
from numba import cuda

from ..contract import same_shape
_launch = threading.local()


def launch_stream():
    """The stream every kernel of this package is launched on: the legacy default stream (0),
    unless a step is being recorded as a CUDA graph (see graph.py)."""
    return getattr(_launch, "stream", 0)


@contextlib.contextmanager
def launching_on(stream):
    previous = launch_stream()
    _launch.stream = stream
    try:
        yield
    finally:
        _launch.stream = previous


def is_device_array(a):
    """True for numba device arrays and anything with __cuda_array_interface__ (CuPy, torch).

    The simulator has no cuda.is_cuda_array; its arrays carry __cuda_ndarray__ instead."""
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def as_device_array(a):
    return a if getattr(a, "__cuda_ndarray__", False) else cuda.as_cuda_array(a)


class Operand:
    """A float32 argument on the device, remembering whether the caller gave a host array."""

    def __init__(self, name, a, ndim=None):
        if is_device_array(a):
            self.device = as_device_array(a)
            self.host = None
        else:
            self.host = np.asarray(a)
            self.device = None
        dtype = self.device.dtype if self.device is not None else self.host.dtype
        shape = tuple(self.device.shape if self.device is not None else self.host.shape)
        if dtype != np.float32 or (ndim is not None and len(shape) != ndim):
            raise TypeError(f"{name} must be a float32 array with {ndim} dimensions, "
                            f"got {dtype} with shape {shape}")
        if self.device is not None and not self.device.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous on the device")
        if self.device is None:
            self.device = cuda.to_device(np.ascontiguousarray(self.host))
        self.shape = shape

    @property
    def on_host(self):
        return self.host is not None

    def write_back(self):
        """For in-place functions: copy the device result into the caller's NumPy array."""
        if self.on_host:
            self.host[...] = self.device.copy_to_host()


def output(name, out, shape, like):
    """The device array to write a result of `shape` into: `out` (checked) or a new one."""
    if out is None:
        return None, cuda.device_array(shape, np.float32)
    op = same_shape(name, Operand(name, out), shape)
    return op, op.device


def result(out_op, dev, like):
    """Return the result as the caller expects: their `out`, or the kind `like` was given as."""
    if out_op is not None:
        out_op.write_back()
        return out_op.host if out_op.on_host else out_op.device
    return dev.copy_to_host() if like.on_host else dev


_scratch = {}


def scratch_buffers():
    """Every scratch buffer now allocated (a recorded graph keeps them alive)."""
    return list(_scratch.values())


def placeholder(ndim):
    """A one-element device array standing in for an optional array argument a kernel ignores."""
    return scratch(f"placeholder{ndim}", (1,) * ndim, np.float32)


def scratch(name, shape, dtype):
    """A device buffer reused across calls (launches run in stream order), grown as needed."""
    size = int(np.prod(shape))
    buf = _scratch.get((name, dtype))
    if buf is None or buf.size < size:
        buf = cuda.device_array(max(size, 1), dtype)
        _scratch[(name, dtype)] = buf
    return buf[:size].reshape(shape)
