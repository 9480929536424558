"""docs/numerics.md written as literal scalar loops, one fma32 at a time (tiny shapes only).

The vectorized reference must equal these bit for bit: that is how the tests show the reference
follows the contract line by line.
"""
import numpy as np

from cryokern.contract import TILE_H, TILE_W, tile_grid
from cryokern.reference import fma32

f32 = np.float32


def pixel(a, n, c, h, w):
    _, _, hh, ww = a.shape
    return a[n, c, h, w] if 0 <= h < hh and 0 <= w < ww else f32(0)


def conv_forward(x, w, b, relu):
    n_, ci_, h_, w_ = x.shape
    y = np.empty((n_, w.shape[0], h_, w_), np.float32)
    for n in range(n_):
        for o in range(w.shape[0]):
            for h in range(h_):
                for col in range(w_):
                    acc = b[o]
                    for ci in range(ci_):
                        for ky in range(3):
                            for kx in range(3):
                                acc = fma32(pixel(x, n, ci, h + ky - 1, col + kx - 1),
                                            w[o, ci, ky, kx], acc)
                    y[n, o, h, col] = f32(0) if relu and acc <= 0 else acc
    return y


def conv_backward_data(gy, w):
    n_, o_, h_, w_ = gy.shape
    gx = np.empty((n_, w.shape[1], h_, w_), np.float32)
    for n in range(n_):
        for ci in range(w.shape[1]):
            for h in range(h_):
                for col in range(w_):
                    acc = f32(0)
                    for o in range(o_):
                        for a in range(3):
                            for b in range(3):
                                acc = fma32(pixel(gy, n, o, h + a - 1, col + b - 1),
                                            w[o, ci, 2 - a, 2 - b], acc)
                    gx[n, ci, h, col] = acc
    return gx


def tile_pixels(h_, w_, ti, tj):
    for h in range(ti * TILE_H, min((ti + 1) * TILE_H, h_)):
        for col in range(tj * TILE_W, min((tj + 1) * TILE_W, w_)):
            yield h, col


def fold_tiles_then_images(partials_per_image):
    """Steps 3-5 of section 4: float64 left folds, tiles then images."""
    total = None
    for tiles in partials_per_image:
        per_image = None
        for p in tiles:
            per_image = np.float64(p) if per_image is None else per_image + np.float64(p)
        total = per_image if total is None else total + per_image
    return total


def conv_backward_weights(gy, x):
    n_, o_, h_, w_ = gy.shape
    ci_ = x.shape[1]
    th, tw = tile_grid(h_, w_)
    gw = np.empty((o_, ci_, 3, 3), np.float32)
    gb = np.empty(o_, np.float32)
    for o in range(o_):
        parts = [[sum_tile_bias(gy, n, o, h_, w_, ti, tj) for ti in range(th) for tj in range(tw)]
                 for n in range(n_)]
        gb[o] = f32(fold_tiles_then_images(parts))
        for ci in range(ci_):
            for ky in range(3):
                for kx in range(3):
                    parts = []
                    for n in range(n_):
                        image = []
                        for ti in range(th):
                            for tj in range(tw):
                                acc = f32(0)
                                for h, col in tile_pixels(h_, w_, ti, tj):
                                    acc = fma32(gy[n, o, h, col],
                                                pixel(x, n, ci, h + ky - 1, col + kx - 1), acc)
                                image.append(acc)
                        parts.append(image)
                    gw[o, ci, ky, kx] = f32(fold_tiles_then_images(parts))
    return gw, gb


def sum_tile_bias(gy, n, o, h_, w_, ti, tj):
    acc = f32(0)
    for h, col in tile_pixels(h_, w_, ti, tj):
        acc = f32(acc + gy[n, o, h, col])
    return acc


def mse_sse(pred, target):
    n_, c_, h_, w_ = pred.shape
    th, tw = tile_grid(h_, w_)
    parts = []
    for n in range(n_):
        image = []
        for c in range(c_):
            for ti in range(th):
                for tj in range(tw):
                    acc = f32(0)
                    for h, col in tile_pixels(h_, w_, ti, tj):
                        d = f32(pred[n, c, h, col] - target[n, c, h, col])
                        acc = fma32(d, d, acc)
                    image.append(acc)
        parts.append(image)
    return float(fold_tiles_then_images(parts))
