"""MRC files as stacks of 2-D images, read one image at a time by positioned reads.

mrcfile parses and validates the header; the pixels are then read with os.pread at the offset
the header implies, so a stack is never loaded (or memory-mapped) whole and the memory a reader
holds is one image, whatever the file's size. Every problem is reported as a DataError that
names the file.
"""
import os

import mrcfile
import numpy as np
from mrcfile.utils import data_dtype_from_header, data_shape_from_header

from .imagemath import sum_and_range

# int8, int16, float32, uint16, float16: the real-valued modes mrcfile knows
SUPPORTED_MODES = (0, 1, 2, 6, 12)
HEADER_BYTES = 1024


class DataError(Exception):
    """Input that cannot be used; the message names the file and the problem."""


class MrcStack:
    """One MRC file (2-D image, image stack or volume: every z section is an image)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._fd = None
        header = self._read_header()
        mode = int(header.mode)
        if mode not in SUPPORTED_MODES:
            raise DataError(f"{self.path}: MRC mode {mode} is not supported "
                            f"(modes {', '.join(map(str, SUPPORTED_MODES))} are)")
        self.dtype = data_dtype_from_header(header)
        shape = data_shape_from_header(header)
        self.count = int(np.prod(shape[:-2]))
        self.shape = tuple(int(s) for s in shape[-2:])        # (ny, nx): rows, columns
        if self.count == 0 or 0 in self.shape:
            raise DataError(f"{self.path}: empty stack (no images in the header)")
        self.header = header
        self.offset = HEADER_BYTES + int(header.nsymbt)
        self.image_bytes = self.shape[0] * self.shape[1] * self.dtype.itemsize
        need = self.offset + self.count * self.image_bytes
        size = os.path.getsize(self.path)
        if size < need:
            raise DataError(f"{self.path}: truncated: the header promises {self.count} images of "
                            f"{self.shape[0]}x{self.shape[1]} ({need} bytes), the file has {size}")
        self._fd = os.open(self.path, os.O_RDONLY)

    def _read_header(self):
        try:
            with mrcfile.open(self.path, header_only=True, permissive=False) as mrc:
                if type(mrc) is not mrcfile.mrcfile.MrcFile:
                    raise DataError(f"{self.path}: compressed MRC files cannot be streamed; "
                                    "decompress it first")
                return mrc.header.copy()
        except FileNotFoundError:
            raise DataError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{self.path}: is a directory, not an MRC file") from None
        except PermissionError:
            raise DataError(f"{self.path}: permission denied") from None
        except (ValueError, EOFError, OSError) as e:
            raise DataError(f"{self.path}: not a valid MRC file ({e})") from None

    def __len__(self):
        return self.count

    @property
    def layout(self):
        """'image' (2-D file), 'stack' (image stack) or 'volume' (z sections of a volume)."""
        if len(data_shape_from_header(self.header)) == 2:
            return "image"
        return "stack" if int(self.header.ispg) == 0 else "volume"

    @property
    def voxel_size(self):
        """(x, y, z) in angstroms: the cell size over the sampling, 0 where unsampled."""
        cell, h = self.header.cella, self.header
        return tuple(float(c) / int(m) if int(m) > 0 else 0.0
                     for c, m in ((cell.x, h.mx), (cell.y, h.my), (cell.z, h.mz)))

    @property
    def origin(self):
        """The header's origin (x, y, z) and start indices (nxstart, nystart, nzstart)."""
        h = self.header
        return (tuple(float(v) for v in h.origin.item()),
                (int(h.nxstart), int(h.nystart), int(h.nzstart)))

    @property
    def axis_order(self):
        """(mapc, mapr, maps): which axis (1 x, 2 y, 3 z) the columns, rows and sections are."""
        h = self.header
        return int(h.mapc), int(h.mapr), int(h.maps)

    def extended_header(self):
        """The extended header's bytes (b"" when there is none), as the file holds them."""
        size = int(self.header.nsymbt)
        data = os.pread(self._fd, size, HEADER_BYTES) if size else b""
        if len(data) != size:
            raise DataError(f"{self.path}: truncated in the extended header")
        return data

    def read(self, index, out, check_finite=True):
        """Image `index` into `out` (float32, shape self.shape); NaN or Inf pixels are an error
        (unless check_finite is False: for callers that check in a pass of their own, and
        raise self.non_finite(index)).

        float32 files in the machine's byte order are read straight into `out` (no copy)."""
        offset = self.offset + index * self.image_bytes
        if out.shape != self.shape:
            raise ValueError(f"out has shape {out.shape}, the images are {self.shape}")
        if self.dtype == out.dtype and self.dtype.isnative and out.flags.c_contiguous:
            got = os.preadv(self._fd, [memoryview(out).cast("B")], offset)
        else:
            data = os.pread(self._fd, self.image_bytes, offset)
            got = len(data)
            if got == self.image_bytes:
                out[...] = np.frombuffer(data, self.dtype).reshape(self.shape)
        if got != self.image_bytes:
            raise DataError(f"{self.path}: truncated at image {index} (file changed while reading?)")
        if check_finite and self.dtype.kind == "f" and not np.isfinite(sum_and_range(out)[0]):
            raise self.non_finite(index)
        return out

    def non_finite(self, index):
        """The error for image `index` holding NaN or Inf pixels."""
        return DataError(f"{self.path}: image {index} has NaN or Inf pixels")

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()
