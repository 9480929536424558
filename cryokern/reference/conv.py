"""3x3 'same' convolutions with their ReLU/LeakyReLU epilogues and masks, as fixed float32 fma
chains (docs/numerics.md)."""
import numpy as np

from ..contract import (TILE_H, TILE_W, concatenated_channels, phase_weights, same_shape,
                        tile_grid)
from .activation import activate, mask_gradient
from .arrays import f32_array as _f32, finish as _finish
from .fma import fma32
from .reduce import fold_images, in_image_mask, per_image, tile_chain, tile_view


def _check_weights(w, cin):
    if w.shape[1:] != (cin, 3, 3):
        raise ValueError(f"weights of shape {w.shape} do not fit {cin} input channels (OIHW, 3x3)")


def _concatenated(x, x2):
    """x, or x's channels followed by x2's (numerics §12)."""
    x = _f32("x", x, 4)
    if x2 is None:
        return x
    x2 = _f32("x2", x2, 4)
    concatenated_channels(x.shape, x2.shape)
    return np.concatenate([x, x2], axis=1)


def _chain(x, w, acc):
    """acc (broadcast to (N, Co, H, W)) continued by §1's chain over x's channels, ky, kx."""
    h, wd = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for ci in range(x.shape[1]):
        for ky in range(3):
            for kx in range(3):
                acc = fma32(xp[:, ci:ci + 1, ky:ky + h, kx:kx + wd],
                            w[None, :, ci, ky, kx, None, None], acc)
    return np.broadcast_to(acc, (x.shape[0], w.shape[0], h, wd))


def _upsampled_chain(x, w, b):
    """The chains from b over the channels of x read x2 nearest-upsampled, in phase form
    (§12): for output pixel (2i + p, 2j + q), over ci, a, b of
    x[ci, i - 1 + p + a, j - 1 + q + b] * phase_weights(w)[o, ci, p, q, a, b]."""
    n, cin, h, wd = x.shape
    phase = phase_weights(w)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.empty((n, w.shape[0], 2 * h, 2 * wd), np.float32)
    for p, q in np.ndindex(2, 2):
        chain = b[None, :, None, None]
        for ci in range(cin):
            for a, bb in np.ndindex(2, 2):
                chain = fma32(xp[:, ci:ci + 1, p + a:p + a + h, q + bb:q + bb + wd],
                              phase[None, :, ci, p, q, a, bb, None, None], chain)
        acc[:, :, p::2, q::2] = chain
    return acc


def conv2d_forward(x, w, b, relu=False, out=None, leaky_slope=None, x2=None, upsampled=False):
    """y[n,o] = chain from b[o] of fma over ci, ky, kx (ascending) of
    x[n,ci,h+ky-1,w+kx-1] * w[o,ci,ky,kx], then ReLU or LeakyReLU (numerics §9a) if asked.
    With x2, x is the concatenation of x's channels and x2's (§12); with `upsampled`, of x
    nearest-upsampled (§11) and x2's, x's part of the chain in phase form (§12)."""
    w = _f32("w", w, 4)
    b = _f32("b", b, 1)
    x = _f32("x", x, 4)
    x2 = None if x2 is None else _f32("x2", x2, 4)
    cin = concatenated_channels(x.shape, None if x2 is None else x2.shape, upsampled)
    _check_weights(w, cin)
    if b.shape != (w.shape[0],):
        raise ValueError(f"bias of shape {b.shape} does not fit {w.shape[0]} output channels")
    if upsampled:
        split = x.shape[1]
        acc = _chain(x2, w[:, split:], _upsampled_chain(x, w[:, :split], b))
    else:
        acc = _chain(_concatenated(x, x2), w, b[None, :, None, None])
    return _finish(np.array(activate(acc, relu, leaky_slope)), out)


def relu_backward(gy, y, out=None):
    """gy where the forward output y > 0, else +0."""
    gy = _f32("gy", gy, 4)
    y = _f32("y", y, 4)
    return _finish(mask_gradient(gy, y), out)


def conv2d_backward_data(gy, w, relu_output=None, out=None, leaky_slope=None, split=None):
    """dL/dx: the forward chain applied to gy with the flipped, transposed kernel, from +0.

    For input channel ci the chain runs over o ascending, then ky and kx descending, of
    gy[n,o,h+1-ky,w+1-kx] * w[o,ci,ky,kx]. With relu_output, the result is masked by
    relu_output > 0 (relu_backward folded in; with leaky_slope, leaky_relu_backward).
    With `split` (no mask), the gradient of a concatenation: the pair of its input channels
    below `split` and the rest (`out` a pair too; its second None: the rest is not wanted, not
    computed, and None in its place: each channel's chain is its own, so the first part's bits
    are the same).
    """
    w = _f32("w", w, 4)
    if leaky_slope is not None and relu_output is None:
        raise ValueError("leaky_slope needs relu_output, the activation's stored output")
    flipped = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    if split is not None and out is not None and out[1] is None:
        if relu_output is not None or not 0 < split < flipped.shape[0]:
            raise ValueError(f"cannot split {flipped.shape[0]} unmasked input channels after "
                             f"channel {split}")
        first = conv2d_forward(gy, flipped[:split], np.zeros(split, np.float32))
        return _finish(first, out[0]), None
    gx = conv2d_forward(gy, flipped, np.zeros(flipped.shape[0], np.float32))
    if relu_output is not None:
        relu_output = same_shape("relu_output", _f32("relu_output", relu_output, 4), gx.shape)
        gx = mask_gradient(gx, relu_output, leaky_slope)
    if split is None:
        return _finish(gx, out)
    if relu_output is not None:
        raise ValueError("the gradient of a concatenation is not masked")
    if not 0 < split < gx.shape[1]:
        raise ValueError(f"cannot split {gx.shape[1]} input channels after channel {split}")
    parts = np.array(gx[:, :split]), np.array(gx[:, split:])
    return parts if out is None else tuple(_finish(p, o) for p, o in zip(parts, out))


def conv2d_backward_weights(gy, x, out=None, image_sums=None, x2=None):
    """(dL/dw, dL/db), each a tiled float32 chain per image, combined in float64 (contract §4).

    With `image_sums` (float64 arrays (N, Co, Ci, 3, 3) and (N, Co)), each image's float64 sum
    is written there instead and image_sums is returned: sum_images() finishes the sum, so a
    batch may be run in several passes with the same bits. With x2, x is the concatenation of
    x's channels and x2's (§12)."""
    gy = _f32("gy", gy, 4)
    x = _concatenated(x, x2)
    n, cout, h, wd = gy.shape
    if x.shape[0] != n or x.shape[2:] != (h, wd):
        raise ValueError(f"gy {gy.shape} and x {x.shape} differ in batch or image size")
    cin = x.shape[1]
    th, tw = tile_grid(h, wd)
    gy_t = tile_view(gy).transpose(0, 2, 4, 3, 5, 1)         # (N, th, tw, TH, TW, Co)
    xp = np.zeros((n, cin, th * TILE_H + 2, tw * TILE_W + 2), np.float32)
    xp[:, :, 1:h + 1, 1:wd + 1] = x
    taps = [xp[:, :, ky:ky + th * TILE_H, kx:kx + tw * TILE_W]
            .reshape(n, cin, th, TILE_H, tw, TILE_W) for ky in range(3) for kx in range(3)]
    valid = in_image_mask(h, wd)

    def weight_step(r, c, acc):
        window = np.stack([t[:, :, :, r, :, c] for t in taps], axis=-1)   # (N, Ci, th, tw, 9)
        window = window.transpose(0, 2, 3, 1, 4)[:, :, :, None]          # (N, th, tw, 1, Ci, 9)
        return fma32(gy_t[:, :, :, r, c, :, None, None], window, acc)

    def bias_step(r, c, acc):
        return acc + gy_t[:, :, :, r, c, :]

    gw_tiles = tile_chain(valid, weight_step,
                          np.zeros((n, th, tw, cout, cin, 9), np.float32))
    gb_tiles = tile_chain(valid, bias_step, np.zeros((n, th, tw, cout), np.float32))
    gw_images = per_image(gw_tiles.reshape(n, th * tw, cout, cin, 9))
    gb_images = per_image(gb_tiles.reshape(n, th * tw, cout))
    if image_sums is not None:
        image_sums[0][...] = gw_images.reshape(n, cout, cin, 3, 3)
        image_sums[1][...] = gb_images
        return image_sums
    gw = fold_images(gw_images).astype(np.float32).reshape(cout, cin, 3, 3)
    gb = fold_images(gb_images).astype(np.float32)
    if out is None:
        return gw, gb
    out[0][...] = gw
    out[1][...] = gb
    return out
