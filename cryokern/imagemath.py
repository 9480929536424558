"""Whole-image float64 arithmetic on float32 images, a block of rows at a time.

Per-image statistics and affine maps over a 4096x4096 micrograph would otherwise allocate
float64 temporaries of 128 MiB per step (page faults, and no cache reuse); in blocks of rows
they stay a few MiB. Maps are elementwise, so blocking does not change their bits; sums have a
fixed order (numpy's within a block, blocks top to bottom), so they are reproducible too.
"""
import numpy as np

ROWS_PER_BLOCK = 128


def sum_squared_deviations(image, mean):
    """sum((image - mean)^2) in float64. numpy ufuncs, not BLAS (np.dot): OpenBLAS serializes
    calls from several threads, and the denoise pipeline calls this from several."""
    total = 0.0
    for top in range(0, image.shape[0], ROWS_PER_BLOCK):
        d = image[top:top + ROWS_PER_BLOCK].astype(np.float64) - mean
        total += float(np.square(d, out=d).sum())
    return total


def affine_map(image, fn, out=None):
    """fn (a float64 expression of a block of rows) over the image, rounded into float32 `out`
    (new if None)."""
    out = np.empty(image.shape, np.float32) if out is None else out
    for top in range(0, image.shape[0], ROWS_PER_BLOCK):
        out[top:top + ROWS_PER_BLOCK] = fn(image[top:top + ROWS_PER_BLOCK])
    return out
