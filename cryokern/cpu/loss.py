"""Mean squared error (an exact float64 SSE per image and a pixel count) and its gradient,
compiled for the CPU (numerics §4b, §5): one float32 chain per tile of each plane, the tiles
on the cores."""
import numpy as np
from numba import njit, prange

from ..contract import TILE_H, TILE_W, mse_grad_scale, tile_grid
from .arrays import Output, operand
from .fma import fma32
from .reduce import finish_reduction, fold_tiles

ZERO = np.float32(0)


@njit(parallel=True, cache=True)
def _sse_partials(pred, target, scale, grad, tile_h, tile_w, tw, partials):
    """partials[n, c*T + t] = chain from +0 over tile t (of tile_h x tile_w pixels, tw tiles a
    row) of plane (n, c), row-major, of fma(d, d) with d = pred - target; with `grad`, also
    grad = d * scale (one job reads and writes each element, so grad may be pred itself)."""
    n, ch, h, width = pred.shape
    tiles = partials.shape[1] // ch
    for job in prange(n * ch * tiles):
        plane = job // tiles
        t = job - plane * tiles
        img = plane // ch
        c = plane - img * ch
        ti = t // tw
        c0 = (t - ti * tw) * tile_w
        c1 = min(c0 + tile_w, width)
        acc = ZERO
        for r in range(ti * tile_h, min(ti * tile_h + tile_h, h)):
            p, q = pred[img, c, r], target[img, c, r]
            for j in range(c0, c1):
                d = p[j] - q[j]
                acc = fma32(d, d, acc)
                if grad is not None:
                    grad[img, c, r, j] = d * scale
        partials[img, c * tiles + t] = acc


@njit(parallel=True, cache=True)
def _grad(pred, target, scale, out):
    for i in prange(pred.size):
        out[i] = (pred[i] - target[i]) * scale


def _operands(pred, target):
    pred, target = operand("pred", pred, 4), operand("target", target, 4)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    return pred, target


def _image_sse(pred, target, scale=None, grad=None):
    n, ch, h, width = pred.shape
    th, tw = tile_grid(h, width)
    partials = np.empty((n, ch * th * tw), np.float32)
    _sse_partials(pred, target, ZERO if scale is None else scale, grad, TILE_H, TILE_W, tw,
                  partials)
    return fold_tiles(partials)


def mse_loss(pred, target):
    """(sse, count): per plane tile, a float32 chain d = pred - target, acc = fma(d, d, acc)."""
    pred, target = _operands(pred, target)
    return float(finish_reduction(_image_sse(pred, target), np.float64)), pred.size


def mse_grad(pred, target, count, out=None):
    """d(SSE/count)/d(pred) = (pred - target) * float32(2/count), one float32 multiply."""
    pred, target = _operands(pred, target)
    dst = Output(out, pred.shape)      # elementwise: out may be pred
    _grad(pred.reshape(-1), target.reshape(-1), mse_grad_scale(count), dst.array.reshape(-1))
    return dst.done()


def mse_loss_and_grad(pred, target, count, out=None, image_sums=None):
    """Both of the above from one pass; returns (sse, grad). With `image_sums` (float64, (N,))
    each image's sum is written there and returned in place of the sse, for sum_images()."""
    pred, target = _operands(pred, target)
    dst = Output(out, pred.shape)      # each element read, then written: out may be pred
    images = _image_sse(pred, target, mse_grad_scale(count), dst.array)
    if image_sums is not None:
        image_sums[...] = images
        sse = image_sums
    else:
        sse = float(finish_reduction(images, np.float64))
    return sse, dst.done()
