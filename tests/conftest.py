import zlib

import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where numba.cuda finds none)")


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def bits(a):
    """A float32 array's raw bits, for bit-for-bit comparison (NaN-safe, signed-zero-aware)."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)
