"""The batch loader's worker processes (loader_workers.py): the bytes of the in-process
threads for any number of workers, errors that name the file, a dead worker that fails its
jobs instead of hanging, nothing left behind when the pool closes, and connections without
Nagle's delays."""
import os

import numpy as np
import pytest

from conftest import bits
from cryokern.data import BatchLoader, Subset, epoch_batches
from cryokern.loader_workers import WorkerPool
from cryokern.mrcstack import DataError
from test_data import stack_pair
from test_localsocket import nagle_off


def batches(subset, specs, pool=None, depth=2):
    """Every batch's bytes and ranges, through a loader of `pool`'s workers (None: threads)."""
    shape = (3, 1) + subset.image_shape
    empty = pool.empty if pool else (lambda s: np.empty(s, np.float32))
    buffers = [(empty(shape), empty(shape)) for _ in range(depth)]
    loader = BatchLoader(subset, specs, "per-image", buffers, workers=2, pool=pool)
    try:
        return [(bits(n).tobytes(), bits(c).tobytes(), lo, hi) for n, c, lo, hi in loader]
    finally:
        loader.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_fill_the_bytes_of_threads(tmp_path, workers):
    images, _ = stack_pair(tmp_path, n=8)
    subset = Subset(images, np.arange(8), crop=6)
    specs = epoch_batches(subset, 3, seed=4, epoch=1)      # random crops, a ragged last batch
    want = batches(subset, specs)
    pool = WorkerPool(workers, pin=workers > 1)    # page-locked where numba can, else not
    try:
        assert batches(subset, specs, pool) == want
        assert batches(subset, specs[1:], pool) == want[1:]     # the pool serves loader after loader
    finally:
        pool.close()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # mrcfile's, writing the bad file
def test_a_bad_image_in_a_worker_names_its_file(tmp_path):
    images, _ = stack_pair(tmp_path, bad=("clean", 4, 2, 3, np.nan))
    subset = Subset(images, np.arange(7))
    pool = WorkerPool(2)
    try:
        with pytest.raises(DataError, match=r"clean\.mrcs: image 4 has NaN or Inf pixels"):
            batches(subset, epoch_batches(subset, 3, seed=0, epoch=0, shuffle=False), pool)
    finally:
        pool.close()


def test_a_dead_worker_fails_its_jobs_and_close_leaves_nothing(tmp_path):
    images, _ = stack_pair(tmp_path)
    subset = Subset(images, np.arange(7))
    pool = WorkerPool(2)
    buffer = pool.empty((2, 1, 10, 14))
    names = [s[0].name for s in pool._segments]
    pool._procs[1].kill()
    pool._procs[1].wait()
    jobs = [pool.fill(subset, i, (0, 0), "none", buffer[i, 0], buffer[i, 0]) for i in (0, 1)]
    assert jobs[0].result(timeout=30) is not None       # worker 0 still serves
    with pytest.raises((RuntimeError, OSError)):
        jobs[1].result(timeout=30)
    del buffer
    pool.close()
    assert all(p.poll() is not None for p in pool._procs)
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in names)



def test_the_pool_talks_to_its_workers_without_nagle():
    """A job and its result are one short message each way; with Nagle's algorithm a second
    short message waits for the peer's delayed acknowledgement (localsocket.py)."""
    pool = WorkerPool(2)
    try:
        assert all(nagle_off(c) for c in pool._connections)
    finally:
        pool.close()
