"""3x3 'same' convolutions, the ReLU mask and the weight gradients, compiled for the CPU.

The chains and tile orders are the contract's (docs/numerics.md §1-4; §12's phase form for a
convolution of an upsampled input, which reads it in place); the loops are arranged so that
only independent outputs run side by side: rows of output images on the cores and columns of a
row in SIMD lanes (convolutions), tiles on the cores and the (o, ci, ky, kx) chains of a tile
in SIMD lanes (weight gradients), each chain visiting its terms in the contract's order.
"""
import numpy as np
from numba import njit, prange

from ..contract import (TILE_H, TILE_W, concatenated_channels, leaky_slope as slope_f32,
                        phase_weights, tile_grid)
from .activation import (LEAKY, PLAIN, RELU, ZERO, activated, mask_args, mask_elements,
                         masked)
from .arrays import Output, operand, same_elements
from .fma import fma32
from .reduce import finish_reduction, fold_tiles


@njit(cache=True, inline="always")
def _row_taps(acc, rows, w, o, ci):
    """acc[j] = chain over ky, kx (ascending) of fma(rows[ky, j + kx], w[o, ci, ky, kx]) for
    every column j: rows are input rows r - 1, r, r + 1 of channel ci with a +0 column on
    either side (and +0 rows above and below the image), so that the taps of the padding
    take part in the chain and the loop has no branch. The columns' chains are independent
    and run in SIMD lanes; the nine weights are read once (not from memory that the stores
    to acc might alias)."""
    m = w[o, ci]
    k0, k1, k2, k3, k4, k5, k6, k7, k8 = (m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2],
                                          m[2, 0], m[2, 1], m[2, 2])
    above, here, below = rows[0], rows[1], rows[2]
    for j in range(acc.size):
        a = fma32(above[j], k0, acc[j])
        a = fma32(above[j + 1], k1, a)
        a = fma32(above[j + 2], k2, a)
        a = fma32(here[j], k3, a)
        a = fma32(here[j + 1], k4, a)
        a = fma32(here[j + 2], k5, a)
        a = fma32(below[j], k6, a)
        a = fma32(below[j + 1], k7, a)
        acc[j] = fma32(below[j + 2], k8, a)


@njit(cache=True, inline="always")
def _store_row(acc, dst, act, slope, masking, mask):
    """The finished row through the activation act (numerics §1, §9a), or, when masking, through
    act's gradient mask (§2, §9a) given by mask, the activation's output (it may be dst itself:
    each element is read, then written). One loop per case, each with a constant act, so that
    every loop stays branch-free and in SIMD lanes."""
    if masking:
        if act == LEAKY:
            for j in range(acc.size):
                dst[j] = masked(acc[j], mask[j], LEAKY, slope)
        else:
            for j in range(acc.size):
                dst[j] = masked(acc[j], mask[j], RELU, slope)
    elif act == RELU:
        for j in range(acc.size):
            dst[j] = activated(acc[j], RELU, slope)
    elif act == LEAKY:
        for j in range(acc.size):
            dst[j] = activated(acc[j], LEAKY, slope)
    else:
        for j in range(acc.size):
            dst[j] = acc[j]


@njit(parallel=True, cache=True)
def _conv_rows(x, x2, w, b, act, slope, masking, mask, out, out2, resume, start):
    """out[n, o, h] for every image row on the cores; within a row, the columns' chains side
    by side: chain from b[o] (or, when resuming, from start[n, o, h]: chains begun by
    _phase_rows) over ci, ky, kx (numerics §1), then the activation or, when masking, the
    mask. The input channels are x's followed by x2's, the output channels out's followed by
    out2's.

    Every call has the same argument types, so that numba compiles it once (it compiles one
    specialization per combination of None and arrays: 3-4 s each on a cold cache, 2 cores):
    without a second input x2 is x, without a second output out2 is out, without a mask mask
    is out, without a start start is out; the channel counts, `masking` and `resume` then
    never reach them. x's and x2's rows are copied by loops of their own (a choice per
    channel was 10-15 % slower: bench/NOTES.md, cdemo)."""
    n, x_channels, h, width = x.shape
    cout, cin = w.shape[0], w.shape[1]
    out_channels = out.shape[1]
    for job in prange(n * h):
        img = job // h
        row = job - img * h
        rows = np.zeros((cin, 3, width + 2), np.float32)    # input rows, zero-padded
        for ky in range(3):
            y = row + ky - 1
            if 0 <= y < h:
                for ci in range(x_channels):
                    src, dst = x[img, ci, y], rows[ci, ky]
                    for j in range(width):
                        dst[j + 1] = src[j]
                for ci in range(x_channels, cin):
                    src, dst = x2[img, ci - x_channels, y], rows[ci, ky]
                    for j in range(width):
                        dst[j + 1] = src[j]
        acc = np.empty(width, np.float32)
        for o in range(cout):
            if resume:      # (an element loop: a slice copy compiles one more message)
                begun = start[img, o, row]
                for j in range(width):
                    acc[j] = begun[j]
            else:
                acc[:] = b[o]
            for ci in range(cin):
                _row_taps(acc, rows[ci], w, o, ci)
            if o < out_channels:
                _store_row(acc, out[img, o, row], act, slope, masking, mask[img, o, row])
            else:       # a concatenation's gradient (never masked)
                _store_row(acc, out2[img, o - out_channels, row], act, slope, False, acc)


@njit(cache=True, inline="always")
def _four_taps(v00, v01, v10, v11, k00, k01, k10, k11, acc):
    """acc continued by v00 * k00, v01 * k01, v10 * k10, v11 * k11 in that order (a, then b
    ascending: one output pixel's phase taps of one input channel)."""
    return fma32(v11, k11, fma32(v10, k10, fma32(v01, k01, fma32(v00, k00, acc))))


@njit(cache=True, inline="always")
def _phase_taps(acc, rows, c, d):
    """acc[0][j] and acc[1][j], the chains of output columns 2j and 2j + 1 of one output
    channel, and acc[2][j], acc[3][j] those of another, each continued by its four phase taps,
    a then b ascending (numerics §12): rows are input rows i - 1 + p + a (a = 0, 1) with a +0
    column on either side; c and d the channels' phase weights [o, ci, p] ([q, a, b]). Column
    2j reads input columns j - 1 + b (padded j + b), column 2j + 1 columns j + b. The four
    chains in one branch-free loop load each input value once: 1.6x faster than one channel's
    two columns (1 x 48 x 256 x 256 on 2 cores)."""
    c0, c1, c2, c3 = c[0, 0, 0], c[0, 0, 1], c[0, 1, 0], c[0, 1, 1]
    c4, c5, c6, c7 = c[1, 0, 0], c[1, 0, 1], c[1, 1, 0], c[1, 1, 1]
    d0, d1, d2, d3 = d[0, 0, 0], d[0, 0, 1], d[0, 1, 0], d[0, 1, 1]
    d4, d5, d6, d7 = d[1, 0, 0], d[1, 0, 1], d[1, 1, 0], d[1, 1, 1]
    top, bottom = rows[0], rows[1]
    even, odd, even2, odd2 = acc[0], acc[1], acc[2], acc[3]
    for j in range(even.size):
        t0, t1, t2 = top[j], top[j + 1], top[j + 2]
        u0, u1, u2 = bottom[j], bottom[j + 1], bottom[j + 2]
        even[j] = _four_taps(t0, t1, u0, u1, c0, c1, c2, c3, even[j])
        odd[j] = _four_taps(t1, t2, u1, u2, c4, c5, c6, c7, odd[j])
        even2[j] = _four_taps(t0, t1, u0, u1, d0, d1, d2, d3, even2[j])
        odd2[j] = _four_taps(t1, t2, u1, u2, d4, d5, d6, d7, odd2[j])


@njit(parallel=True, cache=True)
def _phase_rows(x, c, b, out):
    """out[n, o, r] = the chains from b[o] over x's channels of the convolution of x
    nearest-upsampled, in phase form (numerics §12; c = phase_weights, (Co, Ci, 2, 2, 2, 2)),
    for every output row r on the cores (its parity p = r & 1 fixed per row), to be continued
    by _conv_rows over x2's channels: four fmas a channel and pixel where the upsampled copy
    would take nine, and no copy. Output channels in pairs (an odd count's last one twice,
    stored once)."""
    n, cin, h, width = x.shape
    cout = c.shape[0]
    for job in prange(n * 2 * h):
        img = job // (2 * h)
        r = job - img * (2 * h)
        i, p = r >> 1, r & 1
        rows = np.zeros((cin, 2, width + 2), np.float32)    # input rows, zero-padded
        for a in range(2):
            y = i - 1 + p + a
            if 0 <= y < h:
                for ci in range(cin):
                    src, dst = x[img, ci, y], rows[ci, a]
                    for j in range(width):
                        dst[j + 1] = src[j]
        acc = np.empty((4, width), np.float32)      # (even, odd columns) of o, then of o2
        for o in range(0, cout, 2):
            o2 = min(o + 1, cout - 1)
            acc[:2] = b[o]
            acc[2:] = b[o2]
            for ci in range(cin):
                _phase_taps(acc, rows[ci], c[o, ci, p], c[o2, ci, p])
            for k in range(o2 - o + 1):
                dst = out[img, o + k, r]
                for j in range(width):
                    dst[2 * j] = acc[2 * k, j]
                    dst[2 * j + 1] = acc[2 * k + 1, j]


def _check_conv(x, w, cin_axis, channels=None):
    channels = x.shape[1] if channels is None else channels
    if w.shape[2:] != (3, 3) or w.shape[cin_axis] != channels:
        raise ValueError(f"weights of shape {w.shape} do not fit {channels} input channels "
                         f"(OIHW, 3x3)")


def _second_input(x, x2, upsampled=False):
    """x2 checked beside x (same batch and image size, or twice x's with `upsampled`), or
    None; and the channels of both together (numerics §12)."""
    x2 = None if x2 is None else operand("x2", x2, 4)
    return x2, concatenated_channels(x.shape, None if x2 is None else x2.shape, upsampled)


def _activation(relu, leaky_slope):
    if relu and leaky_slope is not None:
        raise ValueError("relu and leaky_slope exclude each other")
    if leaky_slope is not None:
        return LEAKY, slope_f32(leaky_slope)
    return (RELU if relu else PLAIN), ZERO


def conv2d_forward(x, w, b, relu=False, out=None, leaky_slope=None, x2=None, upsampled=False):
    """y[n,o] = chain from b[o] of fma over ci, ky, kx (ascending) of
    x[n,ci,h+ky-1,w+kx-1] * w[o,ci,ky,kx], then ReLU or LeakyReLU if asked (numerics §1, §9a).
    With x2, x is the concatenation of x's channels and x2's (§12), never copied; with
    `upsampled`, of x nearest-upsampled, x's part of the chains in phase form (§12:
    _phase_rows), then x2's continued by _conv_rows."""
    act, slope = _activation(relu, leaky_slope)
    x, w, b = operand("x", x, 4), operand("w", w, 4), operand("b", b, 1)
    x2, cin = _second_input(x, x2, upsampled)
    _check_conv(x, w, 1, cin)
    if b.shape != (w.shape[0],):
        raise ValueError(f"bias of shape {b.shape} does not fit {w.shape[0]} output channels")
    n, _, h, width = x.shape if x2 is None else x2.shape
    inputs = (x, w, b) if x2 is None else (x, x2, w, b)
    dst = Output(out, (n, w.shape[0], h, width), inputs=inputs)
    if upsampled:       # x's chains first, into dst, continued there over x2's channels
        split = x.shape[1]
        _phase_rows(x, phase_weights(w[:, :split]), b, dst.array)
        _conv_rows(x2, x2, np.ascontiguousarray(w[:, split:]), b, act, slope, False, dst.array,
                   dst.array, dst.array, True, dst.array)
    else:
        _conv_rows(x, x if x2 is None else x2, w, b, act, slope, False, dst.array, dst.array,
                   dst.array, False, dst.array)
    return dst.done()


def conv2d_backward_data(gy, w, relu_output=None, out=None, leaky_slope=None, split=None):
    """dL/dx: the forward chain applied to gy with the flipped, transposed kernel, from +0, and
    masked by relu_output > 0 when given (ReLU's mask; with leaky_slope, LeakyReLU's: numerics
    §2, §9a); `out` may be relu_output itself. With `split` (no mask), the gradient of a
    concatenation: the pair of its input channels below `split` and the rest (`out` a pair; its
    second None: the rest is not computed, and None in its place)."""
    gy, w = operand("gy", gy, 4), operand("w", w, 4)
    _check_conv(gy, w, 0)
    n, _, h, width = gy.shape
    cin = w.shape[1]
    mask, act, slope = mask_args(relu_output, leaky_slope, (n, cin, h, width))
    flipped = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    zero_bias = np.zeros(cin, np.float32)
    if split is None:
        inputs = (gy, w) if mask is None or same_elements(out, mask) else (gy, w, mask)
        dst = Output(out, (n, cin, h, width), inputs=inputs)
        _conv_rows(gy, gy, flipped, zero_bias, act, slope, mask is not None,
                   dst.array if mask is None else mask, dst.array, dst.array, False, dst.array)
        return dst.done()
    if mask is not None:
        raise ValueError("the gradient of a concatenation is not masked")
    if not 0 < split < cin:
        raise ValueError(f"cannot split {cin} input channels after channel {split}")
    if out is not None and out[1] is None:
        first = Output(out[0], (n, split, h, width), inputs=(gy, w))
        _conv_rows(gy, gy, np.ascontiguousarray(flipped[:split]), zero_bias[:split], PLAIN,
                   ZERO, False, first.array, first.array, first.array, False, first.array)
        return first.done(), None
    parts = [Output(None if out is None else out[k], shape, inputs=(gy, w))
             for k, shape in enumerate(((n, split, h, width), (n, cin - split, h, width)))]
    _conv_rows(gy, gy, flipped, zero_bias, PLAIN, ZERO, False, parts[0].array, parts[0].array,
               parts[1].array, False, parts[0].array)
    return tuple(part.done() for part in parts)


def relu_backward(gy, y, out=None):
    """gy where the forward output y > 0, else +0 (numerics §3)."""
    gy, y = operand("gy", gy, 4), operand("y", y, 4)
    if gy.shape != y.shape:
        raise ValueError(f"gy {gy.shape} and y {y.shape} differ in shape")
    dst = Output(out, gy.shape)        # elementwise: out may be gy or y
    mask_elements(gy.reshape(-1), y.reshape(-1), RELU, ZERO, dst.array.reshape(-1))
    return dst.done()


@njit(cache=True, inline="always")
def _tile_row_patches(x, x2, img, r, c0, cols, rows, patches):
    """patches[c, ci*9 + ky*3 + kx] = x[img, ci, r+ky-1, c0+c+kx-1] (+0 outside the image)
    for the `cols` pixels of one tile row starting at column c0, through `rows`: the input
    rows r-1..r+1 of columns c0-1..c0+cols, zero-padded (so that no loop has a branch). The
    channels ci are x's followed by x2's (rows has as many; x2 is x when there are none), each
    array's copied by a loop of its own, with numba's slice copy: element loops made the
    weight gradients ~10 % slower (bench/NOTES.md, cdemo), for ~1 s more compiling once (the
    slice assignment's shape-mismatch message)."""
    x_channels, h, width = x.shape[1], x.shape[2], x.shape[3]
    cin = rows.shape[0]
    first, stop = max(c0 - 1, 0), min(c0 + cols + 1, width)
    for ci in range(cin):
        for ky in range(3):
            rows[ci, ky, :] = ZERO
    for ky in range(3):
        y = r + ky - 1
        if 0 <= y < h:
            for ci in range(x_channels):
                rows[ci, ky, first - c0 + 1:stop - c0 + 1] = x[img, ci, y, first:stop]
            for ci in range(x_channels, cin):
                rows[ci, ky, first - c0 + 1:stop - c0 + 1] = \
                    x2[img, ci - x_channels, y, first:stop]
    for ci in range(cin):
        for ky in range(3):
            src = rows[ci, ky]
            for kx in range(3):
                q = ci * 9 + ky * 3 + kx
                for c in range(cols):
                    patches[c, q] = src[c + kx]


@njit(parallel=True, cache=True)
def _weight_partials(gy, x, x2, tile_h, tile_w, tw, pw, pb):
    """Each tile's float32 chains (numerics §4a step 2; tiles of tile_h x tile_w pixels, tw of
    them a row), tiles on the cores: pw[n, t, o, q]
    from +0 over the tile's pixels in row-major order of fma(gy[n,o,h,w], x[n,ci,h+ky-1,
    w+kx-1]) (q = ci*9 + ky*3 + kx), and pb[n, t, o] the chain of additions of gy. Four pixels
    at a time per accumulator (still in pixel order), so that each is loaded once per four
    fmas. One compiled specialization for every call: x2 is x when there is no second
    input."""
    n, cout, h, width = gy.shape
    cin = pw.shape[3] // 9
    q_count = cin * 9
    th = pw.shape[1] // tw
    for job in prange(n * th * tw):
        img = job // (th * tw)
        t = job - img * (th * tw)
        ti = t // tw
        c0 = (t - ti * tw) * tile_w
        cols = min(tile_w, width - c0)
        acc = np.zeros((cout, q_count), np.float32)
        acc_b = np.zeros(cout, np.float32)
        patches = np.empty((tile_w, q_count), np.float32)
        rows = np.empty((cin, 3, tile_w + 2), np.float32)
        g = np.empty(4, np.float32)
        for r in range(ti * tile_h, min(ti * tile_h + tile_h, h)):
            _tile_row_patches(x, x2, img, r, c0, cols, rows, patches)
            for o in range(cout):
                grow = gy[img, o, r]
                c = 0
                while c + 4 <= cols:
                    for k in range(4):
                        g[k] = grow[c0 + c + k]
                    for q in range(q_count):
                        a = fma32(g[0], patches[c, q], acc[o, q])
                        a = fma32(g[1], patches[c + 1, q], a)
                        a = fma32(g[2], patches[c + 2, q], a)
                        acc[o, q] = fma32(g[3], patches[c + 3, q], a)
                    c += 4
                while c < cols:
                    gv = grow[c0 + c]
                    for q in range(q_count):
                        acc[o, q] = fma32(gv, patches[c, q], acc[o, q])
                    c += 1
                b = acc_b[o]
                for c in range(cols):
                    b = b + grow[c0 + c]
                acc_b[o] = b
        for o in range(cout):       # element by element: a 2-D slice assignment compiles one
            pb[img, t, o] = acc_b[o]        # more shape-mismatch message (when cold)
            for q in range(q_count):
                pw[img, t, o, q] = acc[o, q]


def conv2d_backward_weights(gy, x, out=None, image_sums=None, x2=None):
    """(dL/dw, dL/db): tiled float32 chains per image, combined in float64 (numerics §4a).
    With `image_sums` (float64 arrays (N, Co, Ci, 3, 3) and (N, Co)) each image's float64 sum
    is written there for sum_images(), and image_sums is returned. With x2, x is the
    concatenation of x's channels and x2's (§12), never copied."""
    gy, x = operand("gy", gy, 4), operand("x", x, 4)
    n, cout, h, width = gy.shape
    if x.shape[0] != n or x.shape[2:] != (h, width):
        raise ValueError(f"gy {gy.shape} and x {x.shape} differ in batch or image size")
    x2, cin = _second_input(x, x2)
    th, tw = tile_grid(h, width)
    pw = np.empty((n, th * tw, cout, cin * 9), np.float32)
    pb = np.empty((n, th * tw, cout), np.float32)
    _weight_partials(gy, x, x if x2 is None else x2, TILE_H, TILE_W, tw, pw, pb)
    images = (fold_tiles(pw).reshape(n, cout, cin, 3, 3), fold_tiles(pb))
    if image_sums is not None:
        image_sums[0][...] = images[0]
        image_sums[1][...] = images[1]
        return image_sums
    gw = finish_reduction(images[0], np.float32)
    gb = finish_reduction(images[1], np.float32)
    if out is None:
        return gw, gb
    out[0][...] = gw
    out[1][...] = gb
    return out
