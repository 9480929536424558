"""Mean squared error as an exact float64 SSE plus a pixel count, and its gradient."""
import numpy as np

from ..contract import mse_grad_scale, tile_grid
from .conv import _f32
from .fma import fma32
from .reduce import combine_partials, in_image_mask, tile_chain, tile_view


def _difference(pred, target):
    pred = _f32("pred", pred, 4)
    target = _f32("target", target, 4)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    return pred - target


def mse_loss(pred, target):
    """(sse, count): per plane tile, a float32 chain d = pred - target, acc = fma(d, d, acc)."""
    d = _difference(pred, target)
    n, ch, h, w = d.shape
    th, tw = tile_grid(h, w)
    d_t = tile_view(d).transpose(0, 2, 4, 3, 5, 1)            # (N, th, tw, TH, TW, C)

    def step(r, c, acc):
        v = d_t[:, :, :, r, c, :]
        return fma32(v, v, acc)

    partials = tile_chain(in_image_mask(h, w), step, np.zeros((n, th, tw, ch), np.float32))
    per_image_order = partials.transpose(0, 3, 1, 2).reshape(n, ch * th * tw)  # plane, tile
    return float(combine_partials(per_image_order)), d.size


def mse_grad(pred, target, count, out=None):
    """d(SSE/count)/d(pred) = (pred - target) * float32(2/count), one float32 multiply."""
    g = _difference(pred, target) * mse_grad_scale(count)
    if out is None:
        return g
    out[...] = g
    return out


def mse_loss_and_grad(pred, target, count, out=None, sse_out=None):
    """Both of the above from one pass (the GPU fuses them); returns (sse, grad). With
    `sse_out` (float64, shape (1,)), the sse is written there and sse_out is returned in its
    place: on the GPU that leaves the value on the device, so the step needs no host wait."""
    sse, _ = mse_loss(pred, target)
    if sse_out is not None:
        sse_out[0] = sse
        sse = sse_out
    return sse, mse_grad(pred, target, count, out=out)
