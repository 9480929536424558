"""The step's kernels once each at 4x1024^2 (after a warm-up), between cuda.profile_start()
and profile_stop(), for Nsight Compute: ncu --profile-from-start off python bench/profile_case.py
[--widths 48,96] [substring of a case name ...] (bench/kernels.py names the cases; --widths
adds its U-Net cases at those widths)."""
import argparse

import numpy as np
from numba import cuda

from kernels import cases, unet_cases

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[],
                help="comma-separated: also the U-Net's kernels at these widths (kernels.py's "
                     "unet_cases)")
ap.add_argument("names", nargs="*", help="substrings of the cases to profile (default: all)")
args = ap.parse_args()
rng = np.random.default_rng(0)
every = [case[:2] for case in cases(4, 1024, rng)]
for width in args.widths:
    every += [case[:2] for case in unet_cases(4, 1024, rng, width)]
chosen = [(label, fn) for label, fn in every
          if not args.names or any(s in label for s in args.names)]
for _, fn in chosen:
    fn()
    fn()
cuda.synchronize()
cuda.profile_start()
for label, fn in chosen:
    fn()
    cuda.synchronize()
cuda.profile_stop()
print("profiled:", ", ".join(label for label, _ in chosen))
