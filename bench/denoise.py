"""Denoising benchmark: 4096x4096 micrographs per second, end to end, with where the time goes.

Writes a stack of --count float32 micrographs, then times (medians, one process, one device):
the whole `denoise_file` pipeline from the page cache (what `python -m cryokern.denoise` runs);
its stages alone (read + normalize, GPU tiles with their copies, un-normalize + write); the
network's forward kernels alone on the whole image (CUDA events); PyTorch's
eager fp32 forward of the same network on the whole image as the peer; and the command itself
in a fresh process (start-up and kernel-cache load included).
Usage: python bench/denoise.py [--size 4096] [--count 24] [--tile 2048] [--dir /tmp]
"""
import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from numba import cuda

from cryokern import checkpoint
from cryokern.backends import get_backend
from cryokern.data import denormalize, normalization, normalize
from cryokern.denoise import denoise_file
from cryokern.inference import Model, TiledDenoiser
from cryokern.model import Network, forward, init_params
from cryokern.mrcstack import MrcStack
from cryokern.mrcwrite import StackWriter
from step import event_times


def wall(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_kernels_ms(gpu, net, params, image):
    """The network's forward kernels on the whole image, device-resident buffers (CUDA events);
    the buffers are freed on return, before PyTorch allocates its own."""
    x = cuda.to_device(image.reshape((1, 1) + image.shape).copy())
    outs = [cuda.device_array((1, c) + image.shape, np.float32) for c in net.channels[1:]]
    dparams = {k: cuda.to_device(v) for k, v in params.items()}
    return event_times(lambda: forward(gpu, net, dparams, x, outs), 10)[0]


def torch_forward_ms(params, net, image):
    try:
        import torch
    except ImportError:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = torch.from_numpy(image).cuda()[None, None]
    w = [(torch.from_numpy(params[f"layers.{i}.weight"]).cuda(),
          torch.from_numpy(params[f"layers.{i}.bias"]).cuda()) for i in range(net.depth)]

    def forward():
        y = x
        for i, (wi, bi) in enumerate(w):
            y = torch.nn.functional.conv2d(y, wi, bi, padding=1)
            if net.relu_after(i):
                y = torch.relu(y)
        return y
    with torch.no_grad():     # PyTorch queues on the legacy stream, which the events time
        return event_times(forward, 10)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size, count = args.size, args.count
    work = tempfile.mkdtemp(prefix="cryokern-denoise-", dir=args.dir)
    net = Network()
    params = init_params(net, 0)
    model_path = os.path.join(work, "model.npz")
    checkpoint.save(model_path, params, {}, {"network": {"channels": list(net.channels)},
                                             "normalize": "per-image"})
    stack_path = os.path.join(work, "micrographs.mrcs")
    rng = np.random.default_rng(0)
    with StackWriter(stack_path, count, (size, size)) as w:
        for _ in range(count):
            w.write(rng.standard_normal((size, size), np.float32) * 3 + 10)
    stack = MrcStack(stack_path)
    gpu = get_backend("gpu")
    model = Model(model_path, net, params, "per-image")
    denoiser = TiledDenoiser(model, gpu, args.tile)
    whole = TiledDenoiser(model, gpu, 0)
    a, b = (gpu.host_empty(stack.shape) for _ in "ab")     # as denoise_file's slots
    image = stack.read(0, np.empty(stack.shape, np.float32))
    affine = normalization(image, "per-image")
    x = normalize(image, affine)
    denoiser(x)   # compile / load the kernels
    out_dir = os.path.join(work, "out")
    os.mkdir(out_dir)

    pipeline = wall(lambda: denoise_file(stack, os.path.join(out_dir, "a.mrcs"), denoiser), 3)

    def read_one():
        stack.read(1, a)
        normalize(a, normalization(a, "per-image"), out=b)
    read_s = wall(read_one, 5)
    gpu_s = wall(lambda: denoiser(b, out=a), 5)

    def write_one():
        with StackWriter(os.path.join(out_dir, "one.mrc"), 1, stack.shape, layout="image") as w:
            w.write(denormalize(a, affine, out=b))
    write_s = wall(write_one, 5)

    def disk_floor():
        """Plain sequential write + fsync of the stack's bytes: what durable output costs."""
        with open(os.path.join(out_dir, "plain.bin"), "wb") as f:
            for _ in range(count):
                f.write(memoryview(b).cast("B"))
            f.flush()
            os.fsync(f.fileno())
    disk_s = wall(disk_floor, 2)

    kernels_ms = forward_kernels_ms(gpu, net, params, x)
    torch_ms = torch_forward_ms(params, net, x)
    whole_s = wall(lambda: whole(b, out=a), 5)

    env = dict(os.environ)
    t = time.perf_counter()
    rc = subprocess.call([sys.executable, "-m", "cryokern.denoise", model_path, stack_path, "-o",
                          os.path.join(work, "cli"), "--tile", str(args.tile)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli_s = time.perf_counter() - t

    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else name
    flop = 2 * size * size * sum(9 * a * b for a, b in zip(net.channels, net.channels[1:]))
    mib = size * size * 4 / 2 ** 20
    print(f"\ndenoise benchmark, {name}, {datetime.date.today()}, {count} micrographs of "
          f"{size}x{size} float32 ({mib:.0f} MiB each), tile {args.tile} + halo {denoiser.halo}")
    print(f"{'what':54s} {'ms/image':>9s} {'images/s':>9s}")
    rows = [("pipeline: denoise_file, page cache -> file", pipeline * 1e3 / count),
            ("  stage: read + normalize (one thread)", read_s * 1e3),
            (f"  stage: GPU strips of ~{args.tile}^2 px incl. copies", gpu_s * 1e3),
            ("  stage: un-normalize + write + fsync (one thread)", write_s * 1e3),
            ("plain write + fsync of as many bytes (disk floor)", disk_s * 1e3 / count),
            ("GPU whole image at once incl. copies (tile 0)", whole_s * 1e3),
            ("forward kernels alone, whole image (CUDA events)", kernels_ms),
            ("PyTorch eager fp32 forward, whole image (cuDNN)", torch_ms),
            (f"command in a fresh process (rc {rc}), start-up included", cli_s * 1e3 / count)]
    for what, ms in rows:
        if ms is None:
            print(f"{what:54s} {'-':>9s}")
        else:
            print(f"{what:54s} {ms:9.1f} {1e3 / ms:9.2f}")
    print(f"forward kernels: {flop / kernels_ms / 1e9:.1f} TFLOP/s; tile buffers on the device: "
          f"{denoiser.device_bytes() / 2 ** 20:.0f} MiB")


if __name__ == "__main__":
    main()
