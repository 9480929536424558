"""The compiled CPU backend (cryokern.cpu) beside the NumPy reference, same run, same machine.

1. The exact fma, two ways, in the convolution's loop shape (a row of independent chains,
   each over 144 taps): LLVM's llvm.fma.f32 (what cryokern.cpu uses) and an exact emulation
   in float64 (the product of two float32 is exact; the sum rounded once in float64, then to
   float32, with the rare float32-midpoint and subnormal sums redone by round-to-odd, as
   reference.fma32 does). Both are checked bit for bit against each other.
2. A network's training step (--net, bench/nets.py's specs; default train's default, the
   48-wide U-Net with Adam; `1,16,16,1` the chain with SGD, momentum 0.9: train's optimizer
   defaults) and forward pass (the chain into buffers allocated once, as denoise runs it; a
   U-Net allocating its arrays in each call) on batches of 4 images, both backends: median and
   best of repeats, and the ratio; the parameters after the steps are compared bit for bit.
3. The README's no-argument demo, `python -m cryokern.train --device cpu`, timed as a command:
   first with empty numba and dataset caches (it compiles and generates the data), then twice
   warm, then warm with numba's OpenMP threads spinning while they wait.
4. One 4096x4096 micrograph denoised on the cpu backend with that network (the reference would
   take minutes).

Usage: python bench/cpu_backend.py [--net SPEC] [--sizes 64,128] [--steps 5] [--no-demo]
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np

import cryokern.cpu  # noqa: F401  (first: it sets numba's OpenMP wait policy)
from numba import njit, prange

from cryokern import train as T
from cryokern.backends import get_backend
from cryokern.cpu.fma import fma32
from cryokern.model import PooledNetwork, forward, init_params
from cryokern.step import TrainStep

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nets  # noqa: E402  (bench/nets.py: the networks a benchmark names)

DEFAULT_NET = "unet:" + ",".join(map(str, T.DEFAULT_UNET_WIDTHS))
TAPS = 144                        # a 16 -> 16 layer's chain length

_LOW29 = (1 << 29) - 1            # float64 mantissa bits below float32 precision
_MIDPOINT = 1 << 28
_EXP_MASK = 0x7FF0000000000000
_SMALLEST_NORMAL32 = 0x3810000000000000


@njit(parallel=True)            # not cached: its machine code is inspected below
def chains_intrinsic(x, w, acc):
    """acc[j] = chain over taps k of fma(x[k, j], w[k]): rows of independent chains."""
    rows, width = acc.shape
    for r in prange(rows):
        for k in range(x.shape[0]):
            wk = w[k]
            for j in range(width):
                acc[r, j] = fma32(x[k, j], wk, acc[r, j])


@njit(cache=True)
def _round_to_odd(s, a, b, c):
    """a*b + c rounded to odd in float64, given s = its round-to-nearest (TwoSum error)."""
    p = np.float64(a) * np.float64(b)
    bv = s - p
    err = (p - (s - bv)) + (np.float64(c) - bv)
    if not np.isfinite(s) or err == 0:
        return s
    bits = np.array([s]).view(np.int64)
    if bits[0] & 1 == 0:
        bits[0] += 1 if (err > 0) == (s > 0) else -1
    return bits.view(np.float64)[0]


@njit(parallel=True, cache=True)
def chains_emulated(x, w, acc):
    """The same chains with the exact fma emulated: float64 product and sum, one check of the
    sum's bits, the rare suspects redone (bits of s read through an int64 view of a row)."""
    rows, width = acc.shape
    for r in prange(rows):
        s = np.empty(width, np.float64)
        sb = s.view(np.int64)
        for k in range(x.shape[0]):
            wk = np.float64(w[k])
            for j in range(width):
                s[j] = np.float64(x[k, j]) * wk + np.float64(acc[r, j])
            for j in range(width):
                if (sb[j] & _LOW29) == _MIDPOINT or (sb[j] & _EXP_MASK) < _SMALLEST_NORMAL32:
                    s[j] = _round_to_odd(s[j], x[k, j], w[k], acc[r, j])
                acc[r, j] = np.float32(s[j])


def best_and_median(fn, repeats):
    """(best, median) seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def fma_choice(repeats):
    rng = np.random.default_rng(0)
    rows, width = 64, 1024
    x = rng.standard_normal((TAPS, width)).astype(np.float32)
    w = (rng.standard_normal(TAPS) * 0.1).astype(np.float32)
    start = rng.standard_normal((rows, width)).astype(np.float32)
    results = {}
    for name, fn in (("llvm.fma.f32", chains_intrinsic), ("emulated", chains_emulated)):
        acc = start.copy()
        fn(x, w, acc)                                   # compile, and the bits to compare
        results[name] = acc
        best, median = best_and_median(lambda: fn(x, w, start.copy()), repeats)
        fmas = rows * width * TAPS
        print(f"  {name:13s} best {best * 1e3:7.2f} ms  median {median * 1e3:7.2f} ms  "
              f"{fmas / best / 1e9:6.2f} Gfma/s")
    same = np.array_equal(results["llvm.fma.f32"].view(np.uint32),
                          results["emulated"].view(np.uint32))
    print(f"  same bits: {same}")
    asm = "".join(chains_intrinsic.inspect_asm(s) for s in chains_intrinsic.signatures)
    print(f"  llvm.fma.f32 compiled to: {'vector vfmadd (ps)' if 'ps' in _fma_ops(asm) else ''}"
          f"{' scalar vfmadd (ss)' if 'ss' in _fma_ops(asm) else ''}"
          f"{' a call of fmaf' if 'fmaf' in asm else ''}")


def _fma_ops(asm):
    return {line.split()[0][-2:] for line in asm.splitlines() if line.strip().startswith("vfmadd")}


def network_timings(spec, size, steps):
    rng = np.random.default_rng(0)
    clean = rng.random((4, 1, size, size)).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    net, optimizer = spec.network, spec.optimizer()
    found = {}
    for name, repeats in (("cpu", 10 * steps), ("reference", steps)):
        be = get_backend(name)
        trainer = TrainStep(be, net, init_params(net, 0), optimizer)
        trainer(noisy, clean)                           # compiles (cpu), allocates
        step = best_and_median(lambda: trainer(noisy, clean), repeats)
        steps_taken = trainer.step
        params = {k: be.to_device(v) for k, v in init_params(net, 0).items()}
        outs = None if isinstance(net, PooledNetwork) else \
            [be.empty((4, c, size, size)) for c in net.channels[1:]]   # as denoise runs it
        fwd = best_and_median(lambda: forward(be, net, params, noisy, outs), repeats)
        found[name] = step, fwd, steps_taken, trainer.host_params()
        print(f"  {name:9s} 4x1x{size}x{size}: step best {step[0] * 1e3:8.2f} ms median "
              f"{step[1] * 1e3:8.2f} ms | forward best {fwd[0] * 1e3:8.2f} ms median "
              f"{fwd[1] * 1e3:8.2f} ms", flush=True)
    cpu, ref = found["cpu"], found["reference"]
    print(f"  ratio reference/cpu (median): step {ref[0][1] / cpu[0][1]:.0f}x, "
          f"forward {ref[1][1] / cpu[1][1]:.0f}x; (best): step {ref[0][0] / cpu[0][0]:.0f}x, "
          f"forward {ref[1][0] / cpu[1][0]:.0f}x; cpu {4 / cpu[0][1]:.0f} training images/s")
    # the same bits: the reference run, replayed on the cpu backend for as many steps
    trainer = TrainStep(get_backend("cpu"), net, init_params(net, 0), optimizer)
    for _ in range(ref[2]):
        trainer(noisy, clean)
    same = all(np.array_equal(trainer.host_params()[k].view(np.uint32), v.view(np.uint32))
               for k, v in ref[3].items())
    print(f"  parameters after {ref[2]} steps bit-identical on both backends: {same}")


def denoise_micrograph(net, size=4096):
    """Seconds to denoise one size x size micrograph with `net` on the cpu backend
    (TiledDenoiser.denoise, default tiles: what denoise does per image, without the file
    reading and writing)."""
    from cryokern.inference import Model, TiledDenoiser
    denoiser = TiledDenoiser(Model("untrained", net, init_params(net, 0), "per-image"),
                             get_backend("cpu"))
    image = np.random.default_rng(1).random((size, size)).astype(np.float32)
    denoiser.denoise(image[:64, :64])                   # compiled already; allocates little
    best, median = best_and_median(lambda: denoiser.denoise(image), 2)
    print(f"  one {size}x{size} micrograph: best {best:.2f} s, median {median:.2f} s")


def demo_wall_times():
    """Seconds of `python -m cryokern.train --device cpu` with cold caches, then warm (twice),
    then warm with numba's OpenMP threads spinning while they wait (cryokern.cpu makes them
    sleep unless OMP_WAIT_POLICY is set)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CRYOKERN_CACHE=os.path.join(tmp, "cache"),
                   NUMBA_CACHE_DIR=os.path.join(tmp, "numba"))
        env.pop("OMP_WAIT_POLICY", None)
        runs = [("first run (empty caches: compiles, generates the data)", {}),
                ("second run", {}), ("third run", {}),
                ("again, OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"})]
        for i, (label, extra) in enumerate(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cryokern.train", "--device", "cpu",
                            "--out", os.path.join(tmp, f"run{i}")], env=dict(env, **extra),
                           check=True, stdout=subprocess.DEVNULL)
            print(f"  {label}: {time.perf_counter() - start:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", type=nets.parse_net, default=nets.parse_net(DEFAULT_NET),
                    help=f"the network (bench/nets.py's specs; default {DEFAULT_NET}, train's "
                         "default)")
    ap.add_argument("--sizes", default="64,128", help="image sizes of the batches (4 images)")
    ap.add_argument("--steps", type=int, default=5, help="reference repeats (cpu: 10x as many)")
    ap.add_argument("--no-demo", action="store_true", help="skip timing the demo command")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here).stdout.strip()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads), "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("exact fma, chains of 144 taps over 64 rows of 1024:")
    fma_choice(20)
    print(f"threading layer: {numba.threading_layer()}")
    optimizer = args.net.optimizer()
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"{args.net.network.label()}, {optimizer.kind} lr {optimizer.lr:g}:")
        network_timings(args.net, size, args.steps)
    print(f"denoising, {args.net.network.label()}, cpu backend:")
    denoise_micrograph(args.net.network)
    if not args.no_demo:
        print("README demo, python -m cryokern.train --device cpu:")
        demo_wall_times()


if __name__ == "__main__":
    main()
