"""Static shared memory of every convolution kernel of a few U-Nets, as the compiled PTX declares
it: forward with LeakyReLU, backward-data with its mask (into the two parts where the input is
a concatenation) and weight gradients, per distinct layer shape. CUDA allows at most 48 KB of
static shared memory a block; kernels past it are marked. Needs NVVM and libdevice (the cu12 or
cu13 extra, or a CUDA toolkit), no GPU; where NVRTC is missing (only NVVM installed) it asks
NVVM for compute capability 9.0 directly. Slow: the default widths' 33 kernels took 11 min
of CPU (2026-12-01, a shared 2-core VM).
Usage: python bench/shared_memory.py [--widths 48,96,144,192 16,24,32,48,64 ...]
"""
import argparse
import os
import re

os.environ.setdefault("NUMBA_FORCE_CUDA_CC", "9.0")     # NVRTC only picks the closest arch

from numba import cuda, types  # noqa: E402  (after the compute capability)
from numba.cuda import cuda_paths  # noqa: E402

from cryokern.contract import leaky_slope as leaky_slope_f32  # noqa: E402
from cryokern.kernels import conv  # noqa: E402
from cryokern.model import UNet  # noqa: E402

import offline  # noqa: E402  (bench/offline.py: device functions compiled without a GPU)

F32 = types.float32[::1]
W4 = types.float32[:, :, :, ::1]
PART = types.float32[:, :, ::1]
LIMIT = 48 * 1024
SHARED = re.compile(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]")


def allow_missing_nvrtc():
    """numba looks NVRTC up beside libdevice even when nothing needs it: skip the look-up."""
    try:
        cuda_paths._get_nvrtc_path()
    except Exception:  # noqa: BLE001  (the pathfinder's not-found error)
        cuda_paths._get_nvrtc_path = lambda: None


def layer_kernels(net):
    """(label, kernel, signature) of each distinct convolution kernel of `net`'s step."""
    seen = set()
    for prefix, cin, cout in net.convolutions():
        first = net.widths[int(prefix.split(".")[1]) + 1] if prefix.endswith("conv0") and \
            prefix.startswith("dec") else None
        slope = leaky_slope_f32(net.leaky_slope)
        two = "" if first is None else f" ({first}+{cin - first})"
        layer = f"{cin}{two}->{cout}"
        jobs = [(f"forward {layer}", ("f", cin, cout, first)),
                (f"backward-data of {layer}", ("b", cout, cin, first)),
                (f"weights of {layer}", ("w", cin, cout, first))]
        for label, key in jobs:
            if key in seen:
                continue
            seen.add(key)
            yield (label,) + build(key, slope)


def build(key, slope):
    kind, cin, cout, first = key
    if kind == "w":
        variant = conv.weights_variant(cin, cout)
        block = conv.weights_block(cin, cout, variant)
        kernel = conv._weights_kernel(cin, cout, variant, first,
                                      None if block == (cout, cin) else block)[0]
        inputs = (F32,) if first is None else (F32, F32)
        return kernel, (F32,) + inputs + (PART, PART, types.int64, types.int64, types.int64)
    transposed = kind == "b"
    masked = transposed and first is None
    kernel = conv._forward_kernel(cin, cout, False, masked, transposed,
                                  leaky_slope=slope if masked or not transposed else None,
                                  first=first)[0]
    if first is None:
        return kernel, (F32, W4, F32, F32, F32, types.int64, types.int64, types.int64)
    return kernel, (F32, F32, W4, F32, F32, F32, F32, types.int64, types.int64, types.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", default=["48,96,144,192"],
                    help="U-Net widths, one comma-separated list per network")
    args = ap.parse_args()
    allow_missing_nvrtc()
    offline.without_device((9, 0))
    over = 0
    print(f"{'kernel':36s} {'shared bytes':>12s}")
    for widths in args.widths:
        net = UNet(widths=tuple(int(w) for w in widths.split(",")))
        print(f"U-Net {widths}:")
        for label, kernel, sig in layer_kernels(net):
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            shared = sum(int(n) for n in SHARED.findall(ptx))
            over += shared > LIMIT
            print(f"  {label:34s} {shared:12d}{'  > 48 KB' if shared > LIMIT else ''}",
                  flush=True)
    print(f"{over} kernels over {LIMIT} bytes")


if __name__ == "__main__":
    main()
