"""SASS opcode histogram of the 16 -> 16 convolution kernels (needs nvdisasm), and one launch
of each for a profiler: ncu --clock-control none -k regex:kernel python bench/inspect_sass.py
"""
import collections
import re
import sys

import numpy as np
from numba import cuda

from cryokern import kernels as K
from cryokern.kernels import conv

rng = np.random.default_rng(0)
a = cuda.to_device(rng.standard_normal((4, 16, 1024, 1024)).astype(np.float32))
w = cuda.to_device(rng.standard_normal((16, 16, 3, 3)).astype(np.float32))
b = cuda.to_device(rng.standard_normal(16).astype(np.float32))
K.conv2d_forward(a, w, b, relu=True)
K.conv2d_backward_weights(a, a)
cuda.synchronize()
if "--no-sass" in sys.argv:
    sys.exit()
for name, k in {"forward": conv._forward_kernel(16, 16, True, False, False)[0],
                "weights": conv._weights_kernel(16, 16, conv.weights_variant(16, 16))[0]}.items():
    sass = "\n".join(k.inspect_sass().values()) if isinstance(k.inspect_sass(), dict) \
        else k.inspect_sass()
    ops = collections.Counter(m.group(1).split(".")[0] for m in
                              re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    total = sum(ops.values())
    print(f"{name}: {total} instructions; " +
          ", ".join(f"{op} {n}" for op, n in ops.most_common(14)))
