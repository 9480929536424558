"""MSE loss (float64 SSE, numerics §4b) and its gradient (§5), fused in one pass over pixels."""
import numpy as np
from numba import cuda, float32

from ..contract import TILE_H, TILE_W, mse_grad_scale, tile_grid
from .arrays import Operand, output, placeholder, result, scratch
from .reduce import fold_partials


@cuda.jit(cache=True)
def _loss_kernel(pred, target, scale, grad, partials, tiles_w, write_grad):
    """One thread per (image, plane, tile): the tile's chain of fma(d, d, acc), row-major."""
    i = cuda.grid(1)
    if i >= pred.shape[0] * partials.shape[1]:
        return
    n = i // partials.shape[1]
    j = i % partials.shape[1]                      # plane-major, then tile
    tiles = partials.shape[1] // pred.shape[1]
    c = j // tiles
    t = j % tiles
    r0 = (t // tiles_w) * TILE_H
    c0 = (t % tiles_w) * TILE_W
    acc = float32(0)
    for r in range(r0, min(r0 + TILE_H, pred.shape[2])):
        for col in range(c0, min(c0 + TILE_W, pred.shape[3])):
            d = pred[n, c, r, col] - target[n, c, r, col]
            acc = cuda.fma(d, d, acc)
            if write_grad:
                grad[n, c, r, col] = d * scale
    partials[n, j, 0] = acc


def _operands(pred, target):
    pred, target = Operand("pred", pred, 4), Operand("target", target, 4)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    return pred, target


def _sse_and_grad(pred, target, count, out):
    n, ch, h, w = pred.shape
    th, tw = tile_grid(h, w)
    partials = scratch("loss_part", (n, ch * th * tw, 1), np.float32)
    total = scratch("loss_total", (1,), np.float64)
    write_grad = count is not None
    out_op, grad = output("out", out, pred.shape, pred) if write_grad else (None, placeholder(4))
    scale = mse_grad_scale(count) if write_grad else np.float32(0)
    threads = n * ch * th * tw
    _loss_kernel[-(-threads // 64), 64](pred.device, target.device, scale, grad, partials, tw,
                                        write_grad)
    fold_partials(partials, out64=total)
    sse = float(total.copy_to_host()[0])
    return sse, (result(out_op, grad, pred) if write_grad else None)


def mse_loss(pred, target):
    """(sse, count) with sse a Python float, bit-identical to the reference."""
    pred, target = _operands(pred, target)
    sse, _ = _sse_and_grad(pred, target, None, None)
    return sse, int(np.prod(pred.shape))


def mse_loss_and_grad(pred, target, count, out=None):
    """(sse, grad) from one pass over the pixels."""
    pred, target = _operands(pred, target)
    return _sse_and_grad(pred, target, count, out)


@cuda.jit(cache=True)
def _grad_kernel(pred, target, scale, grad):
    i = cuda.grid(1)
    if i < pred.size:
        grad[i] = (pred[i] - target[i]) * scale


def mse_grad(pred, target, count, out=None):
    """(pred - target) * float32(2 / count)."""
    pred, target = _operands(pred, target)
    out_op, grad = output("out", out, pred.shape, pred)
    size = int(np.prod(pred.shape))
    _grad_kernel[-(-size // 256), 256](pred.device.reshape(size), target.device.reshape(size),
                                       mse_grad_scale(count), grad.reshape(size))
    return result(out_op, grad, pred)
