"""Every benchmark in one command: kernels, training step beside PyTorch, I/O and end-to-end,
denoising 4096x4096 micrographs, the cold start and short epochs.

On a machine without a CUDA GPU it times the NumPy reference's training step instead and says
which GPU parts it skipped. Usage: python bench/run_all.py [--quick]  (--quick: no I/O and
denoise benchmarks, which write several GiB of stacks, nor the cold start and short epochs)
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def reference_step(n=4, size=128, steps=3):
    """Median seconds of the reference backend's training step (the CPU fallback)."""
    from cryokern.backends import get_backend
    from cryokern.model import Network, init_params
    from cryokern.step import OptimizerConfig, TrainStep
    rng = np.random.default_rng(0)
    clean = rng.random((n, 1, size, size)).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    net = Network()
    trainer = TrainStep(get_backend("reference"), net, init_params(net, 0),
                        OptimizerConfig("sgd", 0.01, momentum=0.9))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer(noisy, clean)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the I/O and denoise benchmarks")
    args = ap.parse_args()
    from cryokern.backends import gpu_available
    if not gpu_available():
        secs = reference_step()
        print(f"no CUDA GPU: reference step, 4x1x128x128, median of 3: {secs * 1e3:.0f} ms "
              f"({4 / secs:.1f} images/s). Skipped: kernel, step and I/O benchmarks (GPU only).")
        return 0
    # the step also in passes of 2 images of 1024^2 (less memory; the same bits)
    runs = [["kernels.py"], ["step.py"], ["step.py", "--pass-pixels", "2097152"]] + \
        ([] if args.quick else [["train_io.py"], ["denoise.py"], ["first_step.py"],
                                ["short_epochs.py"]])
    status = 0
    for script, *options in runs:
        print(f"\n=== bench/{' '.join([script] + options)}", flush=True)
        status |= subprocess.call([sys.executable, os.path.join(HERE, script)] + options,
                                  cwd=HERE)
    return status


if __name__ == "__main__":
    sys.exit(main())
