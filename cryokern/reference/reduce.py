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


def per_image(partials):
    """float32 partials (N, T, ...) -> float64 per-image sums (N, ...): per image, a left fold
    over its tiles in order, in float64 (numerics §4 step 3). np.add.accumulate is a sequential
    fold by definition."""
    return np.add.accumulate(partials.astype(np.float64), axis=1)[:, -1]


def fold_images(per_image):
    """float64 per-image sums (N, ...) -> float64 total: a left fold in image order (step 4)."""
    return np.add.accumulate(np.asarray(per_image, np.float64), axis=0)[-1]


def sum_images(sums, out):
    """Steps 4-5 over per-image sums left by conv2d_backward_weights or mse_loss_and_grad
    (their `image_sums`), e.g. from several passes over one batch: the total rounded once to
    out's dtype (float32 gradients, float64 SSE), written into out and returned."""
    out[...] = np.asarray(fold_images(sums)).astype(out.dtype)
    return out
