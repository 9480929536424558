"""Training data: noisy/clean MRC pairs, the epoch's order and crops, and the batch loader.

Everything a batch holds is a function of (seed, epoch, batch index) alone, so a run resumed
mid-epoch sees exactly the batches the uninterrupted run saw. See README "Data" for the options.
"""
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import imagemath
from .mrcstack import DataError, MrcStack

NORMALIZATIONS = ("per-image", "none")
# stream ids for np.random.default_rng([seed, STREAM, ...]): independent, documented draws
_ORDER, _CROP, _SPLIT = 1, 2, 3


class PairedImages:
    """Images of one or more noisy/clean file pairs, addressed by one index in file order."""

    def __init__(self, pairs):
        self.pairs = []
        for noisy_path, clean_path in pairs:
            noisy, clean = MrcStack(noisy_path), MrcStack(clean_path)
            if len(noisy) != len(clean):
                raise DataError(f"{noisy.path}: {len(noisy)} images, but its clean partner "
                                f"{clean.path} has {len(clean)}")
            if noisy.shape != clean.shape:
                raise DataError(f"{noisy.path}: images are {noisy.shape[0]}x{noisy.shape[1]}, but "
                                f"its clean partner {clean.path} has {clean.shape[0]}x{clean.shape[1]}")
            self.pairs.append((noisy, clean))
        if not self.pairs:
            raise DataError("no training files given")
        self.starts = np.cumsum([0] + [len(n) for n, _ in self.pairs])

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, index):
        pair = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.pairs[pair], index - int(self.starts[pair])

    def shape(self, index):
        return self.locate(index)[0][0].shape

    def describe(self):
        return [{"noisy": n.path, "clean": c.path, "images": len(n), "shape": list(n.shape)}
                for n, c in self.pairs]


@dataclass(frozen=True)
class Subset:
    """Some images of a PairedImages (a training or validation split), all of one shape
    once cropped."""
    images: PairedImages
    indices: np.ndarray
    crop: int = 0

    def __post_init__(self):
        shapes = {self.images.shape(int(i)) for i in self.indices}
        if self.crop:
            small = [s for s in shapes if min(s) < self.crop]
            if small:
                raise DataError(f"crop {self.crop} is larger than the {small[0][0]}x{small[0][1]} "
                                f"images of {self._file_of(small[0])}")
        elif len(shapes) > 1:
            a, b = sorted(shapes)[:2]
            raise DataError(f"{self._file_of(b)}: images are {b[0]}x{b[1]}, but "
                            f"{self._file_of(a)} has {a[0]}x{a[1]}; give --crop to train on both")

    def _file_of(self, shape):
        return next(n.path for n, _ in self.images.pairs if n.shape == shape)

    def __len__(self):
        return len(self.indices)

    @property
    def image_shape(self):
        if self.crop:
            return (self.crop, self.crop)
        return self.images.shape(int(self.indices[0]))


def split(images, val_fraction, seed):
    """(train indices, validation indices): a seeded random val_fraction of the images."""
    n = len(images)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    n_val = min(n_val, n - 1)
    order = np.random.default_rng([seed, _SPLIT]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass(frozen=True)
class BatchSpec:
    """Which images form a batch, and where each is cropped (top-left corner)."""
    indices: np.ndarray
    corners: np.ndarray


def epoch_batches(subset, batch_size, seed, epoch, shuffle=True):
    """The batches of one epoch: a seeded permutation (or file order), random crops when
    training, centred crops otherwise; the last batch may be smaller."""
    n = len(subset)
    order = np.random.default_rng([seed, _ORDER, epoch]).permutation(n) if shuffle \
        else np.arange(n)
    indices = subset.indices[order]
    corners = np.zeros((n, 2), np.int64)
    if subset.crop:
        shapes = np.array([subset.images.shape(int(i)) for i in indices]).reshape(n, 2)
        room = shapes - subset.crop + 1
        if shuffle:
            draw = np.random.default_rng([seed, _CROP, epoch]).random((n, 2))
            corners = np.minimum((draw * room).astype(np.int64), room - 1)
        else:
            corners = (room - 1) // 2
    return [BatchSpec(indices[s:s + batch_size], corners[s:s + batch_size])
            for s in range(0, n, batch_size)]


def normalization(noisy, mode):
    """(mean, scale) of the affine map x -> (x - mean) * scale that `mode` applies to an image
    pair: per-image standardizes the noisy image (its mean and standard deviation, in float64);
    a constant image is only shifted. None for mode 'none'."""
    if mode == "none":
        return None
    count, mean, squared_deviations, _, _ = imagemath.statistics(noisy)
    std = np.sqrt(squared_deviations / count)
    return mean, (1.0 / std if std > 0 else 1.0)


IDENTITY = (0.0, 1.0)       # (mean, scale) of mode 'none': exactly the identity map


def normalize(image, affine, out=None):
    """The image under the map from `normalization` (float64 arithmetic, float32 result)."""
    if affine is None and out is None:
        return image
    return imagemath.standardize(image, *(affine or IDENTITY), out)


def normalize_with_range(image, affine, out):
    """normalize() into `out`, in the same pass giving out's (min, max) and whether every pixel
    of `image` is finite."""
    return imagemath.standardize_with_range(image, *(affine or IDENTITY), out)


def denormalize(image, affine, out=None):
    """The inverse map, for the network's output: back in the input's units (float32)."""
    if affine is None and out is None:
        return image
    return imagemath.destandardize(image, *(affine or IDENTITY), out)


_read_buffers = threading.local()


def _read_buffer(which, shape):
    """A float32 image buffer reused by this thread (no allocation, no page faults per image)."""
    if not hasattr(_read_buffers, "buffers"):
        _read_buffers.buffers = {}
    buffers = _read_buffers.buffers
    if (which, shape) not in buffers:
        buffers[(which, shape)] = np.empty(shape, np.float32)
    return buffers[(which, shape)]


def fill_image(images, shape, index, corner, normalize_mode, noisy_out, clean_out):
    """Read image pair `index` of `images` (PairedImages), normalize it by the whole noisy
    image's statistics and write its crop of `shape` (h, w) at `corner` into
    noisy_out/clean_out; returns the clean crop's (min, max), for PSNR.

    The loader is bound by host memory traffic: the finiteness checks ride on passes made
    anyway (the noisy image's mean, the clean crop's map and range), four passes per pair
    where there were seven."""
    h, w = shape
    top, left = corner
    (noisy, clean), local = images.locate(int(index))
    a = noisy.read(local, _read_buffer("noisy", noisy.shape), check_finite=False)
    b = clean.read(local, _read_buffer("clean", clean.shape), check_finite=False)
    affine = normalization(a, normalize_mode)
    # the noisy mean (or, unnormalized, sum) is finite exactly when every pixel is
    if not np.isfinite(affine[0] if affine else imagemath.sum_and_range(a)[0]):
        raise noisy.non_finite(local)
    normalize(a[top:top + h, left:left + w], affine, out=noisy_out)
    lo, hi, finite = normalize_with_range(b[top:top + h, left:left + w], affine, clean_out)
    if not finite or (b.shape != (h, w) and not np.isfinite(imagemath.sum_and_range(b)[0])):
        raise clean.non_finite(local)
    return lo, hi


def submit_batch(fill, subset, spec, normalize_mode, noisy_out, clean_out):
    """Start filling a batch (N, 1, h, w): one job per image, `fill(subset, index, corner,
    normalize_mode, noisy_out, clean_out)` giving a Future, each into its own slot, so the
    result does not depend on who fills it; each job returns its clean crop's (min, max)."""
    return [fill(subset, i, c, normalize_mode, noisy_out[k, 0], clean_out[k, 0])
            for k, (i, c) in enumerate(zip(spec.indices, spec.corners))]


def _filled_in_thread(pool):
    """fill() for submit_batch on a thread pool of this process."""
    def fill(subset, index, corner, normalize_mode, noisy_out, clean_out):
        return pool.submit(fill_image, subset.images, subset.image_shape, index, corner,
                           normalize_mode, noisy_out, clean_out)
    return fill


class BatchLoader:
    """Fills batches on a background thread, ahead of their use, into a fixed pool of host
    buffer pairs (page-locked when the backend provides them): host memory is the pool,
    whatever the dataset's size, and reading overlaps the GPU's work. Iterating gives
    (noisy, clean, lo, hi) per batch; a batch's buffers are refilled once the next batch is
    asked for, so use a batch before asking for the next.

    The images are filled by `workers` threads of this process, or, given `pool` (a
    loader_workers.WorkerPool, whose `empty` buffers must then be the `buffers`), by its worker
    processes, out of this process's GIL. Either way, the same bytes.

    `specs` may be any iterable, read on the loader's thread as it goes: train passes the
    batches of every epoch left, so that the next epoch's first batches are read while the
    last steps of an epoch run, and no epoch starts by waiting for the disk."""

    def __init__(self, subset, specs, normalize, buffers, workers=None, pool=None):
        # reading and converting is CPU-bound (several passes over each image): the images of
        # every batch that has free buffers are filled at once, one thread each, up to
        # `workers` (default: a thread per core but two, for the thread that launches the
        # step's kernels and this one's filler, up to 12: on a 16-core H100 host, 1024^2 pairs
        # went 802-844/s on 4 threads, 1482 on 8, 1609-1753 on 12, 1669-1822 on 16; the step
        # alone takes ~1340 images/s, 2026-11-27)
        self._threads = None if pool is not None else ThreadPoolExecutor(
            workers or min(12, max(1, (os.cpu_count() or 1) - 2)))
        self._fill_image = pool.fill if pool is not None else _filled_in_thread(self._threads)
        self._pending = set()       # jobs sent to worker processes, not yet done
        self._free = queue.Queue()
        for pair in buffers:
            self._free.put(pair)
        self._ready = queue.Queue()
        self._stop = threading.Event()
        self._specs = specs
        self._thread = threading.Thread(target=self._fill, args=(subset, normalize), daemon=True)
        self._thread.start()

    def _fill(self, subset, normalize):
        try:
            for spec in self._specs:
                buffers = self._free.get()
                if buffers is None or self._stop.is_set():
                    return
                noisy, clean = buffers
                jobs = submit_batch(self._fill_image, subset, spec, normalize, noisy, clean)
                if self._threads is None:
                    self._pending.update(jobs)
                    for job in jobs:
                        job.add_done_callback(self._pending.discard)
                self._ready.put((noisy, clean, len(spec.indices), jobs))
            self._ready.put(None)   # the end
        except BaseException as e:  # handed to the consumer, which raises it
            self._ready.put(e)

    def __iter__(self):
        previous = None
        while True:
            if previous is not None:
                self._free.put(previous)
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            noisy, clean, n, jobs = item
            ranges = [job.result() for job in jobs]
            previous = (noisy, clean)
            yield (noisy[:n], clean[:n], min((lo for lo, _ in ranges), default=math.inf),
                   max((hi for _, hi in ranges), default=-math.inf))

    def close(self):
        """Stop the thread and the jobs not yet started; wait for those running, which write
        into buffers that may be reused after this returns."""
        self._stop.set()
        self._free.put(None)
        self._thread.join()
        if self._threads is not None:
            self._threads.shutdown(cancel_futures=True)
        for job in list(self._pending):     # sent to a worker: it will write, so wait
            job.exception()
