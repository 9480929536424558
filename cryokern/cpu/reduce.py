"""The float64 steps of every reduction (numerics §4 steps 3-5), compiled: per image a left
fold over its tiles' float32 partials, then a left fold over images, rounded once."""
import numpy as np
from numba import njit


@njit(cache=True)
def _fold_tiles(partials, sums):
    """sums[n, k] = ((p[n,0,k] + p[n,1,k]) + p[n,2,k]) + ... in float64, from p[n,0,k] (not
    from 0, so all -0.0 partials give -0.0), the k side by side. One core: a few adds per
    partial cost less than starting threads (measured in the demo: 2 ms a call with them)."""
    n, tiles, k = partials.shape
    for img in range(n):
        for j in range(k):
            sums[img, j] = np.float64(partials[img, 0, j])
        for t in range(1, tiles):
            for j in range(k):
                sums[img, j] += np.float64(partials[img, t, j])


@njit(cache=True)
def _fold_images(sums, total):
    """total[k] = ((s[0,k] + s[1,k]) + s[2,k]) + ... in float64, in image order."""
    for j in range(sums.shape[1]):      # not total[:] = sums[0]: see conv._weight_partials
        total[j] = sums[0, j]
    for img in range(1, sums.shape[0]):
        for j in range(sums.shape[1]):
            total[j] += sums[img, j]


def fold_tiles(partials):
    """float32 partials (N, T, ...) -> float64 per-image sums (N, ...) (step 3)."""
    n, tiles = partials.shape[:2]
    sums = np.empty((n, int(np.prod(partials.shape[2:]))), np.float64)
    _fold_tiles(partials.reshape(n, tiles, -1), sums)
    return sums.reshape((n,) + partials.shape[2:])


def finish_reduction(image_sums, dtype):
    """float64 per-image sums (N, ...) -> their total (...) rounded once to dtype (steps 4-5)."""
    sums = np.ascontiguousarray(image_sums, np.float64)
    total = np.empty(int(np.prod(sums.shape[1:])), np.float64)
    _fold_images(sums.reshape(sums.shape[0], -1), total)
    return total.reshape(sums.shape[1:]).astype(dtype)


def sum_images(sums, out):
    """Steps 4-5 over per-image sums left by conv2d_backward_weights or mse_loss_and_grad
    (their `image_sums`), e.g. from several passes over one batch: the total rounded once to
    out's dtype (float32 gradients, float64 SSE), written into out and returned."""
    sums = np.asarray(sums)
    if sums.dtype != np.float64 or sums.ndim < 1 or \
            int(np.prod(sums.shape[1:])) != int(np.prod(np.shape(out))):
        raise ValueError(f"sums {sums.dtype} {sums.shape} do not fold into out {np.shape(out)}")
    out[...] = finish_reduction(sums, out.dtype).reshape(np.shape(out))
    return out
