"""What recording a GPU rank's step as a CUDA graph saves: the step with NCCL's all-gather
launched eagerly (how ranks ran before the graph held the collective) against the recorded
step, both through an NCCL communicator of one rank, beside the step without a communicator.
One GPU suffices (no other rank), so the figure isolates the host's launch cost from the
all-gather's transfer.
Usage: python bench/recorded_collective.py [--images 4 2] [--size 1024]
"""
import argparse
import os
import sys

import numpy as np
from numba import cuda

sys.path.insert(0, os.path.dirname(__file__))
from step import _device_name, pipelined_ms  # noqa: E402

from cryokern.backends import Eager, get_backend  # noqa: E402
from cryokern.distributed import Nccl, Single  # noqa: E402
from cryokern.model import Network, init_params  # noqa: E402
from cryokern.step import OptimizerConfig, TrainStep  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[4, 2],
                    help="a rank's images a step (2: a global batch of 4 on 2 GPUs)")
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    backend = get_backend("gpu")
    net = Network()
    rng = np.random.default_rng(0)
    print(f"{_device_name()}, {net.label()}, SGD with momentum, "
          "median of 5 runs of 30 pipelined steps, ms a step")
    print(f"{'images':>8} {'no communicator':>16} {'NCCL, eager':>12} {'NCCL, recorded':>15}")
    for n in args.images:
        x, y = (cuda.to_device(rng.standard_normal((n, 1, args.size, args.size))
                               .astype(np.float32)) for _ in "xy")
        times = []
        for comm, eager in ((None, False), (Nccl(Single(), 0), True), (Nccl(Single(), 0), False)):
            step = TrainStep(backend, net, init_params(net, 0),
                             OptimizerConfig("sgd", 0.01, momentum=0.9), comm=comm)
            if eager:
                step._recorder = Eager()
            times.append(sorted(pipelined_ms(lambda: step.launch(x, y)[0], 30)
                                for _ in range(5))[2])
        print(f"{n:>8} {times[0]:>16.3f} {times[1]:>12.3f} {times[2]:>15.3f}")


if __name__ == "__main__":
    main()
