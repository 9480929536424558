"""U-Net steps and tiled denoising on a small padded image, for compute-sanitizer (memcheck,
racecheck, initcheck).

Two U-Nets whose kernels are the benchmarked ones (the kernels are generated per channel count,
not per image size): 48,48,48 (the channel counts of the 48-wide U-Net) with the residual and
Adam, 16,24,32 (a part of the lean 16,24,32,48,64) with SGD and momentum, and the Noise2Noise
paper's U-Net with three poolings (the same kernels as its five) with the residual and Adam;
each a training
step (pad, pool, upsample, the concatenation's convolutions, loss, folds, update), a
validation loss, and a TiledDenoiser pass in strips with halos, on 37 x 70 images (padded to
40 x 72: edge blocks and a partial pooling grid).
Usage: compute-sanitizer --tool memcheck python bench/sanitize_unet.py [--device cpu]
"""
import argparse

import numpy as np

from cryokern.backends import get_backend
from cryokern.inference import Model, TiledDenoiser
from cryokern.model import N2NUNet, UNet, init_params
from cryokern.step import OptimizerConfig, TrainStep

CASES = [(UNet((48, 48, 48), residual=True), OptimizerConfig("adam", 1e-3), 2),
         (UNet((16, 24, 32)), OptimizerConfig("sgd", 0.01, momentum=0.9), 1),
         (N2NUNet(levels=3, residual=True), OptimizerConfig("adam", 1e-3), 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="cpu: the same calls on the CPU backend (a smoke test of this script)")
    ap.add_argument("--cases", type=int, nargs="+", default=range(len(CASES)),
                    help="indices into CASES (default: all; racecheck of all takes minutes)")
    args = ap.parse_args(argv)
    backend = get_backend(args.device)
    rng = np.random.default_rng(0)
    for index, (net, optimizer, images) in enumerate(CASES):
        clean = rng.random((images, 1, 37, 70)).astype(np.float32)
        noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
        if index not in args.cases:     # (after its draws: the other cases' data stay)
            continue
        step = TrainStep(backend, net, init_params(net, 0), optimizer)
        sse, count = step(noisy, clean)
        val, _ = step.loss(noisy, clean)
        model = Model("sanitize", net, step.host_params(), "per-image")
        out = TiledDenoiser(model, backend, tile=24).denoise(noisy[0, 0])
        backend.synchronize()
        print(f"{net.label()}: step mse {sse / count:.6f}, then {val / count:.6f}; "
              f"denoised in strips, finite: {bool(np.isfinite(out).all())}")


if __name__ == "__main__":
    main()
