"""Kernel microbenchmarks: every kernel of the step at the default sizes (4x1024x1024) and at a
small-image batch (64x256x256), and the U-Net's operations at 48 channels (unet_cases), beside
the device's fp32 FMA rate and copy bandwidth measured here in the same run. Compute-bound
kernels report TFLOP/s (2 FLOP per multiply-add) and their fraction of the FMA rate;
memory-bound ones report GB/s (bytes they must move) and their fraction of the copy bandwidth.
Each kernel call (with its float64 folds) is recorded as a CUDA graph and the replays are
timed, as the training step runs them: numba's host time per launch (0.2-0.3 ms) would
otherwise be the figure of every short kernel. `--widths` sets the U-Net widths timed (from
78 channels forward and backward-data stage their weights in groups of input channels);
`--unet-only` leaves out the chain's kernels; `--batches` sets the batches (NxS: N images of
S x S).
Usage: python bench/kernels.py [--widths 48 96 144] [--unet-only] [--batches 4x1024 64x256]
"""
import argparse

import numpy as np
from numba import cuda, float32

from cryokern import kernels as K
from cryokern.kernels import loss
from cryokern.kernels.arrays import launch_stream
from cryokern.kernels.graph import _Graph
from step import event_times

FMA_ITERS = 4096


@cuda.jit(cache=True)
def _fma_peak(a, out):
    """Eight independent fma chains per thread: the issue rate of FFMA, nothing else."""
    i = cuda.grid(1)
    x = a[i % a.size]
    y = x * float32(0.5)
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = x
    for _ in range(FMA_ITERS):
        c0 = cuda.fma(c0, y, x)
        c1 = cuda.fma(c1, y, x)
        c2 = cuda.fma(c2, y, x)
        c3 = cuda.fma(c3, y, x)
        c4 = cuda.fma(c4, y, x)
        c5 = cuda.fma(c5, y, x)
        c6 = cuda.fma(c6, y, x)
        c7 = cuda.fma(c7, y, x)
    out[i] = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7


@cuda.jit(cache=True)
def _copy(src, dst):
    i = cuda.grid(1)
    if i < src.size:
        dst[i] = src[i]


def fma_rate():
    """FLOP/s of a loop of independent FFMAs (2 FLOP each); loop overhead keeps it below the
    SGEMM figure on the H100."""
    threads = 132 * 2048 * 4
    a = cuda.to_device(np.random.default_rng(0).random(1024).astype(np.float32))
    out = cuda.device_array(threads, np.float32)
    med, _, _ = event_times(lambda: _fma_peak[threads // 256, 256](a, out), 10)
    return 2 * 8 * FMA_ITERS * threads / (med * 1e-3)


def sgemm_rate():
    """FLOP/s of PyTorch's fp32 8192^3 matrix product with TF32 off (the issue's yardstick), or
    None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    med, _, _ = event_times(lambda: torch.mm(a, b), 10)
    return 2 * 8192**3 / (med * 1e-3)


def copy_bandwidth():
    """Bytes/s read plus written by a plain copy kernel of 1 GiB."""
    n = 2**28
    src, dst = cuda.device_array(n, np.float32), cuda.device_array(n, np.float32)
    med, _, _ = event_times(lambda: _copy[n // 256, 256](src, dst), 10)
    return 2 * 4 * n / (med * 1e-3)


def cases(n, s, rng):
    """(name, fn, flop, bytes): the step's kernels on a batch of n images of s x s."""
    dev = lambda *shape: cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    x1, a16, g16, g1 = dev(n, 1, s, s), dev(n, 16, s, s), dev(n, 16, s, s), dev(n, 1, s, s)
    w1, w16, w3 = dev(16, 1, 3, 3), dev(16, 16, 3, 3), dev(1, 16, 3, 3)
    b16, b1 = dev(16), dev(1)
    # as the step leaves the loss: per-image sums and their total on the device
    sums, sse = cuda.device_array(n, np.float64), cuda.device_array(1, np.float64)
    o16, o1 = cuda.device_array((n, 16, s, s), np.float32), cuda.device_array((n, 1, s, s),
                                                                               np.float32)
    gw16, gb16 = cuda.device_array((16, 16, 3, 3), np.float32), cuda.device_array(16, np.float32)
    gw1, gw3 = cuda.device_array((16, 1, 3, 3), np.float32), cuda.device_array((1, 16, 3, 3),
                                                                               np.float32)
    gb1 = cuda.device_array(1, np.float32)
    p = s * s * n
    mac = lambda cin, cout: 2 * p * cin * cout * 9
    plane = 4 * p
    wp, wg, wv = dev(16, 16, 3, 3), dev(16, 16, 3, 3), dev(16, 16, 3, 3)
    copy_n = 5 * 2304 // 2
    copy_src, copy_dst = dev(copy_n), cuda.device_array(copy_n, np.float32)
    return [
        ("conv 1->16 forward+relu", lambda: K.conv2d_forward(x1, w1, b16, relu=True, out=o16),
         mac(1, 16), 17 * plane),
        ("conv 16->16 forward+relu", lambda: K.conv2d_forward(a16, w16, b16, relu=True, out=o16),
         mac(16, 16), 32 * plane),
        ("conv 16->1 forward", lambda: K.conv2d_forward(a16, w3, b1, out=o1), mac(16, 1), 17 * plane),
        ("conv 16->16 backward-data+mask",
         lambda: K.conv2d_backward_data(g16, w16, relu_output=a16, out=o16), mac(16, 16), 48 * plane),
        ("conv 1->16 backward-data+mask",
         lambda: K.conv2d_backward_data(g1, w3, relu_output=a16, out=o16), mac(1, 16), 33 * plane),
        ("conv 16->16 weight grads", lambda: K.conv2d_backward_weights(g16, a16, out=(gw16, gb16)),
         mac(16, 16), 32 * plane),
        ("conv 1->16 weight grads", lambda: K.conv2d_backward_weights(g16, x1, out=(gw1, gb16)),
         mac(1, 16), 17 * plane),
        ("conv 16->1 weight grads", lambda: K.conv2d_backward_weights(g1, a16, out=(gw3, gb1)),
         mac(16, 1), 17 * plane),
        ("mse loss + grad (sse on device)",
         lambda: K.sum_images(K.mse_loss_and_grad(o1, g1, p, out=x1, image_sums=sums)[0], sse),
         None, 3 * plane),
        ("mse loss + grad, pixel pass alone",
         lambda: loss._pixel_pass(*loss._operands(o1, g1), p, x1), None, 3 * plane),
        ("relu backward 16 ch", lambda: K.relu_backward(g16, a16, out=o16), None, 48 * plane),
        ("sgd momentum 16x16x3x3", lambda: K.sgd_update(wp, wg, wv, 0.01, momentum=0.9), None,
         5 * 4 * 2304),
        # the optimizer moves 45 KiB: launch latency, not bandwidth, bounds it; its floor is a
        # plain copy of as many bytes, timed the same way
        ("copy, the sgd's bytes (its floor)",
         lambda: _copy[-(-copy_n // 256), 256, launch_stream()](copy_src, copy_dst), None,
         2 * 4 * copy_n),
    ]


def unet_cases(n, s, rng, width=48):
    """(name, fn, flop, bytes): the U-Net's operations at `width` channels (numerics §9-12)."""
    dev = lambda *shape: cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    empty = lambda *shape: cuda.device_array(shape, np.float32)
    c, c2, h = width, 2 * width, s // 2
    a, g = dev(n, c, s, s), dev(n, c, s, s)
    o, o2, half, ghalf = empty(n, c, s, s), empty(n, c, s, s), dev(n, c, h, h), dev(n, c, h, h)
    w_cc, w_2c, b = dev(c, c, 3, 3), dev(c, c2, 3, 3), dev(c)
    gw_cc, gw_2c, gb = empty(c, c, 3, 3), empty(c, c2, 3, 3), empty(c)
    p = s * s * n
    mac = lambda cin, cout: 2 * p * cin * cout * 9
    plane = 4 * p                                    # bytes of one full-resolution channel
    return [
        (f"conv {c}->{c} forward+leaky",
         lambda: K.conv2d_forward(a, w_cc, b, leaky_slope=0.1, out=o), mac(c, c), 2 * c * plane),
        (f"conv {c}+{c}->{c} forward+leaky (concatenation)",
         lambda: K.conv2d_forward(a, w_2c, b, leaky_slope=0.1, out=o, x2=g), mac(c2, c),
         3 * c * plane),
        # the decoder's first convolution: the level below read upsampled in place, in phase
        # form (numerics §12: 4 fmas a pixel and upsampled channel, counted as run, not 9)
        (f"conv up({c})+{c}->{c} forward+leaky (phase form)",
         lambda: K.conv2d_forward(half, w_2c, b, leaky_slope=0.1, out=o, x2=g, upsampled=True),
         2 * p * (4 + 9) * c * c, (c // 4 + 4 * c) * plane),
        (f"conv {c}->{c} backward-data+leaky mask",
         lambda: K.conv2d_backward_data(g, w_cc, relu_output=a, leaky_slope=0.1, out=o),
         mac(c, c), 3 * c * plane),
        (f"conv {c}->{c}+{c} backward-data (concatenation)",
         lambda: K.conv2d_backward_data(g, w_2c, out=(o, o2), split=c), mac(c2, c),
         3 * c * plane),
        (f"conv {c}->{c} weight grads", lambda: K.conv2d_backward_weights(g, a, out=(gw_cc, gb)),
         mac(c, c), 2 * c * plane),
        (f"conv {c}+{c}->{c} weight grads (concatenation)",
         lambda: K.conv2d_backward_weights(g, a, out=(gw_2c, gb), x2=o), mac(c2, c),
         3 * c * plane),
        (f"maxpool fwd {c} ch", lambda: K.maxpool2x2_forward(a, out=half), None,
         c * plane * 5 // 4),
        (f"maxpool bwd+add+mask {c} ch",
         lambda: K.maxpool2x2_backward(ghalf, a, out=o, add=g, relu_output=a, leaky_slope=0.1),
         None, c * plane * 13 // 4),
        (f"upsample fwd {c} ch", lambda: K.upsample2x_forward(half, out=o), None,
         c * plane * 5 // 4),
        (f"upsample bwd+mask {c} ch",
         lambda: K.upsample2x_backward(g, out=ghalf, relu_output=half, leaky_slope=0.1), None,
         c * plane * 6 // 4),
        (f"leaky backward {c} ch", lambda: K.leaky_relu_backward(g, a, out=o), None,
         3 * c * plane),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[48],
                    help="U-Net widths whose operations are timed (default 48)")
    ap.add_argument("--unet-only", action="store_true", help="leave out the chain's kernels")
    ap.add_argument("--batches", nargs="+", default=["4x1024", "64x256"],
                    help="NxS: N images of S x S (default: %(default)s)")
    args = ap.parse_args()
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else name
    fma, sgemm, bandwidth = fma_rate(), sgemm_rate(), copy_bandwidth()
    peak = max(fma, sgemm or 0)
    print(f"{name}: fp32 FMA loop {fma / 1e12:.1f} TFLOP/s, PyTorch SGEMM 8192^3 "
          f"{'n/a' if sgemm is None else f'{sgemm / 1e12:.1f}'} TFLOP/s (peak = the higher), "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rng = np.random.default_rng(0)
    stream = cuda.stream()
    print(f"{'kernel':34s} {'batch':>11s} {'median ms':>10s} {'TFLOP/s':>8s} {'GB/s':>7s} "
          f"{'of peak':>8s}")
    for n, s in (tuple(int(v) for v in batch.split("x")) for batch in args.batches):
        chain = [] if args.unet_only else cases(n, s, rng)
        for label, fn, flop, nbytes in chain + [case for width in args.widths
                                                for case in unet_cases(n, s, rng, width)]:
            fn()                                # compile and allocate, then record
            med, _, _ = event_times(_Graph(fn, stream).launch, 20)
            secs = med * 1e-3
            if flop is not None:
                frac = flop / secs / peak
                rate = f"{flop / secs / 1e12:8.1f} {nbytes / secs / 1e9:7.0f}"
            else:
                frac = nbytes / secs / bandwidth
                rate = f"{'':8s} {nbytes / secs / 1e9:7.0f}"
            print(f"{label:34s} {f'{n}x{s}x{s}':>11s} {med:10.3f} {rate} {frac:8.1%}")


if __name__ == "__main__":
    main()
