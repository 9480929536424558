"""Whole-image float64 arithmetic on float32 images: compiled loops that release the GIL.

The batch loader and the denoise pipeline run these on several threads beside the thread that
launches the GPU's kernels. With numpy, loading a 1024^2 noisy/clean pair took ~20 passes
through float64 temporaries and a round trip through the GIL per call (9.2 ms a pair on one
core; 3.4 ms now), and the kernel launches waited for the GIL. Here each statistic is one
pass, with no temporaries and no GIL.

Sums have one documented order, so they are reproducible on any machine: the pixel at
row-major position i goes to lane i % 64; each lane is a float64 chain over its pixels in that
order; then lane 2k + 1 is added into lane 2k, halving the lanes until one is left. Float32
values cannot overflow a float64 sum, so a sum is finite exactly when every pixel is. Maps are
elementwise: float64 arithmetic, one rounding to float32. Nothing here is compiled with
fastmath: no reassociation, no fused multiply-adds.
"""
import numba
import numpy as np


LANES = 64       # as many as compile to SIMD: 8 lanes stayed scalar, 3x slower


@numba.njit(nogil=True, cache=True, inline="always")
def _extend_range(lo, hi, k, v):
    lo[k] = v if v < lo[k] else lo[k]
    hi[k] = v if v > hi[k] else hi[k]


@numba.njit(nogil=True, cache=True, inline="always")
def _accumulate(acc, lo, hi, k, v, mean, square):
    d = np.float64(v) - mean
    acc[k] += d * d if square else d
    _extend_range(lo, hi, k, v)


@numba.njit(nogil=True, cache=True)
def _lane_sums(x, mean, square):
    """Over a 1-D array: (the lane-ordered float64 sum of x - mean, or of its square; min;
    max). The loop over a group of LANES pixels has a constant trip count and works
    elementwise on arrays of LANES, which LLVM vectorizes."""
    acc = np.zeros(LANES)
    lo = np.full(LANES, np.inf, np.float32)
    hi = np.full(LANES, -np.inf, np.float32)
    n = x.size
    full = n - n % LANES
    for start in range(0, full, LANES):
        for k in range(LANES):
            _accumulate(acc, lo, hi, k, x[start + k], mean, square)
    for k in range(n - full):
        _accumulate(acc, lo, hi, k, x[full + k], mean, square)
    width = LANES
    while width > 1:                        # pairwise: (l0 + l1), (l2 + l3), ... then again
        width //= 2
        for k in range(width):
            acc[k] = acc[2 * k] + acc[2 * k + 1]
    return acc[0], lo.min(), hi.max()


@numba.njit(nogil=True, cache=True, inline="always")
def _standardized(x, mean, scale):
    """The forward map of one pixel, x a float64: float64 arithmetic, one rounding."""
    return np.float32((x - mean) * scale)


@numba.njit(nogil=True, cache=True)
def _standardize(image, mean, scale, out):
    h, w = image.shape
    for r in range(h):
        for c in range(w):
            out[r, c] = _standardized(np.float64(image[r, c]), mean, scale)


@numba.njit(nogil=True, cache=True)
def _destandardize(image, mean, scale, out):
    h, w = image.shape
    for r in range(h):
        for c in range(w):
            out[r, c] = np.float32(np.float64(image[r, c]) / scale + mean)


@numba.njit(nogil=True, cache=True, inline="always")
def _map_pixel(src, dst, i, k, mean, scale, zero, lo, hi):
    x = np.float64(src[i])
    v = _standardized(x, mean, scale)
    dst[i] = v
    zero[k] += x * 0.0                      # stays +0 exactly while every x is finite
    _extend_range(lo, hi, k, v)


@numba.njit(nogil=True, cache=True)
def _standardize_range(image, mean, scale, out):
    """_standardize in lanes of LANES pixels per row (so that LLVM vectorizes the reductions),
    also giving the output's min and max and whether every input pixel was finite."""
    zero = np.zeros(LANES)
    lo = np.full(LANES, np.inf, np.float32)
    hi = np.full(LANES, -np.inf, np.float32)
    h, w = image.shape
    full = w - w % LANES
    for r in range(h):
        src, dst = image[r], out[r]
        for start in range(0, full, LANES):
            for k in range(LANES):
                _map_pixel(src, dst, start + k, k, mean, scale, zero, lo, hi)
        for k in range(w - full):
            _map_pixel(src, dst, full + k, k, mean, scale, zero, lo, hi)
    return lo.min(), hi.max(), (zero == 0.0).all()


def _float32_2d(image):
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected one 2-D image, got shape {image.shape}")
    # exact for the float16 and integer MRC modes
    return image if image.dtype == np.float32 else image.astype(np.float32)


def _pixels(image):
    return np.ascontiguousarray(_float32_2d(image)).reshape(-1)


def sum_and_range(image):
    """(sum in float64, min, max) of an image; the sum is NaN or infinite if any pixel is."""
    total, lo, hi = _lane_sums(_pixels(image), 0.0, False)
    return float(total), float(lo), float(hi)


def statistics(image):
    """(count, mean, sum of squared deviations from the mean, min, max), in float64."""
    x = _pixels(image)
    total, lo, hi = _lane_sums(x, 0.0, False)
    mean = float(total) / x.size
    return x.size, mean, float(_lane_sums(x, mean, True)[0]), float(lo), float(hi)


def _map(kernel, image, mean, scale, out):
    image = _float32_2d(image)
    out = np.empty(image.shape, np.float32) if out is None else out
    kernel(image, float(mean), float(scale), out)
    return out


def standardize(image, mean, scale, out=None):
    """float32((x - mean) * scale) for every pixel, into `out` (new if None)."""
    return _map(_standardize, image, mean, scale, out)


def standardize_with_range(image, mean, scale, out):
    """standardize() into `out`, and in the same pass (min, max) of `out` and whether every
    pixel of `image` is finite: the batch loader's clean image, one pass instead of three."""
    image = _float32_2d(image)
    lo, hi, finite = _standardize_range(image, float(mean), float(scale), out)
    return float(lo), float(hi), bool(finite)


def destandardize(image, mean, scale, out=None):
    """float32(x / scale + mean): the inverse map, for the network's output."""
    return _map(_destandardize, image, mean, scale, out)
