"""Denoising benchmark: 4096x4096 micrographs per second, end to end, with where the time goes,
and the network's forward pass beside PyTorch's.

Writes a stack of --count float32 micrographs, then times (medians, one process, one device):
the whole `denoise_file` pipeline from the page cache (what `python -m cryokern.denoise` runs);
its stages alone (read + normalize, the TiledDenoiser's strips with their copies, un-normalize
+ write); the whole image at once (tile 0); the network's forward kernels alone on the whole
image, on device-resident buffers (CUDA events); PyTorch's eager forward of the same network
with the same weights (cryokern.torch_mirror, torch.no_grad, cuDNN) on the whole image, fp32
with TF32 off (the peer of the acceptance) and TF32; and the command itself in a fresh process
(start-up and kernel-cache load included). On the GPU, a forward breakdown: median ms per
kernel call on the whole image, each call between CUDA events, summed over calls of the same
kernel and shape, largest first.

Device memory: cryokern's, the bytes of the denoiser's buffers (input and activations,
TiledDenoiser.device_bytes) plus the parameters, for the default tile and for the whole image;
PyTorch's, torch.cuda.max_memory_allocated() over its fp32 forwards after
reset_peak_memory_stats (input, weights, activations, cuDNN workspaces).

Networks: --arch/--preset as in bench/step.py (default: the seed's chain). --device cpu runs
the compiled CPU backend and PyTorch on the CPU with wall-clock times: a smoke test of this
script at toy sizes, not a figure.
Usage: python bench/denoise.py [--preset unets] [--size 4096] [--count 24] [--tile 2048]
       [--dir /tmp] [--json FILE] [--device gpu|cpu]
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from cryokern import checkpoint
from cryokern.backends import get_backend
from cryokern.data import denormalize, normalization, normalize
from cryokern.denoise import denoise_file
from cryokern.inference import DEFAULT_TILE, Model, TiledDenoiser
from cryokern.model import PooledNetwork, forward, init_params
from cryokern.mrcstack import MrcStack
from cryokern.mrcwrite import StackWriter
from nets import add_network_options, chosen_networks, forward_flops
from step import (CudaClock, HostClock, breakdown, event_times, timed_backend,
                  torch_device, torch_mode)


def wall(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def whole_image_buffers(whole, image):
    """(input, outputs) of the network's forward on the whole-image denoiser's own device
    buffers, the image copied in."""
    net, n = whole.model.network, image.size
    whole(image)                                    # sizes its buffers for the whole image
    if isinstance(net, PooledNetwork):
        x, outs = whole._unet_buffers(*image.shape)
    else:
        x = whole._input[:n].reshape((1, 1) + image.shape)
        outs = [whole._acts[i % 2][:c * n].reshape((1, c) + image.shape)
                for i, c in enumerate(net.channels[1:])]
    whole.backend.copy_in(whole._input[:n], image.reshape(n))
    return x, outs


def forward_kernels_ms(whole, image, clock):
    """The network's forward kernels on the whole image (whole_image_buffers), timed by
    `clock`."""
    x, outs = whole_image_buffers(whole, image)
    return event_times(lambda: forward(whole.backend, whole.model.network, whole.params, x,
                                       outs), 10, clock=clock)[0]


def forward_breakdown(whole, image):
    """step.breakdown() of the network's forward on the whole image (whole_image_buffers)."""
    x, outs = whole_image_buffers(whole, image)
    timed = timed_backend()
    return breakdown(timed, lambda: forward(timed, whole.model.network, whole.params, x, outs), 5)


def torch_forward(network, params, image, clock, on_gpu):
    """{mode: ms} of PyTorch's whole-image forward (fp32 with TF32 off, TF32) and the fp32
    forwards' peak device bytes (None on the CPU); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from cryokern.torch_mirror import torch_network
    device = torch_device(torch, on_gpu)
    net = torch_network(network, params, device=device)
    x = torch.from_numpy(image).to(device)[None, None]
    figures = {}
    with torch.no_grad():
        for mode in ("fp32", "tf32"):
            with torch_mode(torch, mode, device):
                if on_gpu and mode == "fp32":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                figures[f"{mode}_ms"] = event_times(lambda: net(x), 10, clock=clock)[0]
                if on_gpu and mode == "fp32":
                    figures["peak_bytes"] = torch.cuda.max_memory_allocated()
    del net, x
    if on_gpu:
        torch.cuda.empty_cache()
    return figures


def bench_network(spec, args, backend, work, stack):
    """One network's rows (printed) and figures (returned)."""
    net, size, count = spec.network, args.size, args.count
    on_gpu = backend.name == "gpu"
    clock = CudaClock if on_gpu else HostClock
    params = init_params(net, 0)
    model_path = os.path.join(work, "model.npz")
    checkpoint.save(model_path, params, {}, {"network": net.describe(),
                                             "normalize": "per-image"})
    model = Model(model_path, net, params, "per-image")
    denoiser = TiledDenoiser(model, backend, args.tile)
    whole = TiledDenoiser(model, backend, 0)
    rows_each = denoiser.core_rows(stack.shape)
    tiling = (f"default: {'whole images' if rows_each >= size else f'strips of {rows_each} rows'}"
              if args.tile is None else f"tile {args.tile}")
    a, b = (backend.host_empty(stack.shape) for _ in "ab")     # as denoise_file's slots
    image = stack.read(0, np.empty(stack.shape, np.float32))
    affine = normalization(image, "per-image")
    x = normalize(image, affine)
    denoiser(x)   # compile / load the kernels
    out_dir = os.path.join(work, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.mkdir(out_dir)

    pipeline = wall(lambda: denoise_file(stack, os.path.join(out_dir, "a.mrcs"), denoiser),
                    args.repeats)

    def read_one():
        stack.read(1 % count, a)
        normalize(a, normalization(a, "per-image"), out=b)
    read_s = wall(read_one, 5)
    tiles_s = wall(lambda: denoiser(b, out=a), 5)

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

    whole_s = wall(lambda: whole(b, out=a), 5)
    kernels_ms = forward_kernels_ms(whole, x, clock)
    kernel_rows = forward_breakdown(whole, x) if on_gpu else []
    whole_bytes = whole.device_bytes()
    del whole                                           # its buffers, before PyTorch's
    torch_figures = torch_forward(net, params, x, clock, on_gpu)

    t = time.perf_counter()
    tile_option = [] if args.tile is None else ["--tile", str(args.tile)]
    rc = subprocess.call([sys.executable, "-m", "cryokern.denoise", model_path, stack.path,
                          "-o", os.path.join(work, "cli"), "--device", backend.name]
                         + tile_option, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli_s = time.perf_counter() - t
    shutil.rmtree(os.path.join(work, "cli"), ignore_errors=True)

    flop = forward_flops(net, size, size)
    param_bytes = 4 * net.param_count()
    torch_ms = (torch_figures or {}).get("fp32_ms")
    print(f"\n{spec.spec} ({net.label()}, {flop / 1e9:.0f} GFLOP per image forward), "
          f"{count} micrographs of {size}x{size} float32 ({size * size * 4 / 2 ** 20:.0f} MiB "
          f"each), {tiling} + halo {denoiser.halo}")
    print(f"{'what':56s} {'ms/image':>9s} {'images/s':>9s}")
    rows = [("pipeline: denoise_file, page cache -> file", pipeline * 1e3 / count),
            ("  stage: read + normalize (one thread)", read_s * 1e3),
            ("  stage: TiledDenoiser incl. copies", tiles_s * 1e3),
            ("  stage: un-normalize + write + fsync (one thread)", write_s * 1e3),
            ("plain write + fsync of as many bytes (disk floor)", disk_s * 1e3 / count),
            ("whole image at once incl. copies (tile 0)", whole_s * 1e3),
            ("forward kernels alone, whole image", kernels_ms),
            ("PyTorch eager fp32 forward (TF32 off), whole image", torch_ms),
            ("PyTorch eager TF32 forward, whole image", (torch_figures or {}).get("tf32_ms")),
            (f"command in a fresh process (rc {rc}), start-up included", cli_s * 1e3 / count)]
    for what, ms in rows:
        print(f"{what:56s} {'-' if ms is None else f'{ms:9.1f}':>9s} "
              f"{'-' if ms is None else f'{1e3 / ms:9.2f}':>9s}")
    tiled_bytes = denoiser.device_bytes() + param_bytes
    print(f"forward kernels: {flop / kernels_ms / 1e9:.1f} TFLOP/s; device memory: tiled "
          f"{tiled_bytes / 2 ** 30:.2f} GiB, whole image {(whole_bytes + param_bytes) / 2 ** 30:.2f}"
          f" GiB (buffers + parameters); PyTorch fp32 peak "
          + ("-" if not (torch_figures or {}).get("peak_bytes")
             else f"{torch_figures['peak_bytes'] / 2 ** 30:.2f} GiB"))
    if kernel_rows:
        print(f"forward breakdown, whole image (median ms, launch overhead included; "
              f"{min(20, len(kernel_rows))} largest of {len(kernel_rows)}):")
        for name, calls, ms in kernel_rows[:20]:
            print(f"  {name:64s} x{calls:<3d} {ms:9.3f}")
    return {"network": spec.spec, "label": net.label(), "forward_gflop": flop / 1e9,
            "tiling": tiling, "halo": denoiser.halo, "rows": dict(rows),
            "tiled_bytes": tiled_bytes, "whole_bytes": whole_bytes + param_bytes,
            "pytorch": torch_figures, "forward_breakdown": kernel_rows}


def print_table(results, header):
    print(f"\n{header}")
    print(f"{'network':30s} {'what':44s} {'ms/image':>9s} {'x fp32':>7s} {'GiB':>6s}")
    for r in results:
        fp32 = (r["pytorch"] or {}).get("fp32_ms")
        peak = (r["pytorch"] or {}).get("peak_bytes")
        rows = [(f"cryokern TiledDenoiser ({r['tiling']}) incl. copies",
                 r["rows"]["  stage: TiledDenoiser incl. copies"],
                 r["tiled_bytes"]),
                ("cryokern whole image, forward kernels", r["rows"][
                    "forward kernels alone, whole image"], r["whole_bytes"]),
                ("PyTorch eager fp32 forward (TF32 off)", fp32, peak),
                ("PyTorch eager TF32 forward", (r["pytorch"] or {}).get("tf32_ms"), None)]
        for k, (what, ms, nbytes) in enumerate(rows):
            if ms is None:
                continue
            print(f"{r['network'] if k == 0 else '':30s} {what:44s} {ms:9.1f} "
                  f"{f'{fp32 / ms:.2f}' if fp32 else '-':>7s} "
                  f"{'-' if nbytes is None else f'{nbytes / 2 ** 30:.2f}':>6s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_network_options(ap)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="pipeline repeats (default 3)")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE,
                    help="as denoise's --tile (default: by the device's free memory)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="cpu: the compiled CPU backend and PyTorch on the CPU (a smoke test)")
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    specs = chosen_networks(ap, args)
    backend = get_backend(args.device)
    work = tempfile.mkdtemp(prefix="cryokern-denoise-", dir=args.dir)
    try:
        stack_path = os.path.join(work, "micrographs.mrcs")
        rng = np.random.default_rng(0)
        with StackWriter(stack_path, args.count, (args.size, args.size)) as w:
            for _ in range(args.count):
                w.write(rng.standard_normal((args.size, args.size), np.float32) * 3 + 10)
        stack = MrcStack(stack_path)
        results = [bench_network(spec, args, backend, work, stack) for spec in specs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if backend.name == "gpu":
        from step import _device_name
        device = _device_name()
    else:
        device = "CPU (compiled CPU backend; a smoke test)"
    print_table(results, f"{datetime.date.today()}  {device}  one {args.size}x{args.size} "
                         "image; x fp32: PyTorch fp32's ms / this ms; GiB: cryokern's buffers "
                         "and parameters, PyTorch's peak")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(datetime.date.today()), "device": device,
                       "argv": sys.argv[1:] if argv is None else argv, "results": results}, f,
                      indent=1)
    return results


if __name__ == "__main__":
    main()
