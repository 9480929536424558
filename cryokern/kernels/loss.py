"""MSE loss (float64 SSE, numerics §4b) and its gradient (§5), fused in one pass over pixels."""

import numpy as np
from numba import cuda

from ..contract import TILE_H, TILE_W, mse_grad_scale, tile_grid
from .arrays import (Operand, as_device_array, launch_stream, output, placeholder, result,
                     scratch)
from .codegen import Source, generator, load_module
from .reduce import fold_partials, fold_tiles


TILES_PER_WARP = 2     # side by side in one band, their chains on lanes 0 and 1 (v22: 4 and 1
                       # slower)
AHEAD = 2              # rows whose loads are in flight while the warp works on a row
CHAIN_GROUP = 8        # shared-memory loads issued before their fmas, in a full tile row
ROW_PAD = 4            # floats after each tile row in shared memory: the chain lanes' loads
                       # fall in different banks, and stay 16-byte aligned (LDS.128)
LANES = 32


@generator
def _loss_kernel():
    """The pass over the pixels: one warp (a block of 32 threads) per item, TILES_PER_WARP
    tiles side by side in one band of one plane. Generated.

    Why so: a tile's chain (1024 dependent fmas, 4 cycles each) is the slowest path, and
    memory must never wait for it. The warp streams the band's rows, AHEAD rows a turn, the
    next turn's rows loading while it works on this turn's; each row's differences (and
    gradient) go out coalesced and into shared memory, tile by tile; then the first
    TILES_PER_WARP lanes each add their tile's part of the row to their chain. So a lane's
    chain runs while the next rows load, one fma instruction serves every tile of the item,
    and no block-wide barrier holds other warps: a block is one warp, whose barrier is all
    the synchronisation needed (and which the simulator runs; it has no syncwarp). Rows in shared memory alternate between two slots; a slot is
    written again only after the barrier that follows its chains.

    An earlier kernel (v21) staged a whole tile per 128-thread block and ran its chain on one
    thread after the block's loads: memory then stood idle while the chains ran."""
    tiles, ahead = TILES_PER_WARP, AHEAD
    columns = tiles * TILE_W
    per_lane = columns // LANES
    stride = TILE_W + ROW_PAD                  # a tile row in shared memory
    slot = tiles * stride                      # a row of the item in shared memory
    src = Source().kernel("pred, target, scale, grad, partials, channels, height, width, "
                          "tiles_w, groups, bands, write_grad")
    src("item = cuda.blockIdx.x")
    src("lane = cuda.threadIdx.x")
    src("group = item % groups")
    src("band = (item // groups) % bands")
    src("plane = item // (groups * bands)")
    src(f"rows = min({TILE_H}, height - band * {TILE_H})")
    src(f"cols = min({columns}, width - group * {columns})")
    src(f"buf = cuda.shared.array({2 * slot}, float32)")
    src(f"first = uint64((plane * height + band * {TILE_H}) * width + group * {columns} + lane)")
    src("step = uint64(width)")
    for i in range(per_lane):
        src(f"ok{i} = lane + {LANES * i} < cols")
    src(f"chain_cols = min({TILE_W}, cols - {TILE_W} * lane) if lane < {tiles} else 0")
    src("acc = float32(0)")

    def load(rows_from, regs):
        for j in range(ahead):
            src(f"at = first + uint64({rows_from} + {j}) * step")
            src(f"live = {rows_from} + {j} < rows")
            for i in range(per_lane):
                for name, array in (("p", "pred"), ("t", "target")):
                    src(f"{regs}{name}{j}_{i} = {array}[at + uint64({LANES * i})] "
                        f"if live and ok{i} else float32(0)")

    load("0", "cur")
    src(f"for r in range(0, {TILE_H}, {ahead}):").indent()
    load(f"r + {ahead}", "nxt")
    for j in range(ahead):
        src(f"base = uint64((r + {j}) % 2 * {slot})")
        src(f"if r + {j} < rows:").indent()
        src(f"at = first + uint64(r + {j}) * step")
        for i in range(per_lane):
            spot = (LANES * i) // TILE_W * stride + (LANES * i) % TILE_W
            src(f"d = curp{j}_{i} - curt{j}_{i}")
            src(f"if ok{i}:").indent()
            src(f"buf[base + uint64({spot}) + uint64(lane)] = d")
            src("if write_grad:").indent()
            src(f"grad[at + uint64({LANES * i})] = d * scale").dedent().dedent()
        src.dedent()
        src("cuda.syncthreads()")
        src(f"if r + {j} < rows and chain_cols > 0:").indent()
        src(f"row = base + uint64(lane * {stride})")
        src(f"if chain_cols == {TILE_W}:").indent()     # a full row, eight loads ahead
        group = range(CHAIN_GROUP)
        src(", ".join(f"a{u}" for u in group) + " = " +
            ", ".join(f"buf[row + uint64({u})]" for u in group))
        src(f"for k in range({CHAIN_GROUP}, {TILE_W}, {CHAIN_GROUP}):").indent()
        src(", ".join(f"b{u}" for u in group) + " = " +
            ", ".join(f"buf[row + uint64(k + {u})]" for u in group))
        for u in group:
            src(f"acc = fma(a{u}, a{u}, acc)")
        src(", ".join(f"a{u}" for u in group) + " = " + ", ".join(f"b{u}" for u in group))
        src.dedent()
        for u in group:
            src(f"acc = fma(a{u}, a{u}, acc)")
        src.dedent()
        src("else:").indent()
        src("for k in range(chain_cols):").indent()
        src("v = buf[row + uint64(k)]")
        src("acc = fma(v, v, acc)").dedent().dedent().dedent()
    for j in range(ahead):
        for i in range(per_lane):
            for name in "pt":
                src(f"cur{name}{j}_{i} = nxt{name}{j}_{i}")
    src.dedent()
    src("if chain_cols > 0:").indent()
    src("n = plane // channels")
    src(f"tile = (plane % channels) * (partials.shape[1] // channels) + band * tiles_w "
        f"+ group * {tiles} + lane")
    src("partials[uint64(n), uint64(tile), uint64(0)] = acc")
    return load_module(f"loss_{tiles}_{ahead}", src.text()).kernel


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
    groups = -(-tw // TILES_PER_WARP)
    _loss_kernel()[n * ch * th * groups, LANES, launch_stream()](
        pred.device.reshape(size), target.device.reshape(size), scale, grad.reshape(grad.size),
        partials, ch, h, w, tw, groups, th, write_grad)
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
