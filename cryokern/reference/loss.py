"""Mean squared error as an exact float64 SSE plus a pixel count, and its gradient."""
import numpy as np

from ..contract import mse_grad_scale, tile_grid
from .conv import _f32
from .fma import fma32
from .reduce import fold_images, in_image_mask, per_image, tile_chain, tile_view


def _difference(pred, target):
    pred = _f32("pred", pred, 4)
    target = _f32("target", target, 4)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    return pred - target


def _image_sse(pred, target):
    """Each image's float64 sum of its planes' tile chains (numerics §4b, steps 1-3)."""
    d = _difference(pred, target)
    n, ch, h, w = d.shape
    th, tw = tile_grid(h, w)
    d_t = tile_view(d).transpose(0, 2, 4, 3, 5, 1)            # (N, th, tw, TH, TW, C)

    def step(r, c, acc):
        v = d_t[:, :, :, r, c, :]
        return fma32(v, v, acc)

    partials = tile_chain(in_image_mask(h, w), step, np.zeros((n, th, tw, ch), np.float32))
    per_image_order = partials.transpose(0, 3, 1, 2).reshape(n, ch * th * tw)  # plane, tile
    return per_image(per_image_order)


def mse_loss(pred, target):
    """(sse, count): per plane tile, a float32 chain d = pred - target, acc = fma(d, d, acc)."""
    return float(fold_images(_image_sse(pred, target))), int(np.prod(np.shape(pred)))


def mse_grad(pred, target, count, out=None):
    """d(SSE/count)/d(pred) = (pred - target) * float32(2/count), one float32 multiply."""
    g = _difference(pred, target) * mse_grad_scale(count)
    if out is None:
        return g
    out[...] = g
    return out


def mse_loss_and_grad(pred, target, count, out=None, image_sums=None):
    """Both of the above from one pass (the GPU fuses them); returns (sse, grad). With
    `image_sums` (float64, shape (N,)), each image's sum is written there and returned in
    place of the sse, for sum_images() to finish (on the GPU the value stays on the device,
    so the step needs no host wait, and a batch may run in several passes)."""
    images = _image_sse(pred, target)
    if image_sums is not None:
        image_sums[...] = images
        sse = image_sums
    else:
        sse = float(fold_images(images))
    return sse, mse_grad(pred, target, count, out=out)
