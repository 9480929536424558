"""Geometry variants of the generated forward convolution (bias + ReLU) for the default network's
three layer shapes, timed side by side, each checked bit for bit against the default geometry.
Then backward-data with the ReLU mask (the 16 -> 1 and 16 -> 16 layers'), and the
weight-gradient kernel's variants (conv.WeightsVariant) for the same shapes. `channel-groups`
(not in the default parts): wide layers' forward and backward-data with their weights staged
in groups of input channels of several sizes (conv.forward_channel_group). `wide` (not in the
default parts either): the 48-wide U-Net's hot forward and backward-data kernels (and the
chain's forward 16 -> 16) in WIDE_VARIANTS, the next input channel's loads without a branch
(conv's early_loads, NOTES v34) beside the default, with each kernel's fraction of PyTorch's
SGEMM rate measured in the same run; the N2N U-Net's 96 -> 96 forward and backward-data too
(grouped weights: capped at 128 registers by default since NOTES v40, uncapped beside it).
`weight-blocks` (not in the default parts): the wide layers' weight-gradient kernels
(WEIGHT_BLOCK_SHAPES) in blocks of other channel counts (conv.weights_block's candidates, four
or two outputs a thread), partials compared bit for bit with the default block's. `phase`
(not in the default parts): the decoders' convolutions of an upsampled input (PHASE_SHAPES),
the phase kernel's geometries and the whole convolution beside the one over the copy.
Usage: python bench/tune_conv.py [--batch 4] [--size 1024]
                                 [--parts forward backward-data weights channel-groups wide
                                  weight-blocks phase]
                                 [--wide-shapes 96x96 144x96 ...]
                                 [--wide-kernels "48+48" "16->16" ...]
"""
import argparse

import numpy as np
from numba import cuda

from cryokern.kernels import conv
from cryokern.kernels.arrays import launch_stream
from cryokern.kernels.graph import _Graph
from step import event_times

# (rows per thread, channels per thread, thread groups per block), max registers
VARIANTS = [((8, 8, 2), None), ((8, 8, 2), 128), ((4, 8, 2), None), ((8, 4, 4), None),
            ((4, 4, 4), None), ((8, 4, 2), 128), ((4, 4, 2), None), ((8, 1, 1), None),
            ((16, 1, 1), None), ((8, 16, 1), None), ((16, 4, 2), None), ((16, 8, 1), None),
            ((4, 16, 1), None)]
SHAPES = [(16, 16), (1, 16), (16, 1)]


PARTS = ("forward", "backward-data", "weights")
# wide U-Net layers (Cin x Cout) whose forward or backward-data stages its weights in groups
WIDE_SHAPES = ["96x96", "144x96", "97x64", "192x192"]
# `wide`'s candidates beside each kernel's default (forward_variant's geometry and cap,
# early_loads_for's loads): conv's keyword arguments. NOTES v34's SASS: behind a branch the
# next input channel's loads sit after the fmas (early_loads, the default from one array since
# v35, moves them before: 128 registers, no spills); (8, 16, 1) feeds each loaded input value
# to 16 output channels (17.5 fmas per shared-memory load, not 12) at ~230 registers, one warp
# in four of the default's per SM; the concatenation's forward takes 151 registers uncapped
# (one block of 256 threads per SM), capped at 128 by default (92 bytes of spills), two.
# phase's layers (UP+SKIPxCOUT: the decoders' first convolutions, N2N's and the 48-wide's) and
# the phase kernel's candidate geometries (rows, channels a thread, thread groups): a weight
# read serves rows / 2 fmas
PHASE_SHAPES = ["96+1x64", "96+48x96", "48+48x48", "48+1x64"]
PHASE_GEOMETRIES = [(16, 4, 2), (16, 4, 3), (16, 4, 1), (12, 4, 4), (20, 4, 2)]
# weight-blocks' layers: CINxCOUT, +N where the input is a concatenation of N and the rest
WEIGHT_BLOCK_SHAPES = ["48x48", "96x96", "97x64+96"]
REGISTERS_A_SM = 65536   # Hopper: 64 K 32-bit registers a SM, whoever holds them
# (one input window, two barriers a channel: the kernels before double_buffered_for)
WIDE_VARIANTS = [dict(early_loads=False), dict(early_loads=True),
                 dict(geometry=(8, 16, 1), max_registers=None, early_loads=True),
                 dict(max_registers=None), dict(double_buffered=False),
                 dict(double_buffered=False, early_loads=False)]
# Blocks of one thread group (128 threads, 8 output channels): four a SM at 128 registers
# where the default's two blocks of 256 hold the same 16 warps, so a barrier stops a quarter
# of the SM's warps, not half, and 97 or 144 input channels' weights fit at once (9 x 8 floats
# a channel); the input window then serves 8 output channels, not 16. And blocks of four
# groups (512 threads, one a SM): the window serves 32.
WIDE_GEOMETRIES = [dict(geometry=(8, 8, 1), max_registers=128, early_loads=True,
                        double_buffered=False),
                   dict(geometry=(8, 8, 1), max_registers=128, early_loads=False,
                        double_buffered=True),
                   dict(geometry=(8, 8, 1), max_registers=128, early_loads=True,
                        double_buffered=True),
                   dict(geometry=(8, 8, 4), max_registers=128, early_loads=False,
                        double_buffered=True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--parts", nargs="+",
                    choices=PARTS + ("channel-groups", "wide", "weight-blocks", "phase"),
                    default=PARTS, help="which kernels' variants to time (default: all but "
                                        "channel-groups and wide)")
    ap.add_argument("--wide-shapes", nargs="+", default=WIDE_SHAPES,
                    help="channel-groups' layers, CINxCOUT (default: %(default)s)")
    ap.add_argument("--wide-kernels", nargs="+", default=[""], metavar="SUBSTRING",
                    help="wide's kernels whose label holds one of these (default: all)")
    ap.add_argument("--block-shapes", nargs="+", default=WEIGHT_BLOCK_SHAPES,
                    help="weight-blocks' layers, CINxCOUT or CINxCOUT+FIRST for a "
                         "concatenation (default: %(default)s)")
    ap.add_argument("--blocks", type=int, default=8,
                    help="weight-blocks: the blocks timed beside the default, those holding the "
                         "most chains first (default: %(default)s; the smaller blocks, two a SM "
                         "at 256 threads or fewer, come from about 20 on for 48x48)")
    ap.add_argument("--two-a-sm", action="store_true",
                    help="weight-blocks: only blocks whose threads at the register cap leave "
                         "room for two a SM (the default block is timed all the same)")
    ap.add_argument("--phase-shapes", nargs="+", default=PHASE_SHAPES,
                    help="phase's layers, UP+SKIPxCOUT (default: %(default)s)")
    args = ap.parse_args()
    n, s = args.batch, args.size
    if "forward" in args.parts:
        forward(n, s, np.random.default_rng(0))
    if "backward-data" in args.parts:
        for cin in (1, 16):
            backward_data(n, s, np.random.default_rng(2), cin)
    if "weights" in args.parts:
        weights(n, s, np.random.default_rng(1))
    if "channel-groups" in args.parts:
        shapes = [tuple(int(c) for c in shape.split("x")) for shape in args.wide_shapes]
        channel_groups(n, s, np.random.default_rng(3), shapes)
    if "wide" in args.parts:
        wide(n, s, np.random.default_rng(4), args.wide_kernels)
    if "weight-blocks" in args.parts:
        weight_blocks(n, s, np.random.default_rng(5), args.block_shapes, args.blocks,
                      args.two_a_sm)
    if "phase" in args.parts:
        phase(n, s, np.random.default_rng(6), args.phase_shapes)


def forward(n, s, rng):
    """Forward with bias and ReLU, each layer shape's variants against its default."""
    print(f"{'cin->cout':9s} {'rows,ch,groups':16s} {'maxreg':>6s} {'regs':>5s} {'median ms':>10s} "
          f"{'TFLOP/s':>8s} bits")
    for cin, cout in SHAPES:
        x = cuda.to_device(rng.standard_normal((n, cin, s, s)).astype(np.float32))
        w = cuda.to_device(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32))
        b = cuda.to_device(rng.standard_normal(cout).astype(np.float32))
        y = cuda.device_array((n, cout, s, s), np.float32)
        conv._launch_forward(x, w, b, y, True, None, False)
        want = y.copy_to_host()
        flops = 2 * n * s * s * cin * cout * 9
        # the small layers are quick to time: all variants; 16 -> 16 the first four
        variants = VARIANTS if min(cin, cout) == 1 else VARIANTS[:4]
        # warm-up of 20 launches: each variant compiles first, and after that pause the first
        # timed variant of a shape read 10-40 % slow with 3 (2026-11-26, H100)
        for geometry, max_registers in [conv.forward_variant(cin, cout, False, False)] + variants:
            if geometry[1] * geometry[2] > 2 * cout:
                continue
            variant = dict(geometry=geometry, max_registers=max_registers)
            cuda.to_device(np.full(want.shape, np.nan, np.float32), to=y)
            fn = lambda: conv._launch_forward(x, w, b, y, True, None, False, **variant)
            try:
                med = replay_ms(fn)
            except Exception as e:  # noqa: BLE001  (a launch error type differs by binding)
                print(f"{cin:2d}->{cout:<5d} {str(geometry):16s} {str(max_registers):>6s} "
                      f"does not launch ({type(e).__name__})")
                continue
            same = np.array_equal(y.copy_to_host().view(np.uint32), want.view(np.uint32))
            kernel = conv._forward_kernel(cin, cout, True, False, False, **variant)[0]
            regs = next(iter(kernel.overloads.values())).regs_per_thread
            print(f"{cin:2d}->{cout:<5d} {str(geometry):16s} {str(max_registers):>6s} {regs:5d} "
                  f"{med:10.3f} {flops / med / 1e9:8.1f} {'same' if same else 'DIFFERENT'}")


def replay_ms(fn):
    """Median ms of fn's launches replayed as a CUDA graph (as the step runs them): timing each
    launch from the host adds numba's 0.2-0.3 ms of launch overhead to short kernels."""
    fn()
    return event_times(_Graph(fn, cuda.stream()).launch, 20, warmup=20)[0]


def backward_data(n, s, rng, cin):
    """Backward-data with the ReLU mask from `cin` channels to 16 (the 16 -> 1 layer's with
    cin 1, every geometry; the 16 -> 16 layer's, the first four)."""
    gy = cuda.to_device(rng.standard_normal((n, cin, s, s)).astype(np.float32))
    w = cuda.to_device(rng.standard_normal((cin, 16, 3, 3)).astype(np.float32))
    mask = cuda.to_device(rng.standard_normal((n, 16, s, s)).astype(np.float32))
    zero = cuda.to_device(np.zeros(16, np.float32))
    gx = cuda.device_array((n, 16, s, s), np.float32)
    want = None
    variants = VARIANTS if cin == 1 else VARIANTS[:4]
    for geometry, max_registers in [conv.forward_variant(cin, 16, True, True)] + variants:
        variant = dict(geometry=geometry, max_registers=max_registers)
        fn = lambda: conv._launch_forward(gy, w, zero, gx, False, mask, True,
                                          **variant)
        try:
            med = replay_ms(fn)
        except Exception as e:  # noqa: BLE001
            print(f"backward-data {cin}->16 {str(geometry):16s} does not launch "
                  f"({type(e).__name__})")
            continue
        got = gx.copy_to_host()
        want = got if want is None else want
        same = np.array_equal(got.view(np.uint32), want.view(np.uint32))
        print(f"backward-data {cin}->16 {str(geometry):16s} {str(max_registers):>6s} {med:10.3f} ms "
              f"{'same' if same else 'DIFFERENT'}")


def weights(n, s, rng):
    """The weight-gradient kernel of each layer shape in several variants (block size, register
    cap, staging addresses precomputed, full-width rows unrolled), partials compared bit for
    bit; the default is marked."""
    from cryokern.contract import tile_grid
    V = conv.WeightsVariant
    th, tw = tile_grid(s, s)
    for cin, cout in SHAPES:
        gy = cuda.to_device(rng.standard_normal(n * cout * s * s).astype(np.float32))
        x = cuda.to_device(rng.standard_normal(n * cin * s * s).astype(np.float32))
        gw = cuda.device_array((n, th * tw, cout * cin * 9), np.float32)
        gb = cuda.device_array((n, th * tw, cout), np.float32)
        flops = 2 * n * s * s * cin * cout * 9
        default = conv.weights_variant(cin, cout)
        if cin * cout >= 64:
            others = [V(128, 128, True, True, True),      # 4 outputs: 2 warps hold chains
                      V(128, 96, True, True, True, False, 2),     # 2 outputs: 4 warps
                      V(128, None, True, True, True, False, 2),
                      V(128, None, False, True, True, False, 2),
                      V(256, None, False, True, True, False, 1),
                      V(128, 128, True, False, False), V(128, 128, True, True, False),
                      V(128, None, True, True, False), V(96, 128, True, True, True),
                      V(96, 128, True, True, False)]
        else:
            others = [V(32 if cout >= cin else 64, None, False, True, True),
                      V(64, None, False, True, True, True), V(96, None, True, True, True, True),
                      V(64, 96, True, True, True, True)]
        want = None
        for variant in [default] + [v for v in others if v != default]:
            kernel, threads = conv._weights_kernel(cin, cout, variant)
            fn = lambda: kernel[(th * tw, n), threads, launch_stream()](gy, x, gw, gb, s, s, tw)
            med = replay_ms(fn)
            got = np.concatenate([gw.copy_to_host().ravel(), gb.copy_to_host().ravel()])
            want = got if want is None else want
            overload = next(iter(kernel.overloads.values()))
            print(f"weights {cin}->{cout} {tuple(variant)!s:24s} regs {overload.regs_per_thread:4d} "
                  f"local {overload.local_mem_per_thread:4d} {med:8.3f} ms "
                  f"{flops / med / 1e9:6.1f} TFLOP/s "
                  f"{'same' if np.array_equal(got, want) else 'DIFFERENT'}"
                  f"{'  <- default' if variant == default else ''}")


def channel_groups(n, s, rng, shapes):
    """Forward with LeakyReLU and backward-data with its mask of `shapes`, the weights staged
    in groups of input channels (the kernel's: the layer's output channels for backward-data):
    the default group (the fewest within 48 KB of static shared memory), all channels at once
    (the kernels before groups, past 48 KB: they may not compile), half the default and 16.
    Bits against the default's."""
    from cryokern.contract import leaky_slope
    slope = leaky_slope(0.1)
    dev = lambda *shape: cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    print(f"{'kernel':28s} {'group':>5s} {'shared B':>8s} {'median ms':>10s} {'TFLOP/s':>8s} bits")
    for cin, cout in shapes:
        w = dev(cout, cin, 3, 3)
        flops = 2 * n * s * s * cin * cout * 9
        for transposed in (False, True):
            kin, kout = (cout, cin) if transposed else (cin, cout)  # the kernel's channels
            x, y = dev(n, kin, s, s), cuda.device_array((n, kout, s, s), np.float32)
            b = cuda.to_device(np.zeros(kout, np.float32)) if transposed else dev(kout)
            mask = dev(n, kout, s, s) if transposed else None
            geometry = conv.forward_variant(kin, kout, transposed, transposed)[0]
            windows = conv.input_windows(kin, geometry, None)
            default = conv.forward_channel_group(kin, geometry, windows)
            label = f"{'backward-data' if transposed else 'forward'} {cin}->{cout}"
            want = None
            for group in dict.fromkeys([default, kin, max(1, default // 2), min(16, kin)]):
                fn = lambda: conv._launch_forward(x, w, b, y, False, mask, transposed,
                                                  leaky_slope=slope, channel_group=group)
                shared = conv.forward_shared_bytes(geometry, group, windows)
                limit = conv.STATIC_SHARED_BYTES
                conv.STATIC_SHARED_BYTES = max(limit, shared)   # past it: only to time it here
                try:
                    med = replay_ms(fn)
                except Exception as e:  # noqa: BLE001  (a compile or launch error)
                    print(f"{label:28s} {group:5d} {shared:8d} does not run ({type(e).__name__})")
                    continue
                finally:
                    conv.STATIC_SHARED_BYTES = limit
                got = y.copy_to_host().view(np.uint32)
                want = got if want is None else want
                print(f"{label:28s} {group:5d} {shared:8d} {med:10.3f} {flops / med / 1e9:8.1f} "
                      f"{'same' if np.array_equal(got, want) else 'DIFFERENT'}"
                      f"{'  <- default' if group == default else ''}")


def wide(n, s, rng, only=("",)):
    """The 48-wide U-Net's forward 48 -> 48 and 48+48 -> 48 (LeakyReLU 0.1) and backward-data
    48 -> 48 (its mask), and the chain's forward 16 -> 16 (ReLU), each in its default variant
    and WIDE_VARIANTS; bits against the default's; % of PyTorch's SGEMM (kernels.py). Only the
    kernels whose label holds a string of `only`."""
    from kernels import sgemm_rate
    from cryokern.contract import leaky_slope
    sgemm = sgemm_rate()
    slope = leaky_slope(0.1)
    dev = lambda *shape: cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    print(f"PyTorch SGEMM {'n/a' if sgemm is None else f'{sgemm / 1e12:.1f} TFLOP/s'}")
    print(f"{'kernel':28s} {'variant':34s} {'regs':>4s} {'median ms':>10s} {'TFLOP/s':>8s} "
          f"{'% SGEMM':>7s} bits")
    for label, kin, kout, first, masked in [("forward 48->48 leaky", 48, 48, None, False),
                                            ("forward 48+48->48 leaky", 96, 48, 48, False),
                                            ("backward-data 48->48 mask", 48, 48, None, True),
                                            ("forward 16->16 relu", 16, 16, None, False),
                                            ("forward 96->96 leaky", 96, 96, None, False),
                                            ("backward-data 96->96 mask", 96, 96, None, True),
                                            ("forward 64->32 leaky", 64, 32, None, False)]:
        if not any(part in label for part in only):
            continue
        relu = kout == 16
        x = dev(n, first or kin, s, s)
        y = cuda.device_array((n, kout, s, s), np.float32)
        x2 = None if first is None else dev(n, kin - first, s, s)
        w = dev(kin, kout, 3, 3) if masked else dev(kout, kin, 3, 3)
        b = cuda.to_device(np.zeros(kout, np.float32)) if masked else dev(kout)
        mask = dev(n, kout, s, s) if masked else None
        flops = 2 * n * s * s * kin * kout * 9
        want = None
        geometry, cap = conv.forward_variant(kin, kout, masked, masked, first)
        default = dict(geometry=geometry, max_registers=cap,
                       early_loads=conv.early_loads_for(kin, kout, first, masked, geometry),
                       double_buffered=conv.double_buffered_for(kin, geometry, first))
        for candidate in [{}] + WIDE_VARIANTS + WIDE_GEOMETRIES:
            variant = dict(default, **candidate)
            if candidate and (variant == default or ("max_registers" in candidate
                                                     and "geometry" not in candidate
                                                     and default["max_registers"] is None)):
                continue    # (the default again; uncapped beside a capped default only)
            name = f"{variant['geometry']} cap {variant['max_registers']}" + (
                " early" if variant["early_loads"] else " late") + (
                " 2 windows" if variant["double_buffered"] else " 1 window")
            fn = lambda: conv._launch_forward(x, w, b, y, relu, mask, masked,
                                              leaky_slope=None if relu else slope, x2=x2,
                                              **variant)
            cuda.to_device(np.full(y.shape, np.nan, np.float32), to=y)   # (unwritten: differs)
            try:
                med = replay_ms(fn)
            except Exception as e:  # noqa: BLE001  (a compile or launch error)
                print(f"{label:28s} {name:34s} does not run ({type(e).__name__})")
                continue
            kernel = conv._forward_kernel(kin, kout, relu, masked, masked,
                                          leaky_slope=None if relu else slope, first=first,
                                          **variant)[0]
            overloads = list(kernel.overloads.values())    # (none: not the launched one)
            regs = overloads[0].regs_per_thread if overloads else -1
            got = y.copy_to_host().view(np.uint32)
            want = got if want is None else want
            rate = flops / med / 1e9
            print(f"{label:28s} {name:34s} {regs:4d} {med:10.3f} {rate:8.1f} "
                  f"{'-' if sgemm is None else f'{100 * rate * 1e12 / sgemm:.0f}':>7s} "
                  f"{'same' if np.array_equal(got, want) else 'DIFFERENT'}"
                  f"{'' if candidate else '  <- default'}")


def phase(n, s, rng, shapes):
    """The decoder's convolution of an upsampled input (numerics §12), layer by layer: the phase
    kernel (phase_conv) in its default geometry and PHASE_GEOMETRIES, unfinished chains bit for
    bit against the default's; then the whole convolution (the phase kernel, then the forward
    kernel continuing over the skip connection's channels) beside the forward kernel over the
    upsampled copy (the same layer before the phase form). % of SGEMM counts the fmas each
    runs: 4 a pixel and upsampled channel in phase form, 9 on the copy."""
    from kernels import sgemm_rate
    from cryokern import kernels as K
    from cryokern.contract import leaky_slope
    from cryokern.kernels import phase_conv
    sgemm = sgemm_rate()
    slope = leaky_slope(0.1)
    dev = lambda *shape: cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    pct = lambda flops, med: "-" if sgemm is None else f"{100 * flops / med / 1e9 * 1e12 / sgemm:.0f}"
    print(f"{'layer':12s} {'variant':30s} {'regs':>4s} {'median ms':>10s} {'% SGEMM':>7s} bits")
    for spec in shapes:
        channels, cout = spec.split("x")
        up, skip = (int(c) for c in channels.split("+"))
        cout = int(cout)
        x, x2 = dev(n, up, s // 2, s // 2), dev(n, skip, s, s)
        w, b = dev(cout, up + skip, 3, 3), dev(cout)
        y = cuda.device_array((n, cout, s, s), np.float32)
        phase_flops = 2 * n * s * s * up * cout * 4
        want = None
        default = phase_conv.phase_geometry(up)
        for geometry in dict.fromkeys([default, phase_conv.PHASE_GEOMETRY] + PHASE_GEOMETRIES):
            fn = lambda: phase_conv.launch_phase_chains(x, w, b, y, geometry=geometry)
            cuda.to_device(np.full(y.shape, np.nan, np.float32), to=y)
            try:
                med = replay_ms(fn)
            except Exception as e:  # noqa: BLE001  (a compile or launch error)
                print(f"{spec:12s} phase {str(geometry):24s} does not run ({type(e).__name__})")
                continue
            kernel = phase_conv._phase_kernel(up, cout, geometry=geometry)[0]
            regs = next(iter(kernel.overloads.values())).regs_per_thread
            got = y.copy_to_host().view(np.uint32)
            want = got if want is None else want
            print(f"{spec:12s} phase {str(geometry):24s} {regs:4d} {med:10.3f} "
                  f"{pct(phase_flops, med):>7s} "
                  f"{'same' if np.array_equal(got, want) else 'DIFFERENT'}"
                  f"{'  <- default' if geometry == default else ''}")
        if skip > 1:    # the continuation over the skip's channels, uncapped and capped
            geometry, cap = conv.forward_variant(skip, cout, False, False)  # (from the bias)
            for regs_cap in dict.fromkeys([cap, 128]):
                for start in (True, False):
                    fn = lambda: conv._launch_forward(x2, w, b, y, False, None, False,
                                                      leaky_slope=slope, w_first=up,
                                                      from_output=start, geometry=geometry,
                                                      max_registers=regs_cap)
                    med = replay_ms(fn)
                    kernel = conv._forward_kernel(skip, cout, False, False, False,
                                                  leaky_slope=slope, first=None, w_first=up,
                                                  from_output=start, geometry=geometry,
                                                  max_registers=regs_cap)[0]
                    overloads = list(kernel.overloads.values())   # (none: not the launched)
                    regs = overloads[0].regs_per_thread if overloads else -1
                    name = f"{'continued' if start else 'from bias'} {skip}->{cout} cap {regs_cap}"
                    print(f"{spec:12s} {name:30s} {regs:4d} {med:10.3f} "
                          f"{pct(2 * n * s * s * 9 * skip * cout, med):>7s}")
        copy = K.upsample2x_forward(x)
        whole = [("phase form + skip", 2 * n * s * s * (4 * up + 9 * skip) * cout,
                  lambda: K.conv2d_forward(x, w, b, leaky_slope=slope, out=y, x2=x2,
                                           upsampled=True)),
                 ("on the upsampled copy", 2 * n * s * s * 9 * (up + skip) * cout,
                  lambda: K.conv2d_forward(copy, w, b, leaky_slope=slope, out=y, x2=x2))]
        for name, flops, fn in whole:
            med = replay_ms(fn)
            print(f"{spec:12s} {name:30s} {'':4s} {med:10.3f} {pct(flops, med):>7s}")


def weight_blocks(n, s, rng, shapes, most, two_a_sm=False):
    """Each layer's weight-gradient kernel in its default block (conv.weights_block) and in the
    other blocks that fit (equal input groups, the last may hold fewer; four or two outputs a
    thread), the `most` holding the most chains (with two_a_sm, of those whose registers at the
    cap leave room for a second block on a SM); partials against the default's, bit for bit."""
    from kernels import sgemm_rate
    from cryokern.contract import tile_grid
    sgemm = sgemm_rate()
    th, tw = tile_grid(s, s)
    print(f"{'layer':10s} {'block':>8s} {'outs':>4s} {'threads':>7s} {'regs':>4s} "
          f"{'median ms':>10s} {'TFLOP/s':>8s} {'% SGEMM':>7s} bits")
    for spec in shapes:
        channels, _, concatenated = spec.partition("+")
        cin, cout = (int(c) for c in channels.split("x"))
        first = int(concatenated) if concatenated else None
        gy = cuda.to_device(rng.standard_normal(n * cout * s * s).astype(np.float32))
        xs = [cuda.to_device(rng.standard_normal(n * c * s * s).astype(np.float32))
              for c in ([cin] if first is None else [first, cin - first])]
        gw = cuda.device_array((n, th * tw, cout * cin * 9), np.float32)
        gb = cuda.device_array((n, th * tw, cout), np.float32)
        flops = 2 * n * s * s * cin * cout * 9
        default = conv.weights_variant(cin, cout)
        default_block = conv.weights_block(cin, cout, default)
        candidates = [(default._replace(outputs=go), block) for go in (4, 2) if cout % go == 0
                      for block in conv.weights_blocks_that_fit(
                          cin, cout, default._replace(outputs=go))]
        if two_a_sm:
            candidates = [(v, b) for v, b in candidates if 2 * v.max_registers *
                          conv._weights_block_needs(cin, cout, v, *b)[0] <= REGISTERS_A_SM]
        candidates.sort(key=lambda vb: -vb[1][0] * vb[1][1])
        outputs = lambda variant: conv._outputs_per_thread(cin, cout, variant)
        is_default = lambda vb: (outputs(vb[0]), vb[1]) == (outputs(default), default_block)
        chosen = [(default, default_block)] + [vb for vb in candidates if not is_default(vb)][:most]
        want = None
        for variant, block in chosen:
            kernel, threads = conv._weights_kernel(cin, cout, variant, first,
                                                   None if block == (cout, cin) else block)
            blocks = cout // block[0] * conv.weight_groups(cin, block[1])
            fn = lambda: kernel[(th * tw, n, blocks), threads, launch_stream()](
                gy, *xs, gw, gb, s, s, tw)
            med = replay_ms(fn)
            got = np.concatenate([gw.copy_to_host().ravel(), gb.copy_to_host().ravel()])
            want = got if want is None else want
            regs = next(iter(kernel.overloads.values())).regs_per_thread
            rate = flops / med / 1e9
            print(f"{spec:10s} {block[0]:3d}x{block[1]:<4d} {outputs(variant):4d} "
                  f"{threads:7d} {regs:4d} {med:10.3f} {rate:8.1f} "
                  f"{'-' if sgemm is None else f'{100 * rate * 1e12 / sgemm:.0f}':>7s} "
                  f"{'same' if np.array_equal(got.view(np.uint32), want.view(np.uint32)) else 'DIFFERENT'}"
                  f"{'  <- default' if is_default((variant, block)) else ''}")


if __name__ == "__main__":
    main()
