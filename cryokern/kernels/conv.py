"""3x3 'same' convolution kernels: forward (also backward-data) and tiled weight gradients.

Each follows docs/numerics.md exactly; the comments say which section. Kernels are specialized
on channel counts at compile time (closures over ints, which numba caches on disk).
"""
from functools import lru_cache

import numpy as np
from numba import cuda, float32

from ..contract import TILE_H, TILE_W, tile_grid
from .arrays import Operand, output, placeholder, result, scratch
from .reduce import fold_partials

# Forward: a block computes BH x BW output pixels for `group` (at most MAX_GROUP) output
# channels; each thread one column of ROWS consecutive rows. The input tile (with halo) is staged
# in shared memory one input channel at a time.
BW, ROWS, TY = 32, 4, 4
BH = ROWS * TY
MAX_GROUP = 8


@lru_cache(maxsize=None)
def _forward_kernel(cin, group, relu, masked, transposed):
    """Section 1 (transposed=False) or section 2 (transposed=True: w read as w'[ci,o,2-a,2-b])."""
    GROUP = group
    nw = GROUP * cin * 9
    n_acc = GROUP * ROWS
    xs_shape = (BH + 2, BW + 2)

    @cuda.jit(cache=True)
    def kernel(x, w, b, mask, y):
        n_groups = (y.shape[1] + GROUP - 1) // GROUP
        n = cuda.blockIdx.z // n_groups
        o0 = (cuda.blockIdx.z % n_groups) * GROUP
        cout = y.shape[1]
        h_img, w_img = x.shape[2], x.shape[3]
        h0 = cuda.blockIdx.y * BH
        c0 = cuda.blockIdx.x * BW
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * BW + tx
        ws = cuda.shared.array(nw, float32)
        xs = cuda.shared.array(xs_shape, float32)
        for i in range(tid, nw, BW * TY):
            o = o0 + i // (cin * 9)
            ci = (i // 9) % cin
            k = i % 9
            if o >= cout:
                ws[i] = float32(0)
            elif transposed:
                ws[i] = w[ci, o, 2 - k // 3, 2 - k % 3]
            else:
                ws[i] = w[o, ci, k // 3, k % 3]
        col = c0 + tx
        active = col < w_img and h0 + ty * ROWS < h_img
        acc = cuda.local.array(n_acc, float32)
        for g in range(GROUP):
            start = b[o0 + g] if o0 + g < cout else float32(0)
            for p in range(ROWS):
                acc[g * ROWS + p] = start
        for ci in range(cin):
            cuda.syncthreads()
            for i in range(tid, (BH + 2) * (BW + 2), BW * TY):
                r = i // (BW + 2)
                c = i % (BW + 2)
                hh = h0 + r - 1
                cc = c0 + c - 1
                if 0 <= hh < h_img and 0 <= cc < w_img:
                    xs[r, c] = x[n, ci, hh, cc]
                else:
                    xs[r, c] = float32(0)
            cuda.syncthreads()
            if not active:
                continue
            # rows r of the thread's window, kx inner: for each output row p, ky = r - p rises
            # with r, so every output sees its taps in (ky, kx) order.
            for r in range(ROWS + 2):
                for kx in range(3):
                    v = xs[ty * ROWS + r, tx + kx]
                    for p in range(ROWS):
                        ky = r - p
                        if ky >= 0 and ky < 3:
                            for g in range(GROUP):
                                acc[g * ROWS + p] = cuda.fma(
                                    v, ws[(g * cin + ci) * 9 + ky * 3 + kx], acc[g * ROWS + p])
        if active:
            for p in range(ROWS):
                row = h0 + ty * ROWS + p
                if row < h_img:
                    for g in range(GROUP):
                        o = o0 + g
                        if o < cout:
                            v = acc[g * ROWS + p]
                            if relu and v <= float32(0):
                                v = float32(0)
                            if masked and not mask[n, o, row, col] > float32(0):
                                v = float32(0)
                            y[n, o, row, col] = v

    return kernel


def _launch_forward(x, w, b, y, relu, mask, transposed):
    n, cin, h, wd = x.shape
    cout = y.shape[1]
    group = min(MAX_GROUP, cout)
    grid = (-(-wd // BW), -(-h // BH), n * -(-cout // group))
    kernel = _forward_kernel(cin, group, relu, mask is not None, transposed)
    kernel[grid, (BW, TY)](x, w, b, placeholder(4) if mask is None else mask, y)


def _check_conv(x, w, cin_axis):
    if w.shape[2:] != (3, 3) or w.shape[cin_axis] != x.shape[1]:
        raise ValueError(f"weights of shape {w.shape} do not fit {x.shape[1]} input channels "
                         "(OIHW, 3x3)")


def conv2d_forward(x, w, b, relu=False, out=None):
    """Forward convolution with fused bias and optional ReLU (numerics §1)."""
    x, w, b = Operand("x", x, 4), Operand("w", w, 4), Operand("b", b, 1)
    _check_conv(x, w, 1)
    if b.shape != (w.shape[0],):
        raise ValueError(f"bias of shape {b.shape} does not fit {w.shape[0]} output channels")
    out_op, y = output("out", out, (x.shape[0], w.shape[0]) + x.shape[2:], x)
    _launch_forward(x.device, w.device, b.device, y, relu, None, transposed=False)
    return result(out_op, y, x)


def conv2d_backward_data(gy, w, relu_output=None, out=None):
    """Gradient w.r.t. the input, with the ReLU mask of relu_output folded in (numerics §2)."""
    gy, w = Operand("gy", gy, 4), Operand("w", w, 4)
    _check_conv(gy, w, 0)
    shape = (gy.shape[0], w.shape[1]) + gy.shape[2:]
    mask = None
    if relu_output is not None:
        mask = Operand("relu_output", relu_output, 4)
        if mask.shape != shape:
            raise ValueError(f"relu_output has shape {mask.shape}, expected {shape}")
    out_op, gx = output("out", out, shape, gy)
    zero_bias = scratch("zero_bias", (w.shape[1],), np.float32)
    _zero[-(-zero_bias.size // 128), 128](zero_bias)
    _launch_forward(gy.device, w.device, zero_bias, gx, False,
                    None if mask is None else mask.device, transposed=True)
    return result(out_op, gx, gy)


@cuda.jit(cache=True)
def _zero(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = float32(0)


def relu_backward(gy, y, out=None):
    """gy where y > 0, else +0 (numerics §3)."""
    gy, y = Operand("gy", gy, 4), Operand("y", y, 4)
    if gy.shape != y.shape:
        raise ValueError(f"gy {gy.shape} and y {y.shape} differ in shape")
    out_op, gx = output("out", out, gy.shape, gy)
    size = int(np.prod(gy.shape))
    _relu_mask[-(-size // 256), 256](gy.device.reshape(size), y.device.reshape(size),
                                     gx.reshape(size))
    return result(out_op, gx, gy)


@cuda.jit(cache=True)
def _relu_mask(gy, y, gx):
    i = cuda.grid(1)
    if i < gy.size:
        gx[i] = gy[i] if y[i] > float32(0) else float32(0)


# Weight gradients (numerics §4a): one block per (image, tile); thread (ci, o-group) holds
# OGW x 9 weight chains in registers, plus OGW bias chains when ci == 0, and walks the tile's
# in-image pixels row-major with a sliding 3x3 window. Rows are staged in shared memory.
OGW = 4


@lru_cache(maxsize=None)
def _weights_kernel(cin, cout):
    n_og = -(-cout // OGW)
    threads = cin * n_og
    xs_shape = (cin, 3, TILE_W + 2)
    gs_shape = (cout, TILE_W)
    n_acc = OGW * 9

    @cuda.jit(cache=True)
    def kernel(gy, x, gw_part, gb_part, tiles_w):
        n = cuda.blockIdx.y
        t = cuda.blockIdx.x
        ti = t // tiles_w
        tj = t % tiles_w
        h_img, w_img = x.shape[2], x.shape[3]
        r0 = ti * TILE_H
        c0 = tj * TILE_W
        rows = min(TILE_H, h_img - r0)
        cols = min(TILE_W, w_img - c0)
        tid = cuda.threadIdx.x
        ci = tid % cin
        og = tid // cin
        xs = cuda.shared.array(xs_shape, float32)
        gs = cuda.shared.array(gs_shape, float32)
        acc = cuda.local.array(n_acc, float32)
        bacc = cuda.local.array(OGW, float32)
        for i in range(OGW * 9):
            acc[i] = float32(0)
        for g in range(OGW):
            bacc[g] = float32(0)
        for r in range(rows):
            cuda.syncthreads()
            for i in range(tid, cin * 3 * (TILE_W + 2), threads):
                c = i % (TILE_W + 2)
                k = (i // (TILE_W + 2)) % 3
                cc = i // (3 * (TILE_W + 2))
                hh = r0 + r + k - 1
                col = c0 + c - 1
                if 0 <= hh < h_img and 0 <= col < w_img:
                    xs[cc, k, c] = x[n, cc, hh, col]
                else:
                    xs[cc, k, c] = float32(0)
            for i in range(tid, cout * TILE_W, threads):
                c = i % TILE_W
                o = i // TILE_W
                gs[o, c] = gy[n, o, r0 + r, c0 + c] if c < cols else float32(0)
            cuda.syncthreads()
            for c in range(cols):
                for g in range(OGW):
                    o = og * OGW + g
                    if o < cout:
                        gv = gs[o, c]
                        for ky in range(3):
                            for kx in range(3):
                                acc[g * 9 + ky * 3 + kx] = cuda.fma(
                                    gv, xs[ci, ky, c + kx], acc[g * 9 + ky * 3 + kx])
                        if ci == 0:
                            bacc[g] = bacc[g] + gv
        for g in range(OGW):
            o = og * OGW + g
            if o < cout:
                for k in range(9):
                    gw_part[n, t, (o * cin + ci) * 9 + k] = acc[g * 9 + k]
                if ci == 0:
                    gb_part[n, t, o] = bacc[g]

    return kernel, threads


def conv2d_backward_weights(gy, x, out=None):
    """(gw, gb): per-tile float32 chains, folded in float64 per image, then in image order."""
    gy, x = Operand("gy", gy, 4), Operand("x", x, 4)
    n, cout, h, wd = gy.shape
    if x.shape[0] != n or x.shape[2:] != (h, wd):
        raise ValueError(f"gy {gy.shape} and x {x.shape} differ in batch or image size")
    cin = x.shape[1]
    th, tw = tile_grid(h, wd)
    gw_part = scratch("gw_part", (n, th * tw, cout * cin * 9), np.float32)
    gb_part = scratch("gb_part", (n, th * tw, cout), np.float32)
    kernel, threads = _weights_kernel(cin, cout)
    kernel[(th * tw, n), threads](gy.device, x.device, gw_part, gb_part, tw)
    if out is None:
        gw_op, gw = output("gw", None, (cout, cin, 3, 3), gy)
        gb_op, gb = output("gb", None, (cout,), gy)
    else:
        gw_op, gw = output("out[0]", out[0], (cout, cin, 3, 3), gy)
        gb_op, gb = output("out[1]", out[1], (cout,), gy)
    fold_partials(gw_part, gw.reshape(gw.size))
    fold_partials(gb_part, gb)
    return result(gw_op, gw, gy), result(gb_op, gb, gy)
