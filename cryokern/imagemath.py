"""Whole-image float64 arithmetic on float32 images, a block of rows at a time.

Per-image statistics and affine maps over a 4096x4096 micrograph would otherwise allocate
float64 temporaries of 128 MiB per step (page faults, and no cache reuse); in blocks of about a
million pixels they stay 8 MiB. Blocks no smaller than that keep the number of numpy calls, each
a round trip through the GIL, low: with 128-row blocks the loader's threads slowed the training
step's kernel launches (a 1024^2 load+step loop ran 228 images/s, 310 with whole-image blocks).
Maps are elementwise, so blocking does not change their bits; sums have a fixed order (numpy's
within a block, blocks top to bottom), so they are reproducible too.
"""
import numpy as np

BLOCK_PIXELS = 1 << 20


def _rows(image):
    return max(1, BLOCK_PIXELS // max(1, image[0].size))


def sum_squared_deviations(image, mean):
    """sum((image - mean)^2) in float64. numpy ufuncs, not BLAS (np.dot): OpenBLAS serializes
    calls from several threads, and the denoise pipeline calls this from several."""
    total, rows = 0.0, _rows(image)
    for top in range(0, image.shape[0], rows):
        d = image[top:top + rows].astype(np.float64) - mean
        total += float(np.square(d, out=d).sum())
    return total


def affine_map(image, fn, out=None):
    """fn (a float64 expression of a block of rows) over the image, rounded into float32 `out`
    (new if None)."""
    out = np.empty(image.shape, np.float32) if out is None else out
    rows = _rows(image)
    for top in range(0, image.shape[0], rows):
        out[top:top + rows] = fn(image[top:top + rows])
    return out
