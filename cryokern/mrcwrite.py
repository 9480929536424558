"""Writing MRC files image by image, atomically, with exact header statistics.

mrcfile creates the file (header and full-size data block); the images are then written with
positioned writes, so a stack is never held in memory whole, and the header's statistics
(min, max, mean, rms) are accumulated image by image and written last. The file is written under
a temporary name in the destination directory and renamed into place only when complete:
an interrupted or failed run leaves no partial output.

A file made from another (`like`) keeps that file's header: every field but the mode and the
statistics (KEPT_FIELDS: space group, axis order, voxel size, origin, the extended header's
type, ...), the extended header's bytes, and the labels, with one label added saying what made
the file; nversion stays if it is an MRC2014 one (else mrcfile's current one, so that the file
validates).
"""
import os
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.utils import data_shape_from_header

from .imagemath import statistics
from .mrcstack import DataError

# MRC modes of the float dtypes we write
MODES = {np.dtype(np.float32): 2, np.dtype(np.float16): 12}
FLOAT16_MAX = float(np.finfo(np.float16).max)
# header fields a file written like another gets from it; the others are its own: the mode and
# statistics of the data written, the labels (kept, one added), the format's fixed fields, and
# nsymbt, which the copied extended header sets
_OWN_FIELDS = {"mode", "dmin", "dmax", "dmean", "rms", "nlabl", "label", "map", "machst",
               "nsymbt", "nversion"}
KEPT_FIELDS = tuple(n for n in HEADER_DTYPE.names if n not in _OWN_FIELDS)
MRC2014_VERSIONS = (20140, 20141)
MAX_LABELS = 10
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


def labels_with(header, label):
    """The header's labels with `label` (cut to 80 ASCII bytes) added. When all ten are in use,
    the second is dropped (IMOD's convention: the first label, usually the file's origin,
    stays)."""
    used = 0 if header is None else min(max(int(header.nlabl), 0), MAX_LABELS)
    labels = [bytes(l) for l in header.label[:used] if bytes(l).strip()] if used else []
    if len(labels) == MAX_LABELS:
        del labels[1]
    return labels + [label.encode("ascii", "replace")[:80]]


class StackWriter:
    """An MRC file of `count` images of `shape` (ny, nx), written one image at a time.

    layout: 'image' (a 2-D file; count must be 1), 'stack' or 'volume'. voxel_size (x, y, z),
    origin ((x, y, z), (nxstart, nystart, nzstart)) and axis_order (mapc, mapr, maps) are
    copied into the header. like: an MrcStack of the same images and shape whose header and
    extended header to keep (see the module's docstring); layout, voxel_size, origin and
    axis_order then come from it. Use as a context manager: the file appears at `path` only if
    the block ends without an exception. Images may be written in any order and from several
    threads (each to its own index).
    """

    def __init__(self, path, count, shape, dtype=np.float32, layout="stack", voxel_size=None,
                 origin=None, label=None, axis_order=None, like=None):
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in MODES:
            raise ValueError(f"cannot write {self.dtype} MRC files (float32 or float16)")
        if layout == "image" and count != 1:
            raise ValueError("a 2-D MRC file holds one image")
        if like is not None and (len(like), like.shape) != (count, tuple(shape)):
            raise ValueError(f"{self.path}: {count} images of {shape} cannot keep the header of "
                             f"{like.path} ({len(like)} of {like.shape})")
        self._images(count, shape)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mrc", dir=directory)
        os.close(fd)
        try:
            os.chmod(self._tmp, 0o666 & ~_UMASK)
            if like is None:
                self._header = self._create(layout, voxel_size, origin, axis_order, label)
            else:
                self._header = self._create_like(like, label)
            self._fd = os.open(self._tmp, os.O_WRONLY)
        except BaseException:
            os.unlink(self._tmp)
            raise
        # the data follow the header and the extended header
        self.data_offset = self._header.nbytes + int(self._header.nsymbt)

    @classmethod
    def joining(cls, path, tmp, data_offset, count, shape, dtype=np.float32):
        """A writer of some of the images of a file that another process's StackWriter created
        (its temporary file `tmp`, data from `data_offset`): this one writes its images and
        keeps their statistics (`written`); the creator closes the file."""
        self = cls.__new__(cls)
        self.path, self.dtype, self._tmp, self._header = os.fspath(path), np.dtype(dtype), tmp, None
        self._images(count, shape)
        self.data_offset = data_offset
        self._fd = os.open(tmp, os.O_WRONLY)
        return self

    def _images(self, count, shape):
        self.count, self.shape = count, tuple(shape)
        self._stats = [None] * count
        self._next = 0
        self._image_bytes = self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def temporary_path(self):
        return self._tmp

    def written(self):
        """{index: statistics} of the images this writer wrote."""
        return {i: s for i, s in enumerate(self._stats) if s is not None}

    def add_written(self, stats):
        """Statistics of images other writers wrote into this file (see `written`)."""
        for index, s in stats.items():
            self._stats[index] = s

    def _create(self, layout, voxel_size, origin, axis_order, label):
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
            if axis_order is not None:
                mrc.header.mapc, mrc.header.mapr, mrc.header.maps = axis_order
            if label:
                self._set_labels(mrc.header, labels_with(None, label))
            mrc.reset_header_stats()
            return mrc.header.copy()

    def _create_like(self, like, label):
        """A header that is `like`'s but for the mode, statistics and labels (one added), and
        its extended header (the bytes as they are) before the data."""
        source = like.header
        extended = like.extended_header()
        with mrcfile.new_mmap(self._tmp, data_shape_from_header(source),
                              mrc_mode=MODES[self.dtype], overwrite=True,
                              extended_header=np.frombuffer(extended, "V1") if extended else None
                              ) as mrc:
            for name in KEPT_FIELDS:
                mrc.header[name] = source[name]
            if int(source.nversion) in MRC2014_VERSIONS:
                mrc.header.nversion = source.nversion
            self._set_labels(mrc.header, labels_with(source, label or "cryokern"))
            mrc.reset_header_stats()
            return mrc.header.copy()

    @staticmethod
    def _set_labels(header, labels):
        header.label[:] = b""
        header.label[:len(labels)] = labels
        header.nlabl = len(labels)

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
        offset = self.data_offset + index * self._image_bytes
        os.pwrite(self._fd, memoryview(data).cast("B"), offset)
        if hasattr(os, "posix_fadvise"):
            # start writing this image to disk now (Linux begins writeback on DONTNEED), so
            # the disk works while the next images are computed and close()'s fsync is short;
            # it also keeps a long output from filling the page cache
            os.posix_fadvise(self._fd, offset, self._image_bytes, os.POSIX_FADV_DONTNEED)

    def close(self):
        """Write the header's statistics and move the file into place (a joining writer: its
        images to disk, and the file left to its creator)."""
        if self._header is None:
            os.fsync(self._fd)
            os.close(self._fd)
            return
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
        if self._header is not None:
            os.unlink(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            self.discard()


class SharedStackWriter:
    """One MRC file written by several ranks (distributed.py), each rank its own images.

    Rank 0 creates the temporary file whole (header, extended header, full size) as a
    StackWriter does and passes its name on; the other ranks open it (StackWriter.joining) and
    every rank writes its images by positioned writes. close() is collective: each rank's
    images go to disk, every image's statistics are gathered to rank 0, which fills the header
    from all of them combined in image order (the bytes one process writes) and renames the
    file into place; a barrier then holds every rank until it is there. discard(): rank 0
    removes the temporary file, the others only close it.
    """

    def __init__(self, comm, path, count, shape, dtype=np.float32, label=None, like=None):
        self.comm = comm
        made, self.writer = None, None
        if comm.rank == 0:
            try:
                self.writer = StackWriter(path, count, shape, dtype, label=label, like=like)
                made = (self.writer.temporary_path, self.writer.data_offset)
            except OSError as e:
                made = f"{path}: cannot be created ({e.strerror or e})"
        made = comm.allgather(made)[0]
        if isinstance(made, str):
            raise DataError(made)
        if comm.rank != 0:
            self.writer = StackWriter.joining(path, *made, count, shape, dtype)

    def write(self, image, index):
        self.writer.write(image, index)

    def close(self):
        if self.comm.rank != 0:
            self.writer.close()
        parts = self.comm.allgather(self.writer.written() if self.comm.rank else {})
        if self.comm.rank == 0:
            for part in parts:
                self.writer.add_written(part)
            self.writer.close()
        self.comm.barrier()

    def discard(self):
        self.writer.discard()
