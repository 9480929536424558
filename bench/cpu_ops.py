"""The compiled CPU backend's convolutions and a U-Net step on one thread, for trees side by side
(before/after a change to cryokern/cpu), alternated so that a shared machine's load falls on
each alike.

Each round runs every tree once in a fresh process (NUMBA_NUM_THREADS=1, its numba cache warmed
by a first call): 16->16 on 4x16x64x64 forward with ReLU, backward-data masked by ReLU, weight
gradients; the U-Net's concatenation forward 16+16->16 with LeakyReLU; a whole U-Net 16,16,16
Adam step on 4x1x64x64. Per operation: the best (least disturbed by other programs) and the
median of --repeats calls, in ms, each round a row.

Usage: python bench/cpu_ops.py TREE [TREE ...] [--rounds 3] [--repeats 40]
  TREE: a cryokern tree (e.g. `git archive COMMIT | tar x -C DIR` for an older commit).
"""
import argparse
import json
import os
import subprocess
import sys

CASES = r"""
import json, statistics, sys, time
import numpy as np
from cryokern import cpu as C
from cryokern.backends import get_backend
from cryokern.model import UNet, init_params
from cryokern.step import OptimizerConfig, TrainStep

rng = np.random.default_rng(0)
x, gy, x2 = (rng.standard_normal((4, 16, 64, 64)).astype(np.float32) for _ in range(3))
w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
w2 = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)
b = rng.standard_normal(16).astype(np.float32)
y = C.conv2d_forward(x, w, b, relu=True)
out = np.empty_like(x)
net = UNet((16, 16, 16))
step = TrainStep(get_backend("cpu"), net, init_params(net, 0), OptimizerConfig("adam", lr=1e-3))
noisy, clean = (rng.standard_normal((4, 1, 64, 64)).astype(np.float32) for _ in range(2))
cases = {
    "forward 16->16 relu": lambda: C.conv2d_forward(x, w, b, relu=True, out=out),
    "backward-data 16->16 masked": lambda: C.conv2d_backward_data(gy, w, relu_output=y, out=out),
    "weights 16->16": lambda: C.conv2d_backward_weights(gy, x),
    "forward 16+16->16 leaky": lambda: C.conv2d_forward(x, w2, b, leaky_slope=0.1, x2=x2,
                                                        out=out),
    "U-Net 16,16,16 Adam step 4x64^2": lambda: step(noisy, clean),
}
result = {}
for name, case in cases.items():
    case()
    times = []
    for _ in range(int(sys.argv[1])):
        start = time.perf_counter()
        case()
        times.append((time.perf_counter() - start) * 1e3)
    result[name] = (min(times), statistics.median(times))
print(json.dumps(result))
"""


def run(tree, repeats):
    env = dict(os.environ, PYTHONPATH=tree, NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CASES, str(repeats)], cwd=tree, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    rows = {}
    for _ in range(args.rounds):
        for tree in args.trees:
            for name, (best, median) in run(os.path.abspath(tree), args.repeats).items():
                rows.setdefault(name, {}).setdefault(tree, []).append(f"{best:.2f} ({median:.2f})")
    print(f"one thread, ms: best (median) of {args.repeats}, {args.rounds} alternated rounds, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for name, by_tree in rows.items():
        print(f"{name}:")
        for tree, cells in by_tree.items():
            print(f"  {tree}: {', '.join(cells)}")


if __name__ == "__main__":
    main()
