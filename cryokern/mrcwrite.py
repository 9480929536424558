"""Writing MRC files image by image, atomically, with exact header statistics.

mrcfile creates the file (header and full-size data block); the images are then written with
positioned writes, so a stack is never held in memory whole, and the header's statistics
(min, max, mean, rms) are accumulated image by image and written last. The file is written under
a temporary name in the destination directory and renamed into place only when complete:
an interrupted or failed run leaves no partial output.
"""
import os
import tempfile
from pathlib import Path

import mrcfile
import numpy as np

from .imagemath import statistics
from .mrcstack import DataError

# MRC modes of the float dtypes we write
MODES = {np.dtype(np.float32): 2, np.dtype(np.float16): 12}
FLOAT16_MAX = float(np.finfo(np.float16).max)
# the permissions a plainly created file gets (mkstemp's are owner-only)
_UMASK = os.umask(0)
os.umask(_UMASK)


def output_directory(path):
    """An output directory as a Path; DataError if something else stands at that path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: the output directory exists and is not a directory")
    return path


def check_target(target, inputs, force):
    """Refuse an output path that is one of the input files (always) or exists (unless force)."""
    target = os.fspath(target)
    if os.path.exists(target):
        if any(os.path.samefile(target, os.fspath(p)) for p in inputs if os.path.exists(p)):
            raise DataError(f"{target}: is an input; choose another output directory "
                            "(inputs are never written over)")
        if not force:
            raise DataError(f"{target}: exists; give --force to replace it")


def combine_stats(parts):
    """Min, max, mean and standard deviation over images from their imagemath.statistics,
    combined in image order (Chan et al.'s pairwise update: no cancellation when mean >>
    spread)."""
    count, mean, m2 = 0, 0.0, 0.0
    for n, mean_i, m2_i, _, _ in parts:
        total = count + n
        delta = mean_i - mean
        m2 += m2_i + delta * delta * count * n / total
        mean += delta * n / total
        count = total
    return (min(p[3] for p in parts), max(p[4] for p in parts), mean, float(np.sqrt(m2 / count)))


class StackWriter:
    """An MRC file of `count` images of `shape` (ny, nx), written one image at a time.

    layout: 'image' (a 2-D file; count must be 1), 'stack' or 'volume'. voxel_size (x, y, z)
    and origin ((x, y, z), (nxstart, nystart, nzstart)) are copied into the header. Use as a
    context manager: the file appears at `path` only if the block ends without an exception.
    Images may be written in any order and from several threads (each to its own index).
    """

    def __init__(self, path, count, shape, dtype=np.float32, layout="stack", voxel_size=None,
                 origin=None, label=None):
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in MODES:
            raise ValueError(f"cannot write {self.dtype} MRC files (float32 or float16)")
        if layout == "image" and count != 1:
            raise ValueError("a 2-D MRC file holds one image")
        self.count, self.shape = count, tuple(shape)
        self._stats = [None] * count
        self._next = 0
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mrc", dir=directory)
        os.close(fd)
        try:
            os.chmod(self._tmp, 0o666 & ~_UMASK)
            self._header = self._create(layout, voxel_size, origin, label)
            self._fd = os.open(self._tmp, os.O_WRONLY)
        except BaseException:
            os.unlink(self._tmp)
            raise
        self._offset = self._header.nbytes
        self._image_bytes = self.shape[0] * self.shape[1] * self.dtype.itemsize

    def _create(self, layout, voxel_size, origin, label):
        data_shape = self.shape if layout == "image" else (self.count,) + self.shape
        with mrcfile.new_mmap(self._tmp, data_shape, mrc_mode=MODES[self.dtype],
                              overwrite=True) as mrc:
            if layout == "stack":
                mrc.set_image_stack()
            elif layout == "volume":
                mrc.set_volume()
            if voxel_size is not None:
                mrc.voxel_size = tuple(voxel_size)
            if origin is not None:
                (mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z), starts = origin
                mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = starts
            if label:
                mrc.add_label(label[:80])
            mrc.reset_header_stats()
            return mrc.header.copy()

    def write(self, image, index=None):
        """Write image `index` (by default the one after the last written), converted to the
        file's dtype."""
        if index is None:
            index, self._next = self._next, self._next + 1
        if not 0 <= index < self.count or self._stats[index] is not None:
            raise ValueError(f"{self.path}: image {index} is written already or out of range "
                             f"(the file holds {self.count})")
        if image.shape != self.shape:
            raise ValueError(f"{self.path}: image of shape {image.shape}, the file holds "
                             f"{self.shape}")
        with np.errstate(over="ignore"):
            data = np.ascontiguousarray(image, self.dtype)
        if self.dtype == np.float16 and not np.isfinite(data).all() and np.isfinite(image).all():
            raise ValueError(f"{self.path}: image {index} has values beyond float16's range "
                             f"(+-{FLOAT16_MAX:g}); write float32 instead")
        self._stats[index] = statistics(data)
        offset = self._offset + index * self._image_bytes
        os.pwrite(self._fd, memoryview(data).cast("B"), offset)
        if hasattr(os, "posix_fadvise"):
            # start writing this image to disk now (Linux begins writeback on DONTNEED), so
            # the disk works while the next images are computed and close()'s fsync is short;
            # it also keeps a long output from filling the page cache
            os.posix_fadvise(self._fd, offset, self._image_bytes, os.POSIX_FADV_DONTNEED)

    def close(self):
        """Write the header's statistics and move the file into place."""
        missing = sum(s is None for s in self._stats)
        if missing:
            raise ValueError(f"{self.path}: {missing} of {self.count} images not written")
        h = self._header
        h.dmin, h.dmax, h.dmean, h.rms = combine_stats(self._stats)
        os.pwrite(self._fd, h.tobytes(), 0)
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self._tmp, self.path)

    def discard(self):
        os.close(self._fd)
        os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            self.discard()
