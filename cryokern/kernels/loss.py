"""MSE loss (float64 SSE, numerics §4b) and its gradient (§5), fused in one pass over pixels."""
import numpy as np
from numba import cuda, float32, uint64

from ..contract import TILE_H, TILE_W, mse_grad_scale, tile_grid
from .arrays import (Operand, as_device_array, launch_stream, output, placeholder, result,
                     scratch)
from .reduce import fold_partials, fold_tiles


LOSS_THREADS = 128   # 16 blocks, so 16 tiles' chains, per SM (was 256; 64 no faster, v13)
TILE_SIZE = TILE_H * TILE_W          # a plain int here: numba needs a constant shared shape
PER_THREAD = TILE_SIZE // LOSS_THREADS
ROWS_PER_ROUND = LOSS_THREADS // TILE_W


@cuda.jit(device=True, inline="always")
def _squares_into(acc, d0, d1, d2, d3, d4, d5, d6, d7):
    """Eight links of the tile's chain: acc = fma(d, d, acc), in order."""
    acc = cuda.fma(d0, d0, acc)
    acc = cuda.fma(d1, d1, acc)
    acc = cuda.fma(d2, d2, acc)
    acc = cuda.fma(d3, d3, acc)
    acc = cuda.fma(d4, d4, acc)
    acc = cuda.fma(d5, d5, acc)
    acc = cuda.fma(d6, d6, acc)
    return cuda.fma(d7, d7, acc)


@cuda.jit(cache=True)
def _loss_kernel(pred, target, scale, grad, partials, channels, height, width, tiles_w,
                 write_grad):
    """One block per (image, plane, tile). Its threads compute the differences (and gradient)
    in parallel into shared memory, packed row-major over the tile's in-image pixels; then one
    thread runs the tile's chain of fma(d, d, acc) over them, the next eight values loaded
    while the current eight are added (the chain, not memory, was the limit: 4 cycles per
    fma against a shared-memory latency each eight). The planes are indexed flat (4-D
    indexing made the kernel issue-bound on integer work, ncu); indices are uint64 (no
    wrap-around, codegen.py)."""
    t = cuda.blockIdx.x
    nc = cuda.blockIdx.y
    n = nc // channels
    c = nc % channels
    r0 = (t // tiles_w) * TILE_H
    c0 = (t % tiles_w) * TILE_W
    rows = min(TILE_H, height - r0)
    cols = min(TILE_W, width - c0)
    ds = cuda.shared.array(TILE_SIZE, float32)
    tid = cuda.threadIdx.x
    row = tid // TILE_W              # the thread's pixels: rows row + k * ROWS_PER_ROUND
    col = tid % TILE_W
    first = nc * height * width + (r0 + row) * width + c0 + col
    step = ROWS_PER_ROUND * width
    # all loads before any store: grad may be pred, so the compiler cannot move a load above
    # an earlier store, and a loop of load-store pairs waited for memory once per pair
    d = cuda.local.array(PER_THREAD, float32)
    for k in range(PER_THREAD):
        if row + k * ROWS_PER_ROUND < rows and col < cols:
            i = uint64(first + k * step)
            d[k] = pred[i] - target[i]
    for k in range(PER_THREAD):
        r = row + k * ROWS_PER_ROUND
        if r < rows and col < cols:
            ds[uint64(r * cols + col)] = d[k]
            if write_grad:
                grad[uint64(first + k * step)] = d[k] * scale
    cuda.syncthreads()
    if tid != 0:
        return
    total = rows * cols
    groups = total // 8
    acc = float32(0)
    if groups > 0:
        d0, d1, d2, d3 = ds[uint64(0)], ds[uint64(1)], ds[uint64(2)], ds[uint64(3)]
        d4, d5, d6, d7 = ds[uint64(4)], ds[uint64(5)], ds[uint64(6)], ds[uint64(7)]
        for g in range(1, groups):
            i = uint64(g * 8)
            e0, e1, e2, e3 = ds[i], ds[i + uint64(1)], ds[i + uint64(2)], ds[i + uint64(3)]
            e4, e5, e6, e7 = ds[i + uint64(4)], ds[i + uint64(5)], ds[i + uint64(6)], \
                ds[i + uint64(7)]
            acc = _squares_into(acc, d0, d1, d2, d3, d4, d5, d6, d7)
            d0, d1, d2, d3, d4, d5, d6, d7 = e0, e1, e2, e3, e4, e5, e6, e7
        acc = _squares_into(acc, d0, d1, d2, d3, d4, d5, d6, d7)
    for i in range(groups * 8, total):
        d0 = ds[uint64(i)]
        acc = cuda.fma(d0, d0, acc)
    partials[n, c * (partials.shape[1] // channels) + t, 0] = acc


def _operands(pred, target):
    pred, target = Operand("pred", pred, 4), Operand("target", target, 4)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    return pred, target


def _pixel_pass(pred, target, count, out):
    """The pass over the pixels (the gradient only with a count): (tile partials, out operand,
    gradient array). Apart from the folds so that bench/kernels.py can time it alone."""
    n, ch, h, w = pred.shape
    th, tw = tile_grid(h, w)
    partials = scratch("loss_part", (n, ch * th * tw, 1), np.float32)
    write_grad = count is not None
    out_op, grad = output("out", out, pred.shape, pred) if write_grad else (None, placeholder(1))
    scale = mse_grad_scale(count) if write_grad else np.float32(0)
    size = n * ch * h * w
    _loss_kernel[(th * tw, n * ch), LOSS_THREADS, launch_stream()](
        pred.device.reshape(size), target.device.reshape(size), scale, grad.reshape(grad.size),
        partials, ch, h, w, tw, write_grad)
    return partials, out_op, grad


def _sse_and_grad(pred, target, count, out, image_sums=None):
    n = pred.shape[0]
    if image_sums is not None:      # checked before the pass, which may write over pred
        sums = as_device_array(image_sums)
        if sums.shape != (n,) or sums.dtype != np.float64:
            raise ValueError(f"image_sums must be float64 ({n},), got {sums.dtype} {sums.shape}")
    partials, out_op, grad = _pixel_pass(pred, target, count, out)
    if image_sums is not None:
        fold_tiles((partials, sums.reshape(n, 1)))
        sse = image_sums
    else:
        total = scratch("loss_total", (1,), np.float64)
        fold_partials(partials, out64=total)
        sse = float(total.copy_to_host()[0])
    return sse, (None if count is None else result(out_op, grad, pred))


def mse_loss(pred, target):
    """(sse, count) with sse a Python float, bit-identical to the reference."""
    pred, target = _operands(pred, target)
    sse, _ = _sse_and_grad(pred, target, None, None)
    return sse, int(np.prod(pred.shape))


def mse_loss_and_grad(pred, target, count, out=None, image_sums=None):
    """(sse, grad) from one pass over the pixels; with `image_sums` (float64 device, (N,)) each
    image's sum is left there, no host wait, for sum_images(), and image_sums is returned in
    place of the sse."""
    pred, target = _operands(pred, target)
    return _sse_and_grad(pred, target, count, out, image_sums)


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
    _grad_kernel[-(-size // 256), 256, launch_stream()](
        pred.device.reshape(size), target.device.reshape(size), mse_grad_scale(count),
        grad.reshape(size))
    return result(out_op, grad, pred)
