"""Numerics §4 steps 3-5: fold float32 partials (N, T, K) in float64, tiles then images."""
from functools import lru_cache

import numpy as np
from numba import cuda, float32

from .arrays import as_device_array, launch_stream, scratch
from .codegen import Source, load_module


FOLD_AHEAD = 32     # loads in flight per thread: with 8, each fold waited ~128 load latencies


@lru_cache(maxsize=None)
def _fold_tiles():
    """Step 3, one thread per (image, k): FOLD_AHEAD loads issued, then added in tile order
    (generated: numba would leave a loop over them rolled, one load in flight)."""
    src = Source().kernel("partials, per_image")
    src("j = cuda.grid(1)")
    src("n = cuda.blockIdx.y")
    src("tiles = partials.shape[1]")
    src("if j >= partials.shape[2]:").indent()("return").dedent()
    src("acc = float64(partials[n, 0, j])")
    src("t = 1")
    src(f"while t + {FOLD_AHEAD} <= tiles:").indent()
    for u in range(FOLD_AHEAD):
        src(f"v{u} = partials[n, t + {u}, j]")
    for u in range(FOLD_AHEAD):
        src(f"acc = acc + float64(v{u})")
    src(f"t += {FOLD_AHEAD}").dedent()
    src("while t < tiles:").indent()
    src("acc = acc + float64(partials[n, t, j])")
    src("t += 1").dedent()
    src("per_image[n, j] = acc")
    return load_module("fold_tiles", src.text()).kernel


@cuda.jit(cache=True)
def _fold_images(per_image, out32, out64):
    """Steps 4-5: images in order, then one rounding to float32 where asked."""
    j = cuda.grid(1)
    if j >= per_image.shape[1]:
        return
    total = per_image[0, j]
    for n in range(1, per_image.shape[0]):
        total = total + per_image[n, j]
    if out32.size > 0:
        out32[j] = float32(total)
    if out64.size > 0:
        out64[j] = total


_EMPTY = {}


def _empty(dtype):
    if dtype not in _EMPTY:
        _EMPTY[dtype] = cuda.device_array(0, dtype)
    return _EMPTY[dtype]


def fold_tiles(partials, per_image):
    """Step 3: float32 partials (N, T, K) -> each image's float64 sums, into per_image (N, K)."""
    n, _, k = partials.shape
    _fold_tiles()[(-(-k // 128), n), 128, launch_stream()](partials, per_image)


def fold_images(per_image, out32=None, out64=None):
    """Steps 4-5: per-image sums (N, K) -> totals, float32 into out32 and/or float64 into out64."""
    k = per_image.shape[1]
    _fold_images[-(-k // 128), 128, launch_stream()](
        per_image, _empty(np.float32) if out32 is None else out32,
        _empty(np.float64) if out64 is None else out64)


def fold_partials(partials, out32=None, out64=None):
    """Steps 3-5: the totals into out32 and/or out64 (length K)."""
    n, _, k = partials.shape
    per_image = scratch("fold_per_image", (n, k), np.float64)
    fold_tiles(partials, per_image)
    fold_images(per_image, out32, out64)


def sum_images(sums, out):
    """Steps 4-5 over per-image sums (N, ...) left by conv2d_backward_weights or
    mse_loss_and_grad (their `image_sums`): the total rounded once to out's dtype (float32
    gradients, float64 SSE), written into out (a device array) and returned."""
    sums, out = as_device_array(sums), as_device_array(out)
    n = sums.shape[0]
    k = int(np.prod(sums.shape[1:]))
    if out.size != k or sums.dtype != np.float64:
        raise ValueError(f"sums {sums.dtype} {sums.shape} do not fold into out {out.shape}")
    flat = out.reshape(k)
    if out.dtype == np.float32:
        fold_images(sums.reshape(n, k), out32=flat)
    else:
        fold_images(sums.reshape(n, k), out64=flat)
    return out
