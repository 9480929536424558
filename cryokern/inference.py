"""Applying a trained network to whole micrographs, tile by tile, bit-identical to the whole
image at once.

A 3x3 "same" convolution reads one pixel around each output pixel, so after `depth` layers an
output pixel depends on the input within `depth` pixels (the receptive radius), and near the
image's edges on every layer's zero padding. A tile cut with a halo of `depth` pixels, clipped
at the image's edges (which are then the tile's edges too), computes its core from the same
values by the same fma chains (numerics section 1) as the whole image: the same bits, with
device memory bounded by the tile instead of the image.
"""
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from . import checkpoint
from .data import NORMALIZATIONS, denormalize, normalization, normalize
from .model import Network
from .mrcstack import DataError

DEFAULT_TILE = 1024


@dataclass(frozen=True)
class Model:
    """A trained network as a checkpoint stores it: shape, parameters (host float32) and the
    normalization it was trained with."""
    path: str
    network: Network
    params: dict
    normalize: str


def load_model(path):
    """The Model in a checkpoint; DataError naming the file if it cannot be one."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        params, _, meta = checkpoint.load(path)
        network = Network(tuple(meta["network"]["channels"]))
        mode = meta["normalize"]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile,
            json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a usable cryokern checkpoint ({e})") from None
    if network.channels[0] != 1 or network.channels[-1] != 1:
        raise DataError(f"{path}: the network maps {network.channels[0]} channels to "
                        f"{network.channels[-1]}; micrographs need 1 to 1")
    if mode not in NORMALIZATIONS:
        raise DataError(f"{path}: unknown normalization {mode!r}")
    for name, shape in network.param_shapes().items():
        if name not in params or params[name].shape != shape:
            raise DataError(f"{path}: {name} is missing or not of shape {shape}")
        if params[name].dtype != np.float32 or not np.isfinite(params[name]).all():
            raise DataError(f"{path}: {name} is not finite float32")
    return Model(path, network, {k: params[k] for k in network.param_shapes()}, mode)


def tiles(shape, tile, halo):
    """(window, core) pairs covering an image of `shape`: `core` (row and column slices of the
    image) in tile-size steps, `window` the core grown by `halo` and clipped to the image.
    tile <= 0 means one tile, the whole image."""
    h, w = shape
    tile_h, tile_w = (h, w) if tile <= 0 else (tile, tile)
    for top in range(0, h, tile_h):
        for left in range(0, w, tile_w):
            core = (slice(top, min(top + tile_h, h)), slice(left, min(left + tile_w, w)))
            window = tuple(slice(max(0, s.start - halo), min(s.stop + halo, n))
                           for s, n in zip(core, shape))
            yield window, core


class TiledDenoiser:
    """A Model on a backend, applied to 2-D images tile by tile.

    Buffers (device and page-locked host) are sized for the largest window and reused, so
    denoising a stack allocates nothing per image. `halo` defaults to the receptive radius;
    a smaller one is accepted only to show that it is needed.
    """

    def __init__(self, model, backend, tile=DEFAULT_TILE, halo=None):
        self.model, self.backend, self.tile = model, backend, tile
        self.halo = model.network.depth if halo is None else halo
        self.params = {k: backend.to_device(v) for k, v in model.params.items()}
        self._capacity = 0

    def _buffers(self, pixels):
        """Flat buffers for a window of `pixels`: the input, two activations (ping-pong) and
        the host staging in and out."""
        if pixels > self._capacity:
            widest = max(self.model.network.channels[1:])
            be = self.backend
            self._input, self._host_in, self._host_out = (be.empty((pixels,)),
                                                          be.host_empty((pixels,)),
                                                          be.host_empty((pixels,)))
            self._acts = [be.empty((widest * pixels,)) for _ in range(2)]
            self._capacity = pixels

    def _forward(self, window):
        """The network's output for one window (h, w), on the host."""
        h, w = window.shape
        n = h * w
        self._buffers(n)
        be, net = self.backend, self.model.network
        staged = self._host_in[:n].reshape(h, w)
        staged[...] = window
        x = self._input[:n].reshape(1, 1, h, w)
        be.copy_in(x, staged.reshape(1, 1, h, w))
        for i, cout in enumerate(net.channels[1:]):
            y = self._acts[i % 2][:cout * n].reshape(1, cout, h, w)
            be.conv2d_forward(x, self.params[f"layers.{i}.weight"],
                              self.params[f"layers.{i}.bias"], relu=net.relu_after(i), out=y)
            x = y
        out = self._host_out[:n].reshape(1, 1, h, w)
        be.copy_out(out, x)
        return out[0, 0]

    def __call__(self, image):
        """The network's output for a normalized 2-D float32 image, in its units."""
        image = np.asarray(image)
        if image.ndim != 2 or image.dtype != np.float32:
            raise TypeError(f"expected a 2-D float32 image, got {image.dtype} {image.shape}")
        result = np.empty_like(image)
        for window, core in tiles(image.shape, self.tile, self.halo):
            out = self._forward(image[window])
            local = tuple(slice(c.start - s.start, c.stop - s.start) for c, s in zip(core, window))
            result[core] = out[local]
        return result

    def denoise(self, image):
        """A raw 2-D float32 image denoised: normalized as in training, passed through the
        network, and mapped back into the input's units."""
        affine = normalization(image, self.model.normalize)
        return denormalize(self(normalize(image, affine)), affine)
