"""I/O benchmark: MRC streaming beside a plain read, and end-to-end training beside the step alone.

Writes a noisy/clean pair of float32 stacks (default 2 x 768 images of 1024x1024, 6 GiB) unless
they exist, then measures, in one run:
  plain read     sequential 64 MiB reads of the noisy file (page cache, then cold)
  loader         cryokern's batch loader over one epoch, no GPU (page cache, then cold), its
                 threads and its worker processes (loader_workers.py)
  train          `python -m cryokern.train` for two epochs on the stacks (images/s of each,
                 the first with start-up; peak RSS), with worker processes (the default on a
                 GPU) and with threads (--loader-workers 0)
  step only      the training step on a device-resident batch, pipelined as train runs it
Cold reads evict the files with posix_fadvise(DONTNEED) first.
Usage: python bench/train_io.py [--dir /tmp/cryokern-io] [--images 768] [--size 1024]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import mrcfile
import numpy as np

from cryokern.data import BatchLoader, PairedImages, Subset, epoch_batches
from cryokern.loader_workers import WorkerPool, default_workers


def make_stack(path, n, size, seed):
    if os.path.exists(path):
        return
    base = np.random.default_rng(seed).standard_normal((16, size, size)).astype(np.float32)
    with mrcfile.new_mmap(path + ".tmp", shape=(n, size, size), mrc_mode=2) as mrc:
        for i in range(0, n, 16):
            k = min(16, n - i)
            mrc.data[i:i + k] = base[:k]
        mrc.set_image_stack()
    os.replace(path + ".tmp", path)


def evict(*paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def plain_read(path):
    t = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while (k := f.readinto(buf)):
            total += k
    return total, time.perf_counter() - t


def loader_pass(noisy, clean, batch, workers=0):
    """One epoch through the loader: threads of this process, or `workers` worker processes
    (loader_workers.py; their start-up not timed)."""
    sub = Subset(PairedImages([(noisy, clean)]), np.arange(len(PairedImages([(noisy, clean)]))))
    specs = epoch_batches(sub, batch, 0, 0)
    shape = (batch, 1) + sub.image_shape
    pool = WorkerPool(workers) if workers else None
    empty = pool.empty if pool else (lambda s: np.empty(s, np.float32))
    buffers = [(empty(shape), empty(shape)) for _ in range(4)]
    t = time.perf_counter()
    loader = BatchLoader(sub, specs, "per-image", buffers, pool=pool)
    for _ in loader:
        pass
    loader.close()
    seconds = time.perf_counter() - t
    if pool:
        del buffers
        pool.close()
    return len(sub), seconds


def train_pass(noisy, clean, batch, out, extra=()):
    """The metrics of two epochs: the first includes start-up (loading the compiled kernels,
    allocating), the second is the steady state."""
    cmd = [sys.executable, "-m", "cryokern.train", "--noisy", noisy, "--clean", clean,
           "--channels", "1,16,16,1", "--epochs", "2", "--val-fraction", "0", "--batch-size",
           str(batch), "--out", out, "--force", *extra]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def step_only(batch, size):
    from numba import cuda
    sys.path.insert(0, os.path.dirname(__file__))
    from step import pipelined_ms

    from cryokern.backends import get_backend
    from cryokern.model import Network, init_params
    from cryokern.step import OptimizerConfig, TrainStep
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((batch, 1, size, size)).astype(np.float32))
    y = cuda.to_device(rng.standard_normal((batch, 1, size, size)).astype(np.float32))
    net = Network()
    step = TrainStep(get_backend("gpu"), net, init_params(net, 0),
                     OptimizerConfig("sgd", 0.01, momentum=0.9))
    return pipelined_ms(lambda: step.launch(x, y)[0], 30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/cryokern-io")
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    noisy, clean = (os.path.join(args.dir, f"{k}.mrcs") for k in ("noisy", "clean"))
    make_stack(noisy, args.images, args.size, 1)
    make_stack(clean, args.images, args.size, 2)
    gb = os.path.getsize(noisy) / 1e9
    rows = []
    for cache in ("cold", "page cache"):
        if cache == "cold":
            evict(noisy)
        total, sec = plain_read(noisy)
        rows.append((f"plain sequential read, {cache}", args.images / sec, total / sec / 1e9))
    for cache in ("cold", "page cache"):
        if cache == "cold":
            evict(noisy, clean)
        for workers in (0, default_workers()):
            if cache == "cold":
                evict(noisy, clean)
            n, sec = loader_pass(noisy, clean, args.batch, workers)
            who = f"{workers} workers" if workers else "threads"
            rows.append((f"loader ({who}, per-image), {cache}", n / sec, 2 * gb / sec))
    ends = {}
    for who, extra in (("workers", ("--loader-workers", str(default_workers()))),
                       ("threads", ("--loader-workers", "0"))):
        first, ends[who] = train_pass(noisy, clean, args.batch, os.path.join(args.dir, "run"),
                                      extra)
        rows.append((f"train ({who}), epoch 1 (with start-up), page cache",
                     first["images_per_s"], 2 * gb * first["images_per_s"] / args.images))
        rows.append((f"train ({who}), epoch 2, page cache", ends[who]["images_per_s"],
                     2 * gb * ends[who]["images_per_s"] / args.images))
    record = ends["workers"]
    from cryokern.backends import gpu_available
    if gpu_available():
        ms = step_only(args.batch, args.size)
        rows.append(("step only (device-resident batch)", args.batch / ms * 1e3, float("nan")))
    print(f"\n{time.strftime('%Y-%m-%d')}  stacks: 2 x {args.images} images of {args.size}^2 "
          f"float32 ({gb:.2f} GB each), batch {args.batch}")
    print(f"{'what':46s} {'images/s':>9s} {'GB/s':>7s}")
    for name, ips, gbs in rows:
        print(f"{name:46s} {ips:9.1f} {gbs:7.2f}")
    print(f"train: peak resident memory {record['peak_rss_mib']:.0f} MiB")
    if rows[-1][0].startswith("step only"):
        for who, r in ends.items():
            print(f"end-to-end (epoch 2, {who}) / step-only throughput: "
                  f"{r['images_per_s'] / rows[-1][1]:.2f}")


if __name__ == "__main__":
    main()
