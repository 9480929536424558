"""8-bit previews of images for a quick look (denoise --preview png|jpg).

An image is binned by the smallest whole factor that brings its long side to PREVIEW_SIZE
pixels or fewer (the mean of each factor x factor block; blocks at the far edges may be
narrower), clipped at the binned image's CLIP_PERCENTILES (the darkest and brightest 0.5 % of
the pixels saturate, so that a few hot or dead pixels do not grey out the rest) and mapped
linearly onto 0..255. PNG is written here with zlib (8-bit greyscale, no other dependency);
JPEG needs Pillow (which matplotlib, in the `evaluate` extra, brings).
"""
import os
import struct
import zlib

import numpy as np

from .mrcstack import DataError

FORMATS = ("png", "jpg")
PREVIEW_SIZE = 1024
CLIP_PERCENTILES = (0.5, 99.5)
JPEG_QUALITY = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def bin_factor(shape, size=PREVIEW_SIZE):
    """The smallest whole factor that brings the longest side of `shape` to `size` or less."""
    return max(1, -(-max(shape) // size))


def binned(image, factor):
    """Means of factor x factor blocks, in float64 (narrower blocks at the far edges). Whole
    blocks are summed through reshaped views (contiguous passes over the image), the edge
    strips apart."""
    h, w = image.shape
    fh, fw = h - h % factor, w - w % factor
    rows = image[:fh].reshape(fh // factor, factor, w).sum(axis=1, dtype=np.float64)
    if fh < h:
        rows = np.vstack([rows, image[fh:].sum(axis=0, dtype=np.float64)])
    sums = rows[:, :fw].reshape(len(rows), fw // factor, factor).sum(axis=2)
    if fw < w:
        sums = np.hstack([sums, rows[:, fw:].sum(axis=1, keepdims=True)])
    counts = np.outer([factor] * (fh // factor) + ([h - fh] if fh < h else []),
                      [factor] * (fw // factor) + ([w - fw] if fw < w else []))
    return sums / counts


def preview_pixels(image, size=PREVIEW_SIZE):
    """The 8-bit preview of a 2-D image: binned, clipped at CLIP_PERCENTILES, scaled to 0..255
    (a constant image is mid-grey)."""
    small = binned(image, bin_factor(image.shape, size))
    lo, hi = np.percentile(small, CLIP_PERCENTILES)
    if not hi > lo:
        return np.full(small.shape, 128, np.uint8)
    scaled = (np.clip(small, lo, hi) - lo) * (255 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(pixels):
    """A PNG file of 8-bit greyscale pixels (every row with filter type 0, none)."""
    h, w = pixels.shape
    rows = np.zeros((h, w + 1), np.uint8)
    rows[:, 1:] = pixels
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


def jpeg_library():
    """Pillow's Image module; DataError saying how to install it if it is missing."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("--preview jpg needs Pillow: pip install 'cryokern[evaluate]' "
                        "(or use --preview png, which needs nothing more)") from None
    return Image


def save(path, pixels, fmt):
    if fmt == "png":
        with open(path, "wb") as f:
            f.write(png_bytes(pixels))
    else:
        jpeg_library().fromarray(pixels).save(path, "JPEG", quality=JPEG_QUALITY)


def preview_paths(target, count, fmt):
    """Beside the MRC file `target`: <stem>.<fmt> for one image, <stem>_<index>.<fmt> (index
    from 0, at least 4 digits) for each image of a stack or volume."""
    stem = target.with_suffix("")
    if count == 1:
        return [stem.with_name(f"{stem.name}.{fmt}")]
    digits = max(4, len(str(count - 1)))
    return [stem.with_name(f"{stem.name}_{i:0{digits}d}.{fmt}") for i in range(count)]


class PreviewSet:
    """The previews of one output file: each written under a temporary name as its image is
    done (from any thread), all renamed into place when the `with` block ends without an
    exception, else removed. `images` (a range; default all): the images this process
    writes, where ranks share the file (denoise on several ranks)."""

    def __init__(self, paths, fmt, images=None):
        self.paths, self.fmt = paths, fmt
        self._tmp = [p.with_name(f".tmp-{p.name}") for p in paths]
        self.images = range(len(paths)) if images is None else images

    def add(self, index, image):
        save(self._tmp[index], preview_pixels(image), self.fmt)

    def commit(self):
        for i in self.images:
            os.replace(self._tmp[i], self.paths[i])

    def discard(self):
        for i in self.images:
            if os.path.exists(self._tmp[i]):
                os.unlink(self._tmp[i])

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.commit()
        else:
            self.discard()
