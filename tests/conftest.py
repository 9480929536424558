"""Test set-up: numba's CUDA simulator where there is no GPU driver, with an exact fma.

Without a driver, NUMBA_ENABLE_CUDASIM=1 is set before numba is imported, so the kernels run
in the simulator at small sizes. The simulator's cuda.fma rounds twice (a*b + c); it is
replaced by the exact float32 fma so that the simulator models the hardware's fma.rn.f32.
Tests marked `gpu` run only on a real GPU.
"""
import ctypes
import os
import struct
import zlib

import numpy as np
import pytest


def _driver_present():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _driver_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

from numba import config, cuda  # noqa: E402  (after choosing the simulator)

from cryokern.reference import fma32  # noqa: E402

SIMULATOR = bool(config.ENABLE_CUDASIM)
REAL_GPU = not SIMULATOR and cuda.is_available()


def _exact_scalar_fma(a, b, c):
    """fma32 for scalars: Python's float64 a*b is exact, so one rounding; defer the rare
    float32-midpoint or float32-subnormal sums to fma32, which handles them exactly. A zero
    sum is exact (float64 addition gives 0 only for an exact 0, signed as IEEE says for any
    width) and common (padding, chains from +0), and fma32 of a scalar takes milliseconds."""
    s = float(a) * float(b) + float(c)
    bits = struct.unpack("<q", struct.pack("<d", s))[0]
    if s != 0 and ((bits & 0x1FFFFFFF) == 0x10000000 or
                   (bits & 0x7FF0000000000000) < 0x3810000000000000):
        return fma32(a, b, c)
    return np.float32(s)


if SIMULATOR:
    from numba.cuda.simulator.kernelapi import FakeCUDAModule
    FakeCUDAModule.fma = lambda self, a, b, c: _exact_scalar_fma(a, b, c)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where there is none)")
    config.addinivalue_line("markers", "multigpu: needs two CUDA GPUs of one host (skipped "
                                       "where there are fewer)")


def pytest_collection_modifyitems(config, items):
    gpus = len(cuda.gpus) if REAL_GPU else 0
    no_gpu = pytest.mark.skip(reason="needs a real CUDA GPU")
    one_gpu = pytest.mark.skip(reason="needs two CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and not gpus:
            item.add_marker(no_gpu)
        elif "multigpu" in item.keywords and gpus < 2:
            item.add_marker(one_gpu)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def bits(a, dtype=np.float32):
    """The raw bits of an array of `dtype` (float32 unless said), for bit-for-bit comparison
    (NaN-safe, signed-zero-aware). Another dtype is an error, not a conversion: converting
    float64 to float32 would make different values compare equal."""
    a = np.asarray(a)
    assert a.dtype == dtype, f"bits() of a {a.dtype} array, expected {np.dtype(dtype)}"
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def same_bits_nan_positions(got, want):
    """Equal bits except inside NaNs, whose positions must match: the contract's comparison
    where a NaN passes through arithmetic (numerics: the GPU's fma returns its default NaN,
    NumPy keeps the operand's payload)."""
    got, want = np.asarray(got), np.asarray(want)
    nan = np.isnan(want)
    return got.shape == want.shape and np.array_equal(np.isnan(got), nan) and \
        np.array_equal(bits(got)[~nan], bits(want)[~nan])


def ident(shape):
    """A test id for a shape: (1, 16, 16, 33, 20) -> '1x16x16x33x20'."""
    return "x".join(map(str, shape))


def write_mrc(path, data, voxel_size=1.0, layout="stack"):
    """An MRC file of `data` (2-D image, or 3-D as 'stack' or 'volume'); returns its path."""
    import mrcfile
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
        if np.ndim(data) == 3:
            mrc.set_image_stack() if layout == "stack" else mrc.set_volume()
        mrc.voxel_size = voxel_size
    return str(path)
