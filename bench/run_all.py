"""Every benchmark in one command: kernels, training step beside PyTorch, I/O and end-to-end,
denoising 4096x4096 micrographs, the cold start and short epochs.

On a machine without a CUDA GPU it runs bench/cpu_backend.py instead (the compiled CPU backend
beside the NumPy reference) and says which GPU parts it skipped.
Usage: python bench/run_all.py [--quick]  (--quick: no I/O and denoise benchmarks, which write
several GiB of stacks, nor the cold start and short epochs; on a CPU, no demo timing)
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="skip the I/O, denoise, cold-start and short-epoch benchmarks (on a CPU: "
                         "the demo's timing)")
    args = ap.parse_args()
    from cryokern.backends import gpu_available
    if not gpu_available():
        print("no CUDA GPU: the CPU backend beside the reference (bench/cpu_backend.py). "
              "Skipped: kernel, step, I/O, denoise, cold-start and short-epoch benchmarks "
              "(GPU only).", flush=True)
        return subprocess.call([sys.executable, os.path.join(HERE, "cpu_backend.py")] +
                               (["--no-demo"] if args.quick else []), cwd=HERE)
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
