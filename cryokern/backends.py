"""Choosing where a training step runs: the GPU kernels, the compiled CPU backend, or the NumPy
reference (the oracle the other two equal bit for bit).

A backend offers the kernel functions (same names and signatures in both) plus the few array
operations the model layer needs to keep its buffers where the kernels want them.
"""
import os

import numpy as np


class Backend:
    """The kernel functions of one implementation, and how to move float32 arrays to it."""

    def __init__(self, name, ops, to_device, to_host, empty, synchronize=lambda: None,
                 host_empty=None, copy_in=None, copy_out=None, empty64=None, fetch=None,
                 fetch_arrays=None, uploads=None, recorder=None, free_memory=None):
        self.name = name
        self.ops = ops
        self.to_device = to_device
        self.to_host = to_host
        self.empty = empty
        self.synchronize = synchronize
        # host buffers that copy fastest to the backend (page-locked for the GPU), and the
        # copies between such a buffer and one of the backend's arrays
        self.host_empty = host_empty or (lambda shape: np.empty(shape, np.float32))
        self.copy_in = copy_in or (lambda dst, src: np.copyto(dst, src))
        self.copy_out = copy_out or (lambda dst, src: np.copyto(dst, src))
        # float64 arrays (per-image sums, the loss), and fetch(scalar).result() a float64
        # scalar's value: on the GPU the copy is queued behind the step and only result() waits
        self.empty64 = empty64 or (lambda shape: np.zeros(shape, np.float64))
        self.fetch = fetch or (lambda scalar: Ready(float(scalar[0])))
        # fetch_arrays({key: array}).result(): NumPy copies of the arrays as the work queued so
        # far leaves them (a checkpoint's state while later steps run); one wait for them all
        self.fetch_arrays = fetch_arrays or (
            lambda arrays: Ready({k: np.array(a, copy=True) for k, a in arrays.items()}))
        # uploads().put(*host arrays) -> the backend's arrays (see kernels.transfer.Uploads)
        self.uploads = uploads or HostUploads
        # recorder(keep).run(arrays, queue, kind): queue() as it is, or replayed from a recording
        # (kernels.graph.Recorder: CUDA graphs)
        self.recorder = recorder or Eager
        # free_memory(): bytes the backend's arrays may still take (the device's free memory;
        # the host's available memory for the CPU backends)
        self.free_memory = free_memory or available_host_memory

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def zeros(self, shape):
        return self.to_device(np.zeros(shape, np.float32))


def available_host_memory():
    """Physical memory not in use (Linux's available pages; 4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class Ready:
    """A value that needs no waiting (the reference computes synchronously)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class HostUploads:
    """The reference's arrays are host arrays: put() hands them through, nothing to wait for."""

    def put(self, *hosts):
        return hosts

    def copied(self):
        pass

    def used(self):
        pass


class Eager:
    """Runs every queue of work as it is: nothing to record on the reference."""

    def __init__(self, keep=None):      # Recorder's signature; nothing is kept
        pass

    def run(self, arrays, queue, kind=None):
        queue()


def host_backend(name, ops):
    """A Backend whose arrays are NumPy arrays in host memory (the CPU and the reference)."""
    return Backend(name, ops,
                   to_device=lambda a: np.array(a, np.float32, order="C"),
                   to_host=lambda a: np.array(a, np.float32),
                   empty=lambda shape: np.empty(shape, np.float32))


def reference_backend():
    from . import reference
    return host_backend("reference", reference)


def gpu_available():
    try:
        from numba import cuda
        return cuda.is_available()
    except ImportError:
        return False


DEVICES = ("auto", "gpu", "cpu", "reference")
DEVICE_HELP = ("gpu: the numba.cuda kernels; cpu: the same operations compiled for the CPU; "
               "reference: the NumPy reference (the slow oracle); all give the same bits; "
               "auto (default): gpu if there is one, else cpu")


def get_backend(name="auto"):
    """'gpu' (the numba.cuda kernels), 'cpu' (the compiled CPU backend), 'reference' (the NumPy
    reference: the same bits, far slower), or 'auto' (the GPU when numba.cuda.is_available(),
    else the CPU)."""
    if name == "auto":
        name = "gpu" if gpu_available() else "cpu"
    if name == "reference":
        return reference_backend()
    if name == "cpu":
        from .cpu import cpu_backend
        return cpu_backend()
    if name == "gpu":
        if not gpu_available():
            raise RuntimeError("the GPU backend was asked for, but numba.cuda finds no usable GPU")
        from .kernels import gpu_backend
        return gpu_backend()
    raise ValueError(f"unknown backend {name!r}: use one of {', '.join(DEVICES)}")
