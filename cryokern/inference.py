"""Applying a trained network to whole micrographs, tile by tile, bit-identical to the whole
image at once.

A 3x3 "same" convolution reads one pixel around each output pixel, so after `depth` layers an
output pixel depends on the input within `depth` pixels (the receptive radius), and near the
image's edges on every layer's zero padding. A tile cut with a halo of `depth` pixels, clipped
at the image's edges (which are then the tile's edges too), computes its core from the same
values by the same fma chains (numerics section 1) as the whole image: the same bits, with
device memory bounded by the tile instead of the image. Tiles are strips of whole rows.

A U-Net (model.UNet, model.N2NUNet) pools 2x2 blocks, so a strip must group rows as the whole
image does: cores and halos are whole multiples of 2**levels rows (`row_grid`), so every
window's top row is on the pooling grid. Its receptive radius beyond a grid block is
6 * 2**levels - 2 rows (UNet.receptive_radius derives it; N2NUNet's is 4 * 2**levels), rounded
up to the grid for the halo (6 * 2**levels for two poolings or more: 192 rows for the default
five; 128 for the paper's network). A window that ends at
the image's last row is padded at the bottom to a multiple of 2**levels exactly as the whole
image is (its top is on the grid); interior windows end on the grid and need no padding; the
right side is the image's in every window, padded as the whole image's. Device memory: one
forward pass's arrays for the largest window (about tile^2 + 2 halo * width pixels), reused.
Without a tile the strips are as tall as half the device's free memory holds: whole images
where they fit, so that no halo row is computed twice.
"""
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from . import checkpoint
from .data import NORMALIZATIONS, denormalize, normalization, normalize
from .model import Network, PooledNetwork, forward, network_from_description
from .mrcstack import DataError

# --tile's default: None, the strips chosen by memory (TiledDenoiser.core_rows)
DEFAULT_TILE = None


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
        network = network_from_description(meta["network"])
        mode = meta["normalize"]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile,
            json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a usable cryokern checkpoint ({e})") from None
    cin, cout = (network.in_channels, network.out_channels) \
        if isinstance(network, PooledNetwork) else (network.channels[0], network.channels[-1])
    if cin != 1 or cout != 1:
        raise DataError(f"{path}: the network maps {cin} channels to {cout}; micrographs "
                        "need 1 to 1")
    if mode not in NORMALIZATIONS:
        raise DataError(f"{path}: unknown normalization {mode!r}")
    for name, shape in network.param_shapes().items():
        if name not in params or params[name].shape != shape:
            raise DataError(f"{path}: {name} is missing or not of shape {shape}")
        if params[name].dtype != np.float32 or not np.isfinite(params[name]).all():
            raise DataError(f"{path}: {name} is not finite float32")
    return Model(path, network, {k: params[k] for k in network.param_shapes()}, mode)


def tile_rows(shape, tile, grid=1):
    """Core rows for tiles of about tile * tile pixels: whole rows, a multiple of `grid` rows
    (at least one grid); tile <= 0 means the whole image."""
    h, w = shape
    return h if tile <= 0 else max(grid, (tile * tile) // w // grid * grid)


def strips(shape, tile, halo, grid=1, rows=None):
    """(window, core) row ranges covering an image of `shape`: cores of `rows` rows (default
    tile_rows(shape, tile, grid)), windows the cores grown by `halo` rows (a multiple of `grid`
    for a U-Net) and clipped to the image. Whole rows are contiguous in memory, so a window
    goes to the device, and a core comes back, by one copy each with no staging."""
    h, w = shape
    rows = tile_rows(shape, tile, grid) if rows is None else rows
    for top in range(0, h, rows):
        bottom = min(top + rows, h)
        yield (max(0, top - halo), min(bottom + halo, h)), (top, bottom)


class TiledDenoiser:
    """A Model on a backend, applied to 2-D images strip by strip.

    Device buffers are sized for the largest window and reused, so denoising a stack allocates
    nothing per image. `halo` defaults to the receptive radius; a smaller one is accepted only
    to show that it is needed. Give page-locked host arrays (backend.host_empty) as image and
    `out` for the fastest copies.
    """

    def __init__(self, model, backend, tile=DEFAULT_TILE, halo=None, memory=None):
        self.model, self.backend, self.tile = model, backend, tile
        self.memory = memory        # the budget of tile None, in bytes (default: core_rows)
        self._rows = {}             # image shape -> core rows, for tile None
        net = model.network
        self.grid = net.row_grid
        self.halo = -(-net.receptive_radius // self.grid) * self.grid if halo is None else halo
        if self.halo % self.grid:
            raise ValueError(f"the halo must be a multiple of {self.grid} rows (the pooling grid)")
        self.params = {k: backend.to_device(v) for k, v in model.params.items()}
        self.capacity = 0
        self._acts_size = 0

    def _buffers(self, pixels):
        """Flat device buffers for a window of `pixels`: the input and two activations."""
        if pixels > self.capacity:
            widest = max(self.model.network.channels[1:])
            self._input = self.backend.empty((pixels,))
            self._acts = [self.backend.empty((widest * pixels,)) for _ in range(2)]
            self.capacity = pixels

    def _unet_buffers(self, h, w):
        """The input and a U-Net forward pass's arrays for an h x w window: views of one flat
        device buffer kept for the largest window, arrays whose lifetimes do not overlap
        sharing memory (the network's inference_buffers)."""
        net = self.model.network
        home, sizes = net.inference_buffers(1, h, w)
        if h * w > self.capacity:
            self._input = self.backend.empty((h * w,))
            self.capacity = h * w
        total = sum(sizes.values())
        if total > self._acts_size:
            self._flat = self.backend.empty((total,))
            self._acts_size = total
        starts, at = {}, 0
        for buffer, size in sizes.items():
            starts[buffer], at = at, at + size
        acts = {}
        shapes = net.activation_shapes(1, h, w)
        for name, buffer in home.items():
            start = starts[buffer]
            acts[name] = self._flat[start:start + int(np.prod(shapes[name]))].reshape(shapes[name])
        return self._input[:h * w].reshape(1, 1, h, w), acts

    def _acts_floats(self, h, w):
        net = self.model.network
        if isinstance(net, PooledNetwork):
            return sum(net.inference_buffers(1, h, w)[1].values())
        return 2 * max(net.channels[1:]) * h * w

    def window_bytes(self, h, w):
        """Device bytes of the input and the forward pass's arrays for an h x w window."""
        return 4 * (h * w + self._acts_floats(h, w))

    def strips_bytes(self, rows, w):
        """What the buffers kept for an image's strips of `rows` core rows come to at most: the
        tallest window's input, and the arrays of a window that tall or, padded to the pooling
        grid (the image's last window), one row less."""
        h = rows + 2 * self.halo
        return 4 * (h * w + max(self._acts_floats(h, w), self._acts_floats(h - 1, w)))

    def device_bytes(self):
        """What the buffers kept for the largest window so far hold."""
        if isinstance(self.model.network, PooledNetwork):
            return 4 * (self.capacity + self._acts_size)
        return 4 * self.capacity * (1 + 2 * max(self.model.network.channels[1:]))

    def core_rows(self, shape):
        """The core rows of an image's strips: --tile's, or with tile None the whole image where
        its window fits the memory budget (default: half the device's free memory, the host's
        for the CPU backends, when first asked), else the tallest cores whose windows fit (at
        least one grid). Halo rows are computed twice, and a U-Net's halo is large (192 rows
        for five poolings): the fewer strips, the less work."""
        if self.tile is not None:
            return tile_rows(shape, self.tile, self.grid)
        shape = tuple(shape)
        if shape not in self._rows:         # once per image shape, not per image of a stack
            if self.memory is None:
                self.memory = self.backend.free_memory() // 2
            h, w = shape
            rows = h
            if self.window_bytes(h, w) > self.memory:
                fits = 1
                while self.strips_bytes((fits + 1) * self.grid, w) <= self.memory:
                    fits += 1
                rows = min(h, fits * self.grid)
            self._rows[shape] = rows
        return self._rows[shape]

    def __call__(self, image, out=None):
        """The network's output for a normalized 2-D float32 image, in its units."""
        if image.ndim != 2 or image.dtype != np.float32:
            raise TypeError(f"expected a 2-D float32 image, got {image.dtype} {image.shape}")
        image = np.ascontiguousarray(image)
        out = np.empty_like(image) if out is None else out
        be, net = self.backend, self.model.network
        w = image.shape[1]
        for (start, stop), (top, bottom) in strips(image.shape, self.tile, self.halo,
                                                   rows=self.core_rows(image.shape)):
            h = stop - start
            n = h * w
            if isinstance(net, PooledNetwork):
                x, outs = self._unet_buffers(h, w)
            else:
                self._buffers(n)
                x = self._input[:n].reshape(1, 1, h, w)
                outs = [self._acts[i % 2][:c * n].reshape(1, c, h, w)   # ping-pong buffers
                        for i, c in enumerate(net.channels[1:])]
            be.copy_in(self._input[:n], image[start:stop].reshape(n))
            y = forward(be, net, self.params, x, outs)
            be.copy_out(out[top:bottom].reshape(-1),
                        y.reshape(n)[(top - start) * w:(bottom - start) * w])
        return out

    def denoise(self, image):
        """A raw 2-D float32 image denoised: normalized as in training, passed through the
        network, and mapped back into the input's units."""
        affine = normalization(image, self.model.normalize)
        return denormalize(self(normalize(image, affine)), affine)
