"""The decoder's convolution of a x2 nearest-upsampled input, in phase form (numerics §12).

Output pixel (2i + p, 2j + q) of a 3x3 convolution over the upsampled copy reads only a 2 x 2
window of the level below, so its chain takes four fmas a channel with the phase weights
c[o, ci, p, q, a, b] (sums of the 3x3 weights, contract.phase_weights) where the copy takes
nine. This kernel runs that part of the chains, from the bias over the upsampled channels, and
stores them unfinished; conv.py's forward kernel continues them over the skip connection's
channels (from_output) and applies the activation.

A block computes TY / 2 * R output rows x 2 * BW columns of OB = G * GB output channels:
thread (tx, ty, tz) owns column 2 tx + q of the block's, q = ty & 1 (so a warp's lanes share
one column parity and read the same phase weights), R rows (R / 2 of each row parity) from
row (ty >> 1) * R, and G channels. Channel by channel the block stages the level below's
(TY / 2 * R / 2 + 2) x (BW + 2) window (two windows, alternating: one barrier a channel), and
each thread holds its (R / 2 + 2) x 2 window values in registers; a phase weight read from
shared memory serves R / 2 fmas. The phase weights are summed once a launch by a small kernel
of their own (phase_weights_kernel), in the order of contract.phase_terms, and laid out
[output block][channel][p][q][a * 2 + b][output channel of the block]: a block stages a group of
channels as one contiguous copy, and a thread's G channels are adjacent and 16-byte aligned,
one vector load (LDS.128 for G = 4). (Summed by every block while staging them, a branch on
the weight's phase and up to four dependent global loads each, they slowed the phase part by
about a fifth: NOTES v46.)
"""

import numpy as np

from ..contract import phase_terms
from .arrays import launch_stream, scratch
from .codegen import Source, generator, load_module
from .conv import BW, STATIC_SHARED_BYTES, TY, first_window, staged_loads, window_slots

# (R, G, GB): rows and output channels per thread, thread groups per block; capped at 128
# registers (one block of 512 threads a SM). The fastest of bench/tune_conv.py --parts phase
# (H200, 4x1024^2, 2026-12-01): the N2N U-Net's 96 (up) -> 64 8.170 ms, 49 % of SGEMM's
# rate; (16, 4, 2) 8.342, (20, 4, 2) 8.480, (12, 4, 4) 8.522, (16, 4, 1) 9.586, (8, 8, 2)
# 9.613 (a weight read serves 4 fmas, not 8), (16, 8, 1) 23.653 (spilled at the cap).
# Lanes of both column parities in a warp, reading two addresses a weight load (odd q
# stride, scalar loads): 9.226.
PHASE_GEOMETRY = (16, 4, 4)
# Half the output channels a block, where that lets it hold every input channel's phase weights
# at once where PHASE_GEOMETRY's would be staged in groups (phase_geometry): the 48-wide
# U-Net's 48 (up) -> 48 2.421 -> 2.178 ms (tune_conv.py --parts phase, H200, 2026-12-02,
# after the phase weights' own kernel; (20, 4, 2) 2.198, (16, 4, 3) 2.316, (12, 4, 4) 2.381).
PHASE_GEOMETRY_WHOLE = (16, 4, 2)
PHASE_MAX_REGISTERS = 128


def _layout(geometry):
    """(output channels a block, q stride, floats of one input channel's phase weights, floats
    of the two input windows) of a block of this geometry."""
    rows, g_out, groups = geometry
    ob_size = g_out * groups
    q_stride = 4 * ob_size
    window = (BW + 2) * (TY // 2 * rows // 2 + 2)
    return ob_size, q_stride, 4 * q_stride, 2 * window


def phase_geometry(cin):
    """The geometry of the phase kernel over cin upsampled channels: PHASE_GEOMETRY, or
    PHASE_GEOMETRY_WHOLE where only that one stages all cin channels' phase weights at once."""
    if phase_channel_group(cin, PHASE_GEOMETRY) < cin and \
            phase_channel_group(cin, PHASE_GEOMETRY_WHOLE) == cin:
        return PHASE_GEOMETRY_WHOLE
    return PHASE_GEOMETRY


def phase_channel_group(cin, geometry):
    """Input channels whose phase weights a block holds at once: all where they fit beside the
    two windows, else the fewest equal groups that fit (the last may hold fewer)."""
    _, _, per_channel, windows = _layout(geometry)
    most = (STATIC_SHARED_BYTES // 4 - windows) // per_channel
    if most < 1:
        raise ValueError(f"a phase block of geometry {geometry} cannot stage one input "
                         f"channel's weights in {STATIC_SHARED_BYTES} bytes of shared memory")
    return -(-cin // -(-cin // most))


def _phase_weight(k):
    """Phase weight k = ((p * 2 + q) * 4 + a * 2 + b) of weights w[o, c]: its terms added in
    contract.phase_terms' order."""
    p, q, a, b = k >> 3, (k >> 2) & 1, (k >> 1) & 1, k & 1
    return " + ".join(f"w[o, c, {ky}, {kx}]" for ky, kx in phase_terms(p, q, a, b))


def _padded_channels(cin, group):
    """Input channels of the phase weights' layout: whole groups (the last group's channels
    past cin are zeros)."""
    return -(-cin // group) * group


@generator
def phase_weights_kernel(cin, cout, ob_size, padded):
    """The phase weights of w's first cin input channels, one thread each, into pw laid out
    [output block][channel (padded)][phase k][output channel of the block], 0 past the layer."""
    per_channel = 16 * ob_size
    total = -(-cout // ob_size) * padded * per_channel
    src = Source().kernel("w, pw")
    src("i = cuda.grid(1)")
    src(f"if i < {total}:").indent()
    src(f"o = i // {padded * per_channel} * {ob_size} + i % {ob_size}")
    src(f"c = i // {per_channel} % {padded}")
    src(f"k = i // {ob_size} % 16")
    src("v = float32(0)")
    src(f"if o < {cout} and c < {cin}:").indent()
    for k in range(16):
        src(f"{'if' if k == 0 else 'elif'} k == {k}:").indent()
        src(f"v = {_phase_weight(k)}").dedent()
    src.dedent()
    src("pw[i] = v")
    module = load_module(f"conv_phase_weights_{cin}_{cout}_{ob_size}_{padded}", src.text())
    return module.kernel, total


@generator
def _phase_kernel(cin, cout, geometry=None, max_registers=PHASE_MAX_REGISTERS,
                  channel_group=None):
    """The chains from b over input channels 0..cin-1 of w (the upsampled ones; w may hold
    more; the kernel reads their phase weights, pw of phase_weights_kernel), x being the level
    below (half y's height and width), stored in y unfinished.
    Returns (kernel, block, output channels per block, rows per block, input channels of the
    phase weights' layout (phase_weights_kernel's padded)). The geometry: phase_geometry's
    unless given (bench/tune_conv.py)."""
    geometry = geometry or phase_geometry(cin)
    R, g_out, groups = geometry
    if R % 2:
        raise ValueError(f"a phase block's threads own an even number of rows, not {R}")
    half = R // 2
    ob_size, q_stride, per_channel, windows = _layout(geometry)
    group = phase_channel_group(cin, geometry) if channel_group is None else channel_group
    if not 0 < group <= cin or 4 * (group * per_channel + windows) > STATIC_SHARED_BYTES:
        raise ValueError(f"a phase block cannot stage {group} input channels' weights within "
                         f"{STATIC_SHARED_BYTES} bytes")
    grouped = group < cin
    BH, BC = TY // 2 * R, 2 * BW       # rows and columns of a block
    XW, XH = BW + 2, BH // 2 + 2
    nx = XW * XH
    threads = BW * TY * groups
    slots = -(-nx // threads)
    ws_size = group * per_channel
    padded = _padded_channels(cin, group)
    src = Source().kernel("x, pw, b, y, height, width, n_oblocks", max_registers)
    src(f"tid = (cuda.threadIdx.z * {TY} + cuda.threadIdx.y) * {BW} + cuda.threadIdx.x")
    src("n = cuda.blockIdx.z // n_oblocks")
    src("ob = cuda.blockIdx.z % n_oblocks")
    src(f"h0 = cuda.blockIdx.y * {BH}")
    src(f"c0 = cuda.blockIdx.x * {BC}")
    src("plane = height * width")
    src("low_h = height >> 1")
    src("low_w = width >> 1")
    src("xplane = low_h * low_w")
    src(f"ws = cuda.shared.array({ws_size}, float32)")
    src(f"xs = cuda.shared.array({2 * nx}, float32)")

    def stage_weights(first_channel):
        """ws: the phase weights of input channels first_channel + 0, 1, .. (a copy of pw's)."""
        src(f"wg = uint64((ob * {padded} + {first_channel}) * {per_channel} + tid)")

        def element(j, register):
            guard = f" if tid + {j * threads} < {ws_size} else float32(0)" \
                if (j + 1) * threads > ws_size else ""
            src(f"{register} = pw[wg + uint64({j * threads})]{guard}")

        staged_loads(src, -(-ws_size // threads), threads, ws_size, element)

    if not grouped:
        stage_weights("0")
    # the window's elements: the level below's rows h0 / 2 - 1 .., columns c0 / 2 - 1 ..
    window_slots(src, slots, threads, nx, XW, ("(h0 >> 1)", "(c0 >> 1)"), ("low_h", "low_w"))
    first_window(src, slots, f"n * {cin} * xplane")
    src(f"o0 = (ob * {groups} + cuda.threadIdx.z) * {g_out}")
    for g in range(g_out):
        src(f"b{g} = b[o0 + {g}] if o0 + {g} < {cout} else float32(0)")
        for r in range(R):
            src(f"a{r}_{g} = b{g}")
    src("q = cuda.threadIdx.y & 1")
    src(f"xb = uint64((cuda.threadIdx.y >> 1) * {half * XW} + cuda.threadIdx.x + q)")
    src(f"wq = uint64(q * {q_stride} + cuda.threadIdx.z * {g_out})")
    if grouped:     # ci's place in its group, counted: ci % group took ~25 instructions a turn
        src("cg = 0")
    src(f"for ci in range({cin}):").indent()
    src(f"window = uint64((ci & 1) * {nx})")
    if grouped:     # behind a barrier of its own: every thread has read the last group's
        src("if cg == 0:").indent()
        src("cuda.syncthreads()")
        stage_weights("ci")
        src.dedent()
    for s_ in range(slots):
        if (s_ + 1) * threads > nx:
            src(f"if e{s_} < {nx}:").indent()(f"xs[window + uint64(e{s_})] = p{s_}").dedent()
        else:
            src(f"xs[window + uint64(e{s_})] = p{s_}")
    src("cuda.syncthreads()")
    # the next channel's window into p0.. without a branch (clamped at the last)
    src(f"base += selp(ci + 1 < {cin}, xplane, base - base)")
    for s_ in range(slots):
        src(f"p{s_} = selp(ok{s_}, x[uint64(selp(ok{s_}, base + off{s_}, base - base))], "
            "float32(0))")
    for r in range(half + 2):
        for k in range(2):
            src(f"v{r}_{k} = xs[window + xb + uint64({r * XW + k})]")
    src(f"wc = wq + uint64({'cg' if grouped else 'ci'} * {per_channel})")
    # a call of `taps` per row parity p, with its chains (rows p, p + 2, ..) and window rows
    for p in range(2):
        chains = [f"a{2 * m + p}_{g}" for m in range(half) for g in range(g_out)]
        rows = ", ".join(f"v{r + p}_{k}" for r in range(half + 1) for k in range(2))
        src(f"{', '.join(chains)}, = taps(ws, wc, int64({2 * p * q_stride}), ({rows},), "
            f"({', '.join(chains)},))")
    if grouped:
        src(f"cg = selp(cg + 1 < {group}, cg + 1, cg - cg)")
    src.dedent()
    called = Source().device_function("taps", "ws, wc, k, rows, state")
    chains = [f"c{m}_{g}" for m in range(half) for g in range(g_out)]
    called(f"{', '.join(chains)}, = state")
    called(", ".join(f"u{r}_{k}" for r in range(half + 1) for k in range(2)) + ", = rows")
    for a in range(2):
        for b in range(2):
            for g in range(g_out):
                called(f"t = ws[wc + uint64(k + {(a * 2 + b) * ob_size + g})]")
                for m in range(half):
                    called(f"c{m}_{g} = fma(u{m + a}_{b}, t, c{m}_{g})")
    called(f"return ({', '.join(chains)},)")
    # the unfinished chains, row by row
    src("col = c0 + 2 * cuda.threadIdx.x + q")
    src("if col < width:").indent()
    for r in range(R):
        src(f"row = h0 + (cuda.threadIdx.y >> 1) * {R} + {r}")
        src("if row < height:").indent()
        src(f"i = (n * {cout} + o0) * plane + row * width + col")
        for g in range(g_out):
            src(f"if o0 + {g} < {cout}:").indent()
            src(f"y[uint64(i + {g} * plane)] = a{r}_{g}").dedent()
        src.dedent()
    groups_of = f"_group{group}" if grouped else ""
    module = load_module(f"conv_phase_{cin}_{cout}_{R}x{g_out}x{groups}{groups_of}",
                         src.text() + called.text())
    return module.kernel, (BW, TY, groups), ob_size, BH, padded


def launch_phase_chains(x, w, b, y, **variant):
    """y = the chains from b over x's channels read x2 nearest-upsampled, in phase form: the
    first x.shape[1] input channels of w (§12), unfinished. `variant` (geometry, max_registers,
    channel_group) is for bench/tune_conv.py."""
    n, cin = x.shape[:2]
    cout, h, wd = y.shape[1:]
    kernel, block, ob_size, BH, padded = _phase_kernel(cin, cout, **variant)
    sums, total = phase_weights_kernel(cin, cout, ob_size, padded)
    pw = scratch("phase_weights", (total,), np.float32)
    sums[-(-total // 256), 256, launch_stream()](w, pw)
    n_oblocks = -(-cout // ob_size)
    grid = (-(-wd // (2 * BW)), -(-h // BH), n * n_oblocks)
    kernel[grid, block, launch_stream()](x.reshape(x.size), pw, b, y.reshape(y.size), h, wd,
                                         n_oblocks)
