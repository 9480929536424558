"""The step's kernels once each at 4x1024^2 (after a warm-up), between cuda.profile_start()
and profile_stop(), for Nsight Compute: ncu --profile-from-start off python bench/profile_case.py
[substring of a case name ...] (bench/kernels.py names the cases)."""
import sys

import numpy as np
from numba import cuda

from kernels import cases

chosen = [(label, fn) for label, fn, _, _ in cases(4, 1024, np.random.default_rng(0))
          if not sys.argv[1:] or any(s in label for s in sys.argv[1:])]
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
