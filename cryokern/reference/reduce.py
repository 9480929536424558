"""The reductions' fixed schedule: tiles of each image plane, float64 combination of partials."""
import numpy as np

from ..contract import TILE_H, TILE_W, tile_grid


def tile_view(a):
    """(N, C, H, W) -> (N, C, th, TILE_H, tw, TILE_W), zero-padded up to whole tiles (a copy)."""
    n, ch, h, w = a.shape
    th, tw = tile_grid(h, w)
    padded = np.zeros((n, ch, th * TILE_H, tw * TILE_W), a.dtype)
    padded[:, :, :h, :w] = a
    return padded.reshape(n, ch, th, TILE_H, tw, TILE_W)


def in_image_mask(h, w):
    """(th, tw, TILE_H, TILE_W) booleans: which tile positions hold a pixel of the image."""
    th, tw = tile_grid(h, w)
    rows = (np.arange(th)[:, None] * TILE_H + np.arange(TILE_H)[None, :]) < h
    cols = (np.arange(tw)[:, None] * TILE_W + np.arange(TILE_W)[None, :]) < w
    return rows[:, None, :, None] & cols[None, :, None, :]


def tile_chain(valid, step, acc):
    """Run one float32 chain per tile over its in-image pixels in row-major order.

    `step(r, c, acc)` returns the new accumulator for tile position (r, c) of every tile at once;
    `valid` is in_image_mask(); tiles where (r, c) falls outside the image keep their value.
    """
    for r in range(TILE_H):
        for c in range(TILE_W):
            here = valid[:, :, r, c]
            if not here.any():
                continue
            new = step(r, c, acc)
            if here.all():
                acc = new
            else:
                mask = here.reshape(here.shape + (1,) * (acc.ndim - here.ndim - 1))
                acc = np.where(mask, new, acc)
    return acc


def combine_partials(partials):
    """float32 partials (N, T, ...) -> float64 total.

    Per image, a left fold over its tiles in order, in float64; then a left fold of the per-image
    sums in image order, in float64. np.add.accumulate is a sequential fold by definition.
    """
    per_image = np.add.accumulate(partials.astype(np.float64), axis=1)[:, -1]
    return np.add.accumulate(per_image, axis=0)[-1]
