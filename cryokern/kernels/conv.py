"""3x3 'same' convolution kernels: forward (also backward-data) and tiled weight gradients.

Each follows docs/numerics.md exactly; the comments say which section. Kernels are specialized
on channel counts at compile time (closures over ints, which numba caches on disk).
"""
from functools import lru_cache
from typing import NamedTuple, Optional

import numpy as np
from numba import cuda, float32

from ..contract import (TILE_H, TILE_W, concatenated_channels, leaky_slope as leaky_slope_f32,
                        same_shape, tile_grid)
from .arrays import (Operand, as_device_array, launch_stream, output, placeholder, result,
                     scratch)
from .codegen import Source, generator, load_module, select_load
from .reduce import fold_images, fold_tiles

# Forward (also backward-data): a block computes BH x BW output pixels of OB = G * GB output
# channels. Thread (tx, ty, tz) owns column tx, rows ty*R .. ty*R+R-1 and channels
# tz*G .. tz*G+G-1: R*G accumulators in registers. Input channel by input channel, the block
# stages its (BH+2) x (BW+2) input window in shared memory (the next channel's values are loaded
# into registers while the current one is computed), each thread copies its (R+2) x 3 window
# into registers, and every weight read from shared memory serves R fmas. The block's weights
# are staged in shared memory too: all input channels' at once, or for wide layers a group of
# input channels at a time (forward_channel_group).
BW, TY = 32, 4

# What one block may hold on the GPUs we run on (compute capability 9.0): threads, 32-bit
# registers (a block's threads times its register cap), and static shared memory (the portable
# limit: CUDA allows no more in a static declaration; more needs dynamic shared memory and an
# opt-in per kernel).
BLOCK_THREADS = 1024
BLOCK_REGISTERS = 65536
STATIC_SHARED_BYTES = 48 * 1024
UNCAPPED_REGISTERS = 255        # what ptxas may give a thread without a cap
GRID_Z_MAX = 65535
STAGING_LOADS = 4      # weights a thread loads before it stores them to shared memory (their
                       # latency waited for once a batch; registers are short while chains live)


def forward_variant(cin, cout, transposed, masked, first=None, from_output=False):
    """((R, G, GB), register cap): rows and output channels per thread, thread groups per
    block, and the cap, the fastest of bench/tune_conv.py's variants (H100, 4x1024^2, graph
    replays, 2026-11-26, with unsigned indices; backward-data then read its mask after the fmas).
    16 -> 16: 8 rows x 8 channels x 2 groups, no cap (ptxas takes 124 registers either way,
    yet the cap at 128 ran slower: forward 0.750 -> 0.692 ms, backward-data 0.769 -> 0.750).
    With the mask read in turns (_MaskPlan), ptxas took 132 registers, one block per SM
    (0.99 ms): capped at 128 for two, with 56 bytes of spills, 0.69 (2026-11-27, NOTES v23);
    from one input channel, 136 registers (0.295 ms) without the cap.
    From one input channel, the forward pass: 4 rows x all (up to 16) outputs per thread
    (0.133); backward-data (the 16 -> 1 layer's, with the ReLU mask): 8 x 8 x 2 (0.399 ->
    0.246 against 4 x 4 x 2). A forward pass over a concatenation (`first` input channels in
    the first array; ptxas took 151 registers uncapped, one block per SM): capped at 128 (H200,
    48+48 -> 48 LeakyReLU, 13.01 -> 11.02 ms, 2026-12-01). A kernel staging its weights in
    groups of input channels (forward_channel_group) is capped at 128 too: uncapped, ptxas
    took 164-168 registers for them (77 -> 48 128, 78 -> 48 167; sm_90a offline, NOTES v40),
    one block per SM, and the forward 96 -> 96 ran at 53 % of SGEMM against 62 % for 48 -> 48
    (H200, 2026-12-01; the cap's effect not yet measured). A forward pass continuing chains
    from its output (from_output) is capped too: uncapped, ptxas took 185 registers for 48 ->
    48 and 48 -> 96 (the chains' starting loads), 8.041 -> 5.890 ms and 15.822 -> 11.682
    capped (H200, 4x1024^2, 2026-12-01; from the bias: 5.513, 11.036)."""
    if cin == 1:
        if transposed:
            return (8, min(cout, 8), 2), (128 if masked else None)
        return (4, min(cout, 16), 1), None
    if cout == 1:
        return (8, 1, 1), None
    g_out = min(cout, 8)
    geometry = (8, g_out, min(2, -(-cout // g_out)))
    concatenation = first is not None and not transposed
    grouped = staged_in_groups(cin, geometry)
    return geometry, (128 if masked or concatenation or grouped or from_output else None)


def staged_in_groups(cin, geometry):
    """Whether a forward block of this geometry stages its weights in groups of input channels
    even beside one input window."""
    return forward_channel_group(cin, geometry, 1) < cin


def early_loads_for(cin, cout, first, masked, geometry):
    """Whether _forward_kernel loads the next input channel's window without a branch
    (early_loads): for the generic geometry (cin, cout > 1) reading one array, unless it stages
    its weights in groups without a mask. H200, 4x1024^2, bits equal (bench/tune_conv.py
    --parts wide, 2026-12-01): forward 48 -> 48 LeakyReLU 5.996 -> 5.527 ms, backward-data
    48 -> 48 masked 5.787 -> 5.608, forward 16 -> 16 ReLU 0.694 -> 0.641; over a concatenation
    it was slower (13.01 -> 16.02), both arrays' loads issued. In groups, with two windows
    (NOTES v41): forward 96 -> 96 24.243 early, 20.948 not; backward-data 96 -> 96 masked
    22.598 early, 27.215 not."""
    return first is None and cin > 1 and cout > 1 and (masked or
                                                        not staged_in_groups(cin, geometry))


def double_buffered_for(cin, geometry, first):
    """Whether _forward_kernel stages the input channels in two windows that alternate (one
    barrier a channel, not two): kernels over a concatenation and kernels staging their weights
    in groups. H200, 4x1024^2, bits equal (bench/tune_conv.py --parts wide, 2026-12-01, NOTES
    v41), one window -> two: forward 48+48 -> 48 11.000 -> 10.432 ms, 96 -> 96 21.942 ->
    20.948 (late loads), backward-data 96 -> 96 masked 22.851 -> 22.598; the kernels reading
    one array whose weights fit at once were slower with two (forward 48 -> 48 5.614 -> 5.867,
    backward-data 48 -> 48 masked 5.617 -> 6.540, forward 16 -> 16 0.648 -> 0.679)."""
    return cin > 1 and (first is not None or staged_in_groups(cin, geometry))


def input_windows(cin, geometry, first):
    """Input windows a forward block holds in shared memory (double_buffered_for)."""
    return 2 if double_buffered_for(cin, geometry, first) else 1


def _forward_block_floats(geometry, windows):
    """(floats of shared memory per input channel's weights, floats of the input windows) of a
    forward block of this geometry."""
    rows, g_out, groups = geometry
    return 9 * g_out * groups, windows * (BW + 2) * (TY * rows + 2)


def forward_shared_bytes(geometry, channel_group, windows):
    """Static shared memory of a forward block staging `channel_group` input channels' weights
    beside `windows` input windows."""
    per_channel, window = _forward_block_floats(geometry, windows)
    return 4 * (channel_group * per_channel + window)


def forward_channel_group(cin, geometry, windows):
    """Input channels whose weights a forward block holds in shared memory at once: all `cin`
    where they fit STATIC_SHARED_BYTES beside the input window (every layer below 78 input
    channels with 16 outputs a block: their kernels are as they were), else the fewest equal
    groups that fit (the last may hold fewer). The block stages group after group; each
    thread's chains still run over the channels in order with the same operands, so no bit
    changes, and the weights are read from global memory once per block as before. `windows`:
    the block's input windows (input_windows)."""
    per_channel, window = _forward_block_floats(geometry, windows)
    most = (STATIC_SHARED_BYTES // 4 - window) // per_channel
    if most < 1:
        raise ValueError(f"a forward block of geometry {geometry} cannot stage one input "
                         f"channel's weights in {STATIC_SHARED_BYTES} bytes of shared memory")
    return -(-cin // -(-cin // most))


class _MaskPlan:
    """Where backward-data reads its ReLU mask: a few elements in each input-channel turn, so
    the loads wait beside that turn's fmas, and each is kept as one bit (the epilogue then
    loads nothing). Read all at the end, every block of a wave loaded its 64 KiB of mask at
    the same moment, with no fmas to hide the burst: 0.06 ms of backward-data 16 -> 16's 0.75
    (NOTES v23). The y stores may alias the mask; each element is read by the thread that
    writes it, before it writes.

    A thread's R x G outputs, row-major (k = p * G + g), go `per` to a turn, in turns
    0 .. turns-1; per divides G or G divides per, so a turn's elements share one row base.
    Bit (turn t, element j) is bit (turns-1-t) * span + j % span of word j // span: each turn
    shifts the words left by span and sets its bits."""

    def __init__(self, rows, g_out, cin, cout, ob_size):
        self.rows, self.g_out, self.cout = rows, g_out, cout
        # channels past cout only where the blocks' channels overhang it
        self.channel_test = cout % ob_size != 0
        count = rows * g_out
        need = max(-(-count // cin), -(-count // 64))
        self.per = next(c for c in range(need, count + 1) if g_out % c == 0 or c % g_out == 0)
        self.turns = -(-count // self.per)
        self.span = max(1, 64 // self.turns)
        self.words = -(-self.per // self.span)
        self.active_guard = self.turns < cin
        # one turn: before the loop, beside the staging's loads (cin 1). A few elements a turn:
        # converted at the top of the next turn (after its barrier), so they wait a whole turn
        # of fmas; converted in the same turn, ptxas put the tests right after the loads.
        # Many: converted at once, as a register each through the fmas is too many
        self.in_loop = self.turns > 1
        self.late = self.in_loop and self.per <= 8

    def start(self, src):
        """Before the turns: the words, the first element's index and how many of the thread's
        rows are in the image (0 for a column outside it); with one turn, its elements."""
        for q in range(self.words):
            src(f"live{q} = uint64(0)")
        if self.late:
            for j in range(self.per):
                src(f"m{j} = float32(0)")
        src(f"mrow = h0 + cuda.threadIdx.y * {self.rows}")
        src(f"mt = (n * {self.cout} + o0) * plane + mrow * width + c0 + cuda.threadIdx.x")
        src(f"mrows = min(height - mrow, {self.rows}) if c0 + cuda.threadIdx.x < width else 0")
        if not self.in_loop:
            src("mr = 0")
            if self.channel_test:
                src("mg = o0")
            self._elements(src)
            self.convert(src)

    def load(self, src):
        """Turn ci's elements, then the index moves on: to the next group of channels, or at
        the row's end to the next row's first channel."""
        if self.active_guard:
            src(f"if ci < {self.turns}:").indent()
        per_row = max(1, self.g_out // self.per)        # turns a row
        rows = max(1, self.per // self.g_out)           # rows a turn
        src(f"mr = ci // {per_row}" if rows == 1 else f"mr = ci * {rows}")
        if self.channel_test:
            src(f"mg = o0 + ci % {per_row} * {self.per}")
        self._elements(src)
        if per_row == 1:
            src(f"mt += {rows} * width")
        else:
            src(f"if ci % {per_row} == {per_row - 1}:").indent()
            src(f"mt += width - {(per_row - 1) * self.per} * plane").dedent()
            src("else:").indent()(f"mt += {self.per} * plane").dedent()
        if not self.late:
            self.convert(src)
        if self.active_guard:
            src.dedent()

    def _elements(self, src):
        """m0.. from row mr, channel mg on (0 outside the image). (Names apart from the
        staging's p0, p1, ...) A branch per row, selects for the channels (see
        codegen.select_load): a branch per element made backward-data 1 -> 16's compile
        slow; loads without any branch compiled no faster and moved the PTX further from the
        tuned kernel's (NOTES v28)."""
        for dp in range(-(-self.per // self.g_out)):
            row = range(dp * self.g_out, min(self.per, (dp + 1) * self.g_out))
            for j in row:
                src(f"m{j} = float32(0)")
            src(f"if {'mr + %d' % dp if dp else 'mr'} < mrows:").indent()
            for j in row:
                dg = j % self.g_out
                at = "mt" + (f" + {dp} * width" if dp else "") + (f" + {dg} * plane" if dg else "")
                src(f"m{j} = " + (select_load("mask", at, f"mg + {dg} < {self.cout}")
                                  if self.channel_test else f"mask[uint64({at})]"))
            src.dedent()

    def convert(self, src, when=None):
        """Shift the words and set the bits of the elements in m0.. (`m > 0` decides: NaN
        gives 0), where `when` holds. A select per bit, not a branch (see select_load), in
        the form `selp(m > 0, live | bit, live)`: written `live | selp(m > 0, bit, 0)`, LLVM
        saw through the packing and tested each m again after the fma loop (64 floats live
        through it: 356 bytes of spills at the cap, against 28; NOTES v28)."""
        if when:
            src(f"if {when}:").indent()
        if self.turns > 1:      # (a shift by 64 is undefined: LLVM made the bits poison)
            for q in range(self.words):
                src(f"live{q} = live{q} << uint64({self.span})")
        for j in range(self.per):
            word = f"live{j // self.span}"
            src(f"{word} = selp(m{j} > float32(0), {word} | uint64({1 << j % self.span}), "
                f"{word})")
        if when:
            src.dedent()

    def bit(self, p, g):
        """(word, bit) of output (row p, channel g)."""
        turn, j = divmod(p * self.g_out + g, self.per)
        return j // self.span, (self.turns - 1 - turn) * self.span + j % self.span


def staged_loads(src, per_thread, threads, size, element):
    """A block's copy of `size` elements into shared ws, thread tid's j-th at tid + j * threads,
    in batches of STAGING_LOADS: element(j, register) writes the code that loads it into the
    variable `register`, then the batch's stores follow."""
    for first in range(0, per_thread, STAGING_LOADS):
        batch = range(first, min(first + STAGING_LOADS, per_thread))
        for j in batch:
            element(j, f"s{j % STAGING_LOADS}")
        for j in batch:
            store = f"ws[uint64(tid + {j * threads})] = s{j % STAGING_LOADS}"
            if (j + 1) * threads > size:
                src(f"if tid + {j * threads} < {size}:").indent()(store).dedent()
            else:
                src(store)


def window_slots(src, slots, threads, nx, row, corner, size):
    """A block's staging slots of an input window (nx elements, `row` a row, a halo of one):
    thread tid's element e{s} = tid + s * threads, whether it lies in the image (ok{s}: zero
    padding where not) and its image offset (off{s}). `corner`: expressions of the image row
    and column of the window's element (1, 1); `size`: of the image's height and width."""
    (top, left), (height, width) = corner, size
    for s_ in range(slots):
        src(f"e{s_} = tid + {s_ * threads}")
        src(f"r = e{s_} // {row}")
        src(f"c = e{s_} % {row}")
        src(f"hh = {top} + r - 1")
        src(f"cc = {left} + c - 1")
        src(f"ok{s_} = e{s_} < {nx} and hh >= 0 and hh < {height} and cc >= 0 and cc < {width}")
        src(f"off{s_} = hh * {width} + cc")


def first_window(src, slots, base):
    """The first input channel's window elements into p0.. (0 outside the image), the
    channel's offset `base` kept for the next ones."""
    src(f"base = {base}")
    for s_ in range(slots):
        src(f"p{s_} = x[uint64(base + off{s_})] if ok{s_} else float32(0)")


def _epilogue_value(acc, relu, slope, mask_bit):
    """The stored value of accumulator `acc`: ReLU'd (§1), LeakyReLU'd with `slope` (§9a), or,
    with `mask_bit` (word, bit): the output's word of mask bits `live<word>` and its bit (an
    expression), the ReLU (or, with slope, LeakyReLU) gradient mask applied (§2, §9a).
    Selects rather than branches (codegen.select_load says why); each keeps the value the
    branch kept, NaN included."""
    value = acc
    if relu:
        value = f"selp({value} <= float32(0), float32(0), {value})"
    if slope and not mask_bit:
        value = f"selp({value} > float32(0), {value}, {value} * {slope})"
    if mask_bit:
        word, bit = mask_bit
        dropped = f"{value} * {slope}" if slope else "float32(0)"
        value = f"selp((live{word} & {bit}) != uint64(0), {value}, {dropped})"
    return value


@generator
def _forward_kernel(cin, cout, relu, masked, transposed, geometry=None, max_registers=None,
                    leaky_slope=None, first=None, channel_group=None, early_loads=None,
                    double_buffered=None, w_first=0, from_output=False):
    """Numerics section 1 (transposed=False) or 2 (w read as w'[ci,o,2-a,2-b]), generated.
    With leaky_slope (a float32), the epilogue is LeakyReLU's (§9a): its activation, or with
    `masked` its gradient mask. The slope is written into the source as a float32 constant.
    With `first`, the channels are in two arrays, `first` of them in the first (numerics §12:
    a convolution of a concatenation, without the copy): the input channels (x, then x2)
    forward, the output channels (y, then y2) transposed; the kernel then takes x2 and y2.
    `channel_group`: input channels whose weights are staged at once (forward_channel_group's
    unless given). `early_loads` (early_loads_for's unless given): the next input channel's
    loads written without a branch; behind one, ptxas placed them after the channel's fmas, so
    the next turn's stores wait out their whole latency between the barriers (SASS, NOTES v34).
    The same operands in the same order: no bit changes. `w_first` (forward): the input channels
    are w's from w_first on; `from_output`: the chains start from y's values, not the bias (the
    rest of a chain that another kernel began: the decoder's convolution of an upsampled input
    continues over the skip connection's channels, phase_conv.py).
    `double_buffered` (double_buffered_for's unless given): channel ci is staged in window
    ci % 2 while the other still serves channel ci - 1's readers, so one barrier a channel
    separates the stores from the reads (two with a single window: before the stores, every
    thread has read the last channel; after them, the window is whole).

    Returns (kernel, block, output channels per block, rows per block)."""
    if transposed and (w_first or from_output):
        raise ValueError("w_first and from_output are for forward passes")
    if relu and leaky_slope is not None:
        raise ValueError("relu and leaky_slope exclude each other")
    if first is not None and masked:
        raise ValueError("a mask is not read for outputs in two arrays")
    slope = None if leaky_slope is None else f"float32({float(leaky_slope)!r})"
    in_first = None if transposed else first       # input channels in x, the rest in x2
    out_first = first if transposed else None      # output channels in y, the rest in y2
    if geometry is None:
        geometry, max_registers = forward_variant(cin, cout, transposed, masked, first,
                                                  from_output)
    if early_loads is None:
        early_loads = early_loads_for(cin, cout, first, masked, geometry)
    if double_buffered is None:
        double_buffered = double_buffered_for(cin, geometry, first)
    windows = 2 if double_buffered else 1
    R, g_out, groups = geometry
    BH = TY * R
    XW, XH = BW + 2, BH + 2
    ob_size = g_out * groups
    threads = BW * TY * groups
    nx = XW * XH
    group = forward_channel_group(cin, geometry, windows) if channel_group is None \
        else channel_group
    if not 0 < group <= cin or \
            forward_shared_bytes(geometry, group, windows) > STATIC_SHARED_BYTES:
        raise ValueError(f"a {cin} -> {cout} convolution cannot stage the weights of "
                         f"{group} input channels at once within {STATIC_SHARED_BYTES} bytes")
    grouped = group < cin
    ws_size = group * 9 * ob_size
    slots = -(-nx // threads)
    src = Source().kernel("x, w, b, mask, y, height, width, n_oblocks" if first is None else
                          "x, x2, w, b, mask, y, y2, height, width, n_oblocks", max_registers)
    src(f"tid = (cuda.threadIdx.z * {TY} + cuda.threadIdx.y) * {BW} + cuda.threadIdx.x")
    src("n = cuda.blockIdx.z // n_oblocks")
    src("ob = cuda.blockIdx.z % n_oblocks")
    src(f"h0 = cuda.blockIdx.y * {BH}")
    src(f"c0 = cuda.blockIdx.x * {BW}")
    src("plane = height * width")
    src(f"ws = cuda.shared.array({ws_size}, float32)")
    src(f"xs = cuda.shared.array({windows * nx}, float32)")

    def stage_weights(channel, first_channel=""):
        """ws: the weights of the block's output channels and of input channels `channel` =
        first_channel + 0, 1, .., laid out [channel][ky*3+kx][output channel] (0 outside the
        layer). All at once (before the channel loop): written out, STAGING_LOADS loads
        before their stores (a loop of load-store pairs waited out each load's latency in
        turn), each element's place computed unsigned (signed, its divisions by constants and
        the indices' wrap-around tests took ~140 instructions an element). In groups (in the
        loop): a loop, signed, since written out or unsigned its addresses were hoisted out of
        the channel loop and spilled (48 + 48 -> 48: 84 -> 1160 or 156 bytes). SASS, NOTES v46."""
        if grouped:
            src(f"for i in range(tid, {ws_size}, {threads}):").indent()
            src(f"o = ob * {ob_size} + i % {ob_size}")
            src(f"k = (i // {ob_size}) % 9")
            src(f"{channel} = {first_channel}i // {ob_size * 9}")
            src("v = float32(0)")
            src(f"if o < {cout}{f' and {channel} < {cin}' if cin % group else ''}:").indent()
            src(f"v = w[{channel}, o, 2 - k // 3, 2 - k % 3]" if transposed else
                f"v = w[o, {f'{w_first} + ' if w_first else ''}{channel}, k // 3, k % 3]")
            src.dedent()
            src("ws[i] = v").dedent()
            return

        def element(j, register):
            """Thread tid's j-th element of ws into `register`."""
            src(f"e = uint64(tid + {j * threads})")
            src(f"o = uint64(ob * {ob_size}) + e % uint64({ob_size})")
            src(f"k = e // uint64({ob_size}) % uint64(9)")
            src(f"{channel} = {first_channel}int64(e // uint64({ob_size * 9}))")
            tests = [f"o < uint64({cout})"] + \
                ([f"e < uint64({ws_size})"] if (j + 1) * threads > ws_size else [])
            load = (f"w[uint64({channel}), o, uint64(2) - k // uint64(3), "
                    f"uint64(2) - k % uint64(3)]" if transposed else
                    f"w[o, uint64({f'{w_first} + ' if w_first else ''}{channel}), "
                    f"k // uint64(3), k % uint64(3)]")
            src(f"{register} = {load} if {' and '.join(tests)} else float32(0)")

        staged_loads(src, -(-ws_size // threads), threads, ws_size, element)

    def next_channel_without_branches():
        """early_loads: the next input channel's window into p0.. without a branch (a clamped
        channel at the last, reading element 0 outside the image, both arrays of a
        concatenation read and one kept), so the loads stay in the block of the fmas."""
        last = cin if in_first is None else in_first
        src(f"base += selp(ci + 1 < {last}, plane, base - base)")
        if in_first is not None:
            src(f"base2 = (n * {cin - in_first} + min(max(ci + 1 - {in_first}, 0), "
                f"{cin - in_first - 1})) * plane")
        for s_ in range(slots):
            value = f"x[uint64(selp(ok{s_}, base + off{s_}, base - base))]"
            if in_first is not None:
                value = (f"selp(ci + 1 < {in_first}, {value}, "
                         f"x2[uint64(selp(ok{s_}, base2 + off{s_}, base - base))])")
            src(f"p{s_} = selp(ok{s_}, {value}, float32(0))")

    if not grouped:
        stage_weights("ci")
    window_slots(src, slots, threads, nx, XW, ("h0", "c0"), ("height", "width"))
    first_window(src, slots, f"n * {cin if in_first is None else in_first} * plane")
    src(f"o0 = (ob * {groups} + cuda.threadIdx.z) * {g_out}")
    if masked:
        plan = _MaskPlan(R, g_out, cin, cout, ob_size)
        plan.start(src)
    if from_output:     # the thread's outputs (0 outside the image or the layer)
        src("col = c0 + cuda.threadIdx.x")
        for p in range(R):
            src(f"row{p} = h0 + cuda.threadIdx.y * {R} + {p}")
            for g in range(g_out):
                src(f"a{p}_{g} = " + select_load(
                    "y", f"(n * {cout} + o0 + {g}) * plane + row{p} * width + col",
                    f"(o0 + {g} < {cout}) & (row{p} < height) & (col < width)"))
    else:
        for g in range(g_out):
            src(f"b{g} = b[o0 + {g}] if o0 + {g} < {cout} else float32(0)")
            for p in range(R):
                src(f"a{p}_{g} = b{g}")
    src(f"wb = cuda.threadIdx.z * {g_out}")
    src(f"xb = uint64(cuda.threadIdx.y * {R * XW} + cuda.threadIdx.x)")
    if grouped:     # ci's place in its group, counted: ci % group took ~25 instructions a turn
        src("cg = 0")
    src(f"for ci in range({cin}):").indent()
    if double_buffered:
        src(f"window = uint64((ci & 1) * {nx})")
        if grouped:     # behind a barrier of its own: every thread has read the last group's
            src("if cg == 0:").indent()
            src("cuda.syncthreads()")
            stage_weights("cw", "ci + ")
            src.dedent()
    else:
        src("cuda.syncthreads()")
    at = "window + " if double_buffered else ""
    for s_ in range(slots):
        if (s_ + 1) * threads > nx:
            src(f"if e{s_} < {nx}:").indent()(f"xs[{at}uint64(e{s_})] = p{s_}").dedent()
        else:
            src(f"xs[{at}uint64(e{s_})] = p{s_}")
    if grouped and not double_buffered:  # between the barriers: the last group's are read
        src("if cg == 0:").indent()
        stage_weights("cw", "ci + ")
        src.dedent()
    src("cuda.syncthreads()")
    if masked and plan.late:
        plan.convert(src, "ci > 0" + (f" and ci <= {plan.turns}" if plan.active_guard else ""))
    if early_loads:
        next_channel_without_branches()
    else:
        src(f"if ci + 1 < {cin if in_first is None else in_first}:").indent()
        src("base += plane")
        for s_ in range(slots):
            src(f"p{s_} = x[uint64(base + off{s_})] if ok{s_} else float32(0)")
        src.dedent()
    if in_first is not None and not early_loads:    # the next channel is x2's
        src(f"elif ci + 1 < {cin}:").indent()
        src(f"base2 = (n * {cin - in_first} + ci + 1 - {in_first}) * plane")
        for s_ in range(slots):
            src(f"p{s_} = x2[uint64(base2 + off{s_})] if ok{s_} else float32(0)")
        src.dedent()
    if masked and plan.in_loop:
        plan.load(src)
    for r in range(R + 2):
        for k in range(3):
            src(f"v{r}_{k} = xs[{at}xb + uint64({r * XW + k})]")
    src(f"wc = uint64(wb + {'cg' if grouped else 'ci'} * {9 * ob_size})")
    # the channel's fmas: a call per kernel row (ky) of `taps` (codegen.Source.device_function
    # says why), with that row's window rows; the chains go from call to call in a tuple
    chains = [f"a{p}_{g}" for p in range(R) for g in range(g_out)]
    src(f"state0 = ({', '.join(chains)},)")
    for ky in range(3):
        rows = ", ".join(f"v{p + ky}_{kx}" for p in range(R) for kx in range(3))
        src(f"state{ky + 1} = taps(ws, wc, int64({ky * 3 * ob_size}), ({rows},), state{ky})")
    src(f"{', '.join(chains)}, = state3")
    if grouped:
        src(f"cg = selp(cg + 1 < {group}, cg + 1, cg - cg)")
    src.dedent()
    called = Source().device_function("taps", "ws, wc, k, rows, state")
    called(f"{', '.join(chains)}, = state")
    called(", ".join(f"v{p}_{kx}" for p in range(R) for kx in range(3)) + ", = rows")
    for kx in range(3):
        for g in range(g_out):
            called(f"t = ws[wc + uint64(k + {kx * ob_size + g})]")
            for p in range(R):
                called(f"a{p}_{g} = fma(v{p}_{kx}, t, a{p}_{g})")
    called(f"return ({', '.join(chains)},)")
    if masked and plan.late and not plan.active_guard:
        plan.convert(src)       # the last turn's (with fewer turns than channels, done in the loop)
    # the outputs, row by row: a call of `outputs` per row, with the row's chains (and with
    # the mask, each output's word of bits and its bit)
    src("col = c0 + cuda.threadIdx.x")
    src("if col < width:").indent()
    stores = Source().device_function(
        "outputs", "y, i, chains" + (", words, bits" if masked else "") +
        (", o0, plane" if out_first is None else ", y2, n, o0, plane"))
    stores(", ".join(f"a{g}" for g in range(g_out)) + ", = chains")
    if masked:
        stores(", ".join(f"live{g}" for g in range(g_out)) + ", = words")
        stores(", ".join(f"bit{g}" for g in range(g_out)) + ", = bits")
    for g in range(g_out):
        stores(f"if o0 + {g} < {cout}:").indent()
        stores(f"v = {_epilogue_value(f'a{g}', relu, slope, masked and (g, f'bit{g}'))}")
        if out_first is None:
            stores(f"y[uint64(i + {g} * plane)] = v")
        else:
            stores(f"if o0 + {g} < {out_first}:").indent()
            stores(f"y[uint64((n * {out_first} + o0 + {g}) * plane + i)] = v").dedent()
            stores("else:").indent()
            stores(f"y2[uint64((n * {cout - out_first} + o0 + {g} - {out_first}) * plane "
                   f"+ i)] = v").dedent()
        stores.dedent()
    for p in range(R):
        src(f"row{p} = h0 + cuda.threadIdx.y * {R} + {p}")
        if out_first is None:
            src(f"i{p} = (n * {cout} + o0) * plane + row{p} * width + col")
        else:
            src(f"i{p} = row{p} * width + col")
        src(f"if row{p} < height:").indent()
        args = [f"({', '.join(f'a{p}_{g}' for g in range(g_out))},)"]
        if masked:
            bits = [plan.bit(p, g) for g in range(g_out)]
            args.append(f"({', '.join(f'live{word}' for word, _ in bits)},)")
            args.append(f"({', '.join(f'uint64({1 << bit})' for _, bit in bits)},)")
        args += ["o0", "plane"] if out_first is None else ["y2", "n", "o0", "plane"]
        src(f"outputs(y, i{p}, {', '.join(args)})").dedent()
    leaky = "" if slope is None else f"_leaky{np.float32(leaky_slope).view(np.uint32):08x}"
    two = "" if first is None else f"_first{first}"
    groups_of = f"_group{group}" if grouped else ""
    module = load_module(f"conv_forward_{cin}_{cout}_{int(relu)}{int(masked)}{int(transposed)}"
                         f"{leaky}{two}{groups_of}{'_early' if early_loads else ''}"
                         f"{'_db' if double_buffered else ''}"
                         f"{f'_w{w_first}' if w_first else ''}{'_from_y' if from_output else ''}",
                         src.text() + called.text() + stores.text())
    return module.kernel, (BW, TY, groups), ob_size, BH


def _launch_forward(x, w, b, y, relu, mask, transposed, leaky_slope=None, x2=None, y2=None,
                    **variant):
    """`variant` (geometry, max_registers, early_loads, double_buffered) is for
    bench/tune_conv.py; w_first and from_output as _forward_kernel's. With x2
    (forward) or y2 (transposed), the input or output channels continue in that second array."""
    n, cin = x.shape[:2]
    cout, h, wd = y.shape[1:]
    first = None
    if x2 is not None:
        first, cin = cin, cin + x2.shape[1]
    if y2 is not None:
        first, cout = cout, cout + y2.shape[1]
    kernel, block, ob_size, BH = _forward_kernel(cin, cout, relu, mask is not None, transposed,
                                                 leaky_slope=leaky_slope, first=first, **variant)
    n_oblocks = -(-cout // ob_size)
    grid = (-(-wd // BW), -(-h // BH), n * n_oblocks)
    flat_mask = placeholder(1) if mask is None else mask.reshape(mask.size)
    if first is None:
        kernel[grid, block, launch_stream()](x.reshape(x.size), w, b, flat_mask,
                                             y.reshape(y.size), h, wd, n_oblocks)
        return
    x2 = x if x2 is None else x2        # the kernel takes both pairs; an unused one is not read
    y2 = y if y2 is None else y2
    kernel[grid, block, launch_stream()](x.reshape(x.size), x2.reshape(x2.size), w, b,
                                         flat_mask, y.reshape(y.size), y2.reshape(y2.size), h,
                                         wd, n_oblocks)


def _check_conv(x, w, cin_axis, channels=None):
    channels = x.shape[1] if channels is None else channels
    if w.shape[2:] != (3, 3) or w.shape[cin_axis] != channels:
        raise ValueError(f"weights of shape {w.shape} do not fit {channels} input channels "
                         "(OIHW, 3x3)")


def _second_input(x, x2, upsampled=False):
    """x2 as an Operand beside x (same batch and image size, or twice x's with `upsampled`),
    or None; and the channels of both together."""
    x2 = None if x2 is None else Operand("x2", x2, 4)
    return x2, concatenated_channels(x.shape, None if x2 is None else x2.shape, upsampled)


def conv2d_forward(x, w, b, relu=False, out=None, leaky_slope=None, x2=None, upsampled=False):
    """Forward convolution with fused bias and optional ReLU or LeakyReLU (numerics §1, §9a);
    with x2, of x's channels followed by x2's (their concatenation, not copied: §12); with
    `upsampled` too, of x nearest-upsampled x2 (read in place, in phase form: §12)."""
    slope = None if leaky_slope is None else leaky_slope_f32(leaky_slope)
    x, w, b = Operand("x", x, 4), Operand("w", w, 4), Operand("b", b, 1)
    x2, cin = _second_input(x, x2, upsampled)
    _check_conv(x, w, 1, cin)
    if b.shape != (w.shape[0],):
        raise ValueError(f"bias of shape {b.shape} does not fit {w.shape[0]} output channels")
    size = x.shape[2:] if x2 is None else x2.shape[2:]
    out_op, y = output("out", out, (x.shape[0], w.shape[0]) + size, x)
    if upsampled:   # x's chains in phase form, then on over x2's channels (§12)
        from .phase_conv import launch_phase_chains     # (it imports this module)
        launch_phase_chains(x.device, w.device, b.device, y)
        _launch_forward(x2.device, w.device, b.device, y, relu, None, transposed=False,
                        leaky_slope=slope, w_first=x.shape[1], from_output=True)
    else:
        _launch_forward(x.device, w.device, b.device, y, relu, None, transposed=False,
                        leaky_slope=slope, x2=None if x2 is None else x2.device)
    return result(out_op, y, x)


def _backward_data_split(gy, w, channels, out):
    """conv2d_backward_data's gradient of a concatenation: the input channels below
    `channels` into one array, the rest into another (no mask); with out[1] None, only the
    first part: the kernel's output channels stop at `channels` (w's are read by index, each
    channel's chain its own, so the bits are the split's)."""
    n, _, h, wd = gy.shape
    cin = w.shape[1]
    if not 0 < channels < cin:
        raise ValueError(f"cannot split {cin} input channels after channel {channels}")
    if out is not None and out[1] is None:
        op, dev = output("out[0]", out[0], (n, channels, h, wd), gy)
        _launch_forward(gy.device, w.device, _zero_bias(cin), dev, False, None, transposed=True)
        return result(op, dev, gy), None
    shapes = (n, channels, h, wd), (n, cin - channels, h, wd)
    parts = [output(f"out[{k}]", None if out is None else out[k], shape, gy)
             for k, shape in enumerate(shapes)]
    _launch_forward(gy.device, w.device, _zero_bias(cin), parts[0][1], False, None,
                    transposed=True, y2=parts[1][1])
    return tuple(result(op, dev, gy) for op, dev in parts)


def conv2d_backward_data(gy, w, relu_output=None, out=None, leaky_slope=None, split=None):
    """Gradient w.r.t. the input, with the ReLU (or, with leaky_slope, LeakyReLU) mask of
    relu_output folded in (numerics §2, §9a). With `split` (and no mask), the gradient of a
    concatenation: a pair, input channels below `split` and the rest (`out` a pair too; its
    second None: the rest not computed, None in its place)."""
    if leaky_slope is not None and relu_output is None:
        raise ValueError("leaky_slope needs relu_output, the activation's stored output")
    slope = None if leaky_slope is None else leaky_slope_f32(leaky_slope)
    gy, w = Operand("gy", gy, 4), Operand("w", w, 4)
    _check_conv(gy, w, 0)
    if split is not None:
        if relu_output is not None:
            raise ValueError("the gradient of a concatenation is not masked")
        return _backward_data_split(gy, w, split, out)
    shape = (gy.shape[0], w.shape[1]) + gy.shape[2:]
    mask = None
    if relu_output is not None:
        mask = same_shape("relu_output", Operand("relu_output", relu_output, 4), shape)
    out_op, gx = output("out", out, shape, gy)
    _launch_forward(gy.device, w.device, _zero_bias(w.shape[1]), gx, False,
                    None if mask is None else mask.device, transposed=True, leaky_slope=slope)
    return result(out_op, gx, gy)


@lru_cache(maxsize=None)
def _zero_bias(channels):
    """The chains of backward-data start from +0 (numerics section 2): a bias of zeros, made
    once per channel count (no kernel writes it)."""
    return cuda.to_device(np.zeros(channels, np.float32))


def relu_backward(gy, y, out=None):
    """gy where y > 0, else +0 (numerics §3)."""
    gy, y = Operand("gy", gy, 4), Operand("y", y, 4)
    if gy.shape != y.shape:
        raise ValueError(f"gy {gy.shape} and y {y.shape} differ in shape")
    out_op, gx = output("out", out, gy.shape, gy)
    size = int(np.prod(gy.shape))
    _relu_mask[-(-size // 256), 256, launch_stream()](
        gy.device.reshape(size), y.device.reshape(size), gx.reshape(size))
    return result(out_op, gx, gy)


@cuda.jit(cache=True)
def _relu_mask(gy, y, gx):
    i = cuda.grid(1)
    if i < gy.size:
        gx[i] = gy[i] if y[i] > float32(0) else float32(0)


# Weight gradients (numerics section 4a): one block per (image, tile), or, for layers too wide
# for one block, per (image, tile, group of output x input channels) (weights_block). Thread
# (o-group, ci) holds GO x 9 weight chains in registers (or, split_rows, thread (kernel row,
# o-group, ci) holds GO x 3) and walks the tile's in-image pixels row-major, with the input
# window sliding along the row in registers; the next Cout threads (of the block's output
# channels) hold one bias chain each. Per tile row the block stages that row of gy (its output
# channels) and one new row of x (its input channels) in shared memory, x rows in a ring of
# three (of four, and gy's rows in two buffers, where one barrier a row: weights_one_barrier);
# threads beyond the chain holders only stage.
# WeightsVariant says how each layer's kernel is built.
GS = TILE_W + 1              # gy row stride: the warp's output groups fall in different banks
XROW = TILE_W + 2
CALL_COLUMNS = 4            # columns of a written-out tile row per device-function call (the
                            # 48+48 -> 48 kernel's numba front end: 3.8-3.9 CPU s at 2 or 4,
                            # 4.3 at 8, 5.2 at 16; branch gcold's NOTES entry)


def x_ring_stride(slots):
    """Floats per input channel in an x ring of `slots` rows: = 2 mod 16, so that the warp's
    input channels spread over the banks."""
    return slots * XROW + (2 - slots * XROW) % 16


# Weight-gradient blocks of the U-Nets' layers measured faster than weights_block's rule gives
# (bench/tune_conv.py --parts weight-blocks, H200, 4 x 1024^2, bits equal, 2026-12-01, NOTES
# v41): (Cin, Cout): (output channels per thread, (output, input channels) a block), and the
# rule's block's ms -> this one's. The rule's largest block leaves 9 or 13 chain-holding warps
# where these hold 12-16 more evenly over the SM's four schedulers; no simple rank of the
# blocks ordered all six layers measured as their times did (80 -> 32 keeps the rule's).
TUNED_WEIGHT_BLOCKS = {(48, 48): (2, (48, 16)),      # (4, 48 x 24)  6.800 ->  5.819
                       (97, 64): (2, (64, 14)),      # (4, 64 x 25) 18.322 -> 16.434
                       (144, 96): (4, (96, 16)),     # (4, 48 x 36) 36.718 -> 33.332
                       (112, 48): (4, (48, 38)),     # (4, 48 x 28) 15.199 -> 13.278
                       (56, 24): (2, (24, 19))}      # (4, 24 x 28)  4.383 ->  3.793


class WeightsVariant(NamedTuple):
    """How a weight-gradient kernel is built (the bits do not depend on it).

    threads: at least this many threads per block (more where the chains need them).
    max_registers: ptxas's cap, or None.
    precompute: each thread's staging addresses computed once, before the row loop, instead of
    in every row, at the cost of registers held across the loop.
    unroll: a full-width tile row written out pixel by pixel (constant shared-memory offsets)
    instead of a loop over its columns.
    prefetch: each row step issues the next step's loads (into registers) before its compute,
    and stores them to shared memory at the start of the next step.
    split_rows: three threads per (output group, input channel), one per kernel row, each
    holding 3 chains per output instead of 9: shorter chains of work per thread, 3 times the
    threads (for the small layers, whose few chains leave most of a block idle).
    outputs: output channels per chain-holding thread (a divisor of Cout), or None for 4
    where Cout allows and there are at least 64 chains of 9 taps, else 1."""
    threads: int
    max_registers: Optional[int]
    precompute: bool
    unroll: bool
    prefetch: bool
    split_rows: bool = False
    outputs: Optional[int] = None


def weights_variant(cin, cout):
    """The fastest of bench/tune_conv.py's variants (H100, 2026-11-26, 4 x 1024^2, graph
    replays of the kernel alone, ms). 16 -> 16: two output channels per thread, so that 128
    threads (four warps: every scheduler of the SM gets chain holders) hold chains and a
    fifth warp the bias chains; capped at 128 registers, addresses precomputed, full-width
    rows written out, the next row's loads in flight: 0.675 (uncapped 144 registers 0.752;
    four output channels per thread, two warps of chain holders: 0.772, uncapped 1.034,
    without prefetch 0.819, rolled 0.985; one channel per thread 0.832). Wider layers keep
    four per thread where two would need more threads than 128 registers each allow (512).
    Layers with one channel on a side (fewer than 64 chains of 9 taps per tile, most of a
    block idle): each kernel row's chains on a thread of its own, rows written out, the next
    row's loads in flight, 64 threads: 1 -> 16 0.153, 16 -> 1 0.186 (the same with 9 chains
    per thread: 0.167 and 0.266; with addresses precomputed: 0.171 and 0.202)."""
    if cin * cout >= 64:
        cap = 128     # two outputs per thread only while the block's threads fit 64K registers
        two = cout % 2 == 0 and cout // 2 * cin + cout <= 65536 // cap
        tuned = TUNED_WEIGHT_BLOCKS.get((cin, cout))
        outputs = tuned[0] if tuned else 2 if two else None
        return WeightsVariant(128, cap, True, True, True, outputs=outputs)
    return WeightsVariant(64, None, False, True, True, True)


def _outputs_per_thread(cin, cout, variant):
    """Output channels per chain-holding thread: the variant's, or 4 where Cout allows and
    there are at least 64 chains of 9 taps, else 1."""
    go = variant.outputs
    if go is None:
        go = 4 if cout % 4 == 0 and cin * cout >= 64 else 1
    if cout % go:
        raise ValueError(f"{go} output channels per thread do not divide {cout}")
    return go


def _weights_block_needs(cin, cout, variant, outputs, inputs):
    """(threads, shared bytes) of a block holding the chains of `outputs` x `inputs` channels
    (the rest only stage) and the bias chains of its `outputs`."""
    workers = outputs // _outputs_per_thread(cin, cout, variant) * inputs * (
        3 if variant.split_rows else 1)
    threads = max(variant.threads, -(-(workers + outputs) // 32) * 32)
    return threads, 4 * (outputs * GS + inputs * x_ring_stride(3))


def weights_one_barrier(variant, outputs, inputs):
    """Whether a weight-gradient block of `outputs` x `inputs` channels stages each tile row
    behind one barrier instead of two: gy's rows in two buffers and x's rows in a ring of four,
    so that a row's stores never touch what the row being computed reads. Taken with prefetch
    where it fits static shared memory (two barriers a row cost the 48 -> 48 kernel ~11 % of
    its cycles, NOTES v46)."""
    return variant.prefetch and \
        4 * (2 * outputs * GS + inputs * x_ring_stride(4)) <= STATIC_SHARED_BYTES


def weight_groups(cin, inputs):
    """Input-channel groups of `inputs` channels that cover `cin` (the last may hold fewer)."""
    return -(-cin // inputs)


def equal_group_sizes(cin):
    """The sizes of groups as equal as can be that cover `cin` channels (in 1, 2, .. groups)."""
    return sorted({-(-cin // k) for k in range(1, cin + 1)})


def _weights_max_threads(variant):
    """Threads a weight-gradient block may have at the variant's register cap."""
    cap = variant.max_registers or UNCAPPED_REGISTERS
    return min(BLOCK_THREADS, BLOCK_REGISTERS // cap // 32 * 32)


def weights_blocks_that_fit(cin, cout, variant):
    """Every (output channels, input channels) block of the layer that fits one block (threads
    at the register cap, static shared memory) and the grid: output channels a multiple of the
    outputs per thread dividing the layer's, input channels in equal groups (the last holding
    fewer where they do not divide the layer's)."""
    go = _outputs_per_thread(cin, cout, variant)
    max_threads = _weights_max_threads(variant)

    def fits(outputs, inputs):
        threads, shared = _weights_block_needs(cin, cout, variant, outputs, inputs)
        return threads <= max_threads and shared <= STATIC_SHARED_BYTES and \
            cout // outputs * weight_groups(cin, inputs) <= GRID_Z_MAX

    return [(o, c) for o in range(go, cout + 1, go) if cout % o == 0
            for c in equal_group_sizes(cin) if fits(o, c)]


def weights_block(cin, cout, variant):
    """(output channels, input channels) of one weight-gradient block: all of the layer's
    where they fit a block, else the largest block of weights_blocks_that_fit, the fewest
    blocks and then the least staging. Every chain is still one thread's, in the same order,
    into the same gw_part / gb_part element: no bit changes (the wide U-Net layers, 48 -> 48
    and up, need it). Input groups that need not divide the channels keep a prime count such
    as the Noise2Noise U-Net's 96 + 1 -> 64 in a few wide blocks, where divisors alone left one
    input channel a block (80 of its step's 226 ms, H200, NOTES v40); they are taken only
    where they hold more than twice the chains of the best dividing block (equal work in
    every block, and the layers measured before keep their kernels). The layers of
    TUNED_WEIGHT_BLOCKS take their measured block."""
    blocks = weights_blocks_that_fit(cin, cout, variant)
    tuned = TUNED_WEIGHT_BLOCKS.get((cin, cout))
    if tuned and tuned[0] == _outputs_per_thread(cin, cout, variant) and tuned[1] in blocks:
        return tuned[1]
    if (cout, cin) in blocks:
        return cout, cin
    if not blocks:
        raise ValueError(f"no block of the {cin} -> {cout} weight-gradient kernel fits "
                         f"{_weights_max_threads(variant)} threads and {STATIC_SHARED_BYTES} "
                         f"bytes of shared memory in {GRID_Z_MAX} blocks a tile")
    best = lambda candidates: max(candidates, key=lambda oc: (oc[0] * oc[1],
                                                               -(oc[0] * TILE_W + oc[1] * XROW)))
    ragged = best(blocks)
    dividing = [oc for oc in blocks if cin % oc[1] == 0]
    if not dividing:
        return ragged
    chosen = best(dividing)
    return chosen if 2 * chosen[0] * chosen[1] >= ragged[0] * ragged[1] else ragged


@generator
def _weights_kernel(cin, cout, variant, first=None, block=None):
    """Numerics section 4a, generated: (kernel, threads per block). With `first`, the input
    channels are in two arrays, `first` of them in x and the rest in `xtwo` (a concatenation,
    §12), which the kernel then takes after x (x0, x1, x2 name the rows a thread holds).
    With `block` (output channels, input channels) smaller than the layer's, a block holds
    those channels' chains: grid dimension z numbers the blocks, input-channel groups fastest
    (the bias chains are in the first input group's blocks). Where the groups do not divide
    the input channels, the last group's channels past the layer's stage zeros, and their
    threads run their chains on them but store nothing."""
    threads, max_registers, precompute, unroll, prefetch, split, _ = variant
    go = _outputs_per_thread(cin, cout, variant)
    O, C = (cout, cin) if block is None else block
    if cout % O or O % go or not 0 < C <= cin:
        raise ValueError(f"blocks of {O} x {C} channels do not tile {cout} x {cin} "
                         f"({go} outputs per thread)")
    grouped = (O, C) != (cout, cin)
    ragged = cin % C != 0      # the last input group holds fewer than C channels
    held = 1 if split else 3            # kernel rows whose chains a thread holds
    workers = O // go * C * (3 // held)   # threads that hold chains; the rest only stage
    threads = max(threads, -(-(workers + O) // 32) * 32)
    g_total, x_total = O * TILE_W, C * XROW
    one_barrier = weights_one_barrier(variant, O, C)
    ring = 4 if one_barrier else 3      # x rows staged at once
    gy_buffer = " + gbuf" if one_barrier else ""   # gbuf: the buffer of the step's gy row
    xs_stride = x_ring_stride(ring)
    called = Source()      # the device function that chains_unrolled calls
    src = Source().kernel("gy, x, gw_part, gb_part, height, width, tiles_w" if first is None else
                          "gy, x, xtwo, gw_part, gb_part, height, width, tiles_w", max_registers)
    src("n = cuda.blockIdx.y")
    src("t = cuda.blockIdx.x")
    if grouped:
        src(f"o_first = cuda.blockIdx.z // {weight_groups(cin, C)} * {O}")
        src(f"ci_first = cuda.blockIdx.z % {weight_groups(cin, C)} * {C}")
    src(f"r0 = (t // tiles_w) * {TILE_H}")
    src(f"c0 = (t % tiles_w) * {TILE_W}")
    src(f"rows = min({TILE_H}, height - r0)")
    src(f"cols = min({TILE_W}, width - c0)")
    src("plane = height * width")
    src("tid = cuda.threadIdx.x")
    src(f"og = tid % {O // go * C} // {C}" if split else f"og = tid // {C}")
    src(f"ci = tid % {C}")
    first_row = "ky0 + " if split else ""   # ky0: the first kernel row a thread holds
    if split:
        src(f"ky0 = tid // {O // go * C}")
    src(f"gs = cuda.shared.array({(2 if one_barrier else 1) * O * GS}, float32)")
    src(f"xs = cuda.shared.array({C * xs_stride}, float32)")
    src("bias = float32(0)")
    for j in range(go):
        for k in range(3 * held):
            src(f"a{j}_{k} = float32(0)")
    src(f"xbase = (n * {cin} + ci_first) * plane" if grouped else f"xbase = n * {cin} * plane")
    src(f"gbase = (n * {cout} + o_first) * plane" if grouped else f"gbase = n * {cout} * plane")
    channel = "ci_first + e // " if grouped else "e // "     # of the layer, from staging slot e
    in_layer = f" and {channel}{XROW} < {cin}" if ragged else ""   # not past the last group's

    def stage_loads(total, load, name):
        for i in range(-(-total // threads)):
            if not precompute:
                src(f"e = tid + {i * threads}")
            guard = f" and e < {total}" if (i + 1) * threads > total and not precompute else ""
            load(i, guard, name)

    def stage_stores(total, store, name):
        for i in range(-(-total // threads)):
            if not precompute:
                src(f"e = tid + {i * threads}")
            if (i + 1) * threads > total:
                src(f"if tid + {i * threads} < {total}:").indent()(store(i, name)).dedent()
            else:
                src(store(i, name))

    def stage(total, load, store):
        """Copy `total` elements global -> shared: every thread issues all its loads, then
        stores them (a loop of load-store pairs would wait for each load in turn)."""
        stage_loads(total, load, "p")
        stage_stores(total, store, "p")

    def load_x(i, guard, name):
        if first is not None:
            load_x_of_two(i, guard, name)
            return
        if precompute:
            src(f"{name}{i} = x[uint64(xa{i})] if qin and xv{i} else float32(0)")
            return
        src(f"col = c0 + e % {XROW} - 1")
        src(f"{name}{i} = x[uint64(xbase + (e // {XROW}) * plane + q * width + col)] "
            f"if qin and col >= 0 and col < width{guard}{in_layer} else float32(0)")

    def load_x_of_two(i, guard, name):
        """Channel ch = e // XROW from x (ch < first) or xtwo, whose images hold cin - first."""
        if not precompute:
            src(f"col = c0 + e % {XROW} - 1")
            src(f"ch = {channel}{XROW}")
            src(f"xa{i} = (n * {first} + ch) * plane + col if ch < {first} else "
                f"(n * {cin - first} + ch - {first}) * plane + col")
            src(f"xf{i} = ch < {first}")
            src(f"xv{i} = col >= 0 and col < width{guard}{in_layer}")
        src(f"{name}{i} = float32(0)")
        src(f"if qin and xv{i}:").indent()
        at = f"xa{i}" if precompute else f"xa{i} + q * width"
        src(f"{name}{i} = x[uint64({at})] if xf{i} else xtwo[uint64({at})]").dedent()

    def load_gy(i, guard, name):
        if precompute:
            src(f"{name}{i} = gy[uint64(ga{i})] if gv{i} else float32(0)")
            return
        src(f"c = e % {TILE_W}")
        src(f"{name}{i} = gy[uint64(gbase + (e // {TILE_W}) * plane + (q - 1) * width + c0 + c)] "
            f"if c < cols{guard} else float32(0)")

    def store_x(i, name):
        if precompute:
            return f"xs[xi{i} + xo] = {name}{i}"
        return f"xs[uint64((e // {XROW}) * {xs_stride} + e % {XROW}) + xo] = {name}{i}"

    # where a block's threads span whole gy rows, thread tid's slots lie a constant apart in
    # gs: one index held, the others its constant offsets (no registers, no adds)
    gy_rows_a_turn = threads // TILE_W if threads % TILE_W == 0 else None

    def store_gy(i, name):
        if precompute and gy_rows_a_turn:
            return f"gs[uint64(gi0 + {i * gy_rows_a_turn * GS}{gy_buffer})] = {name}{i}"
        if precompute:
            return f"gs[uint64(gi{i}{gy_buffer})] = {name}{i}"
        return f"gs[uint64((e // {TILE_W}) * {GS} + e % {TILE_W}{gy_buffer})] = {name}{i}"

    # precompute: each staging slot's address, validity and shared index, once; the addresses
    # start at the first rows loaded (x's image row r0 - 1, gy's the row above, as its loads
    # read row q - 1) and move a row down after each step's loads (q * width written into
    # each load was computed in each load's predicated block: a 64-bit multiply and two
    # constant loads a load)
    if precompute:
        for i in range(-(-x_total // threads)):
            src(f"e = tid + {i * threads}")
            src(f"col = c0 + e % {XROW} - 1")
            if first is None:
                src(f"xa{i} = xbase + (e // {XROW}) * plane + (r0 - 1) * width + col")
            else:
                src(f"ch = {channel}{XROW}")
                src(f"xa{i} = (n * {first} + ch) * plane + col if ch < {first} else "
                    f"(n * {cin - first} + ch - {first}) * plane + col")
                src(f"xa{i} = xa{i} + (r0 - 1) * width")
                src(f"xf{i} = ch < {first}")
            src(f"xv{i} = col >= 0 and col < width and e < {x_total}{in_layer}")
            src(f"xi{i} = uint64((e // {XROW}) * {xs_stride} + e % {XROW})")
        for i in range(-(-g_total // threads)):
            src(f"e = tid + {i * threads}")
            src(f"c = e % {TILE_W}")
            src(f"ga{i} = gbase + (e // {TILE_W}) * plane + (r0 - 2) * width + c0 + c")
            src(f"gv{i} = c < cols and e < {g_total}")
            if i == 0 or not gy_rows_a_turn:
                src(f"gi{i} = (e // {TILE_W}) * {GS} + c")

    def next_rows():
        """precompute: the staging addresses a row down, after a step's loads."""
        if precompute:
            for i in range(-(-x_total // threads)):
                src(f"xa{i} = xa{i} + width")
            for i in range(-(-g_total // threads)):
                src(f"ga{i} = ga{i} + width")

    # step s stages image row q = r0 + s of x in ring slot (q + 1) % ring (rows outside the
    # image are 0) and, from s = 1, gy's tile row s - 1 (one_barrier: in buffer (s - 1) % 2);
    # then it computes tile row s - 1. Two barriers a step: before the stores (every thread has
    # read the slot they overwrite) and after them. One with one_barrier: a step's stores go
    # where the row computed in the step before last read, behind the last step's barrier
    if prefetch:     # step -1's rows, then each step loads the next step's during its compute
        src("q = r0 - 1")
        src("qin = q >= 0 and q < height")
        stage_loads(x_total, load_x, "p")
        next_rows()
        for i in range(-(-g_total // threads)):
            src(f"u{i} = float32(0)")
    src("for s in range(-1, rows + 1):").indent()
    src("q = r0 + s")
    # ring slots computed unsigned (q + 1 >= 0): signed, each % took six instructions
    src(f"xo = uint64(q + 1) % uint64({ring}) * uint64({XROW})")
    if not one_barrier:
        src("cuda.syncthreads()")
    if prefetch:
        if one_barrier:
            src(f"gbuf = ((s - 1) & 1) * {O * GS}")
        stage_stores(x_total, store_x, "p")
        src("if s >= 1:").indent()
        stage_stores(g_total, store_gy, "u")
        src.dedent()
        src("cuda.syncthreads()")
        src("q = r0 + s + 1")
        src("qin = q >= 0 and q < height and s < rows")
        stage_loads(x_total, load_x, "p")
        src("if s >= 0 and s < rows:").indent()
        stage_loads(g_total, load_gy, "u")
        src.dedent()
        next_rows()
    else:
        src("qin = q >= 0 and q < height")
        stage(x_total, load_x, store_x)
        src("if s >= 1:").indent()
        stage(g_total, load_gy, store_gy)
        src.dedent()
        next_rows()
        src("cuda.syncthreads()")
    src("if s < 1:").indent()("continue").dedent()
    # tile row r = s - 1 reads image rows r0+r-1+ky, ky = 0..2, in slots (r0 + r + ky) % ring;
    # a thread's rows ky0 + k, k < held, are x{k} and its chains a{j}_{k * 3 + kx}
    src("r = s - 1")
    src(f"if tid < {workers}:").indent()
    for k in range(held):
        src(f"x{k} = uint64(ci * {xs_stride}) + "
            f"uint64(r0 + r + {first_row}{k}) % uint64({ring}) * uint64({XROW})")
    src(f"gb = uint64(og * {go * GS}{gy_buffer})")

    def fmas(out, window_column):
        for j in range(go):
            for ky in range(held):
                for kx in range(3):
                    out(f"a{j}_{ky * 3 + kx} = fma(g{j}, w{ky}_{window_column(kx)}, "
                        f"a{j}_{ky * 3 + kx})")

    def chains_rolled():
        for k in range(held):
            src(f"w{k}_0 = xs[x{k}]")
            src(f"w{k}_1 = xs[x{k} + uint64(1)]")
        src("for c in range(cols):").indent()
        for k in range(held):
            src(f"w{k}_2 = xs[x{k} + uint64(c + 2)]")
        for j in range(go):
            src(f"g{j} = gs[gb + uint64({j * GS} + c)]")
        fmas(src, lambda kx: kx)
        for k in range(held):
            src(f"w{k}_0 = w{k}_1")
            src(f"w{k}_1 = w{k}_2")
        src.dedent()

    def chains_unrolled():
        """The full-width row: calls of `columns`, which runs CALL_COLUMNS columns from column
        c on (input column c + kx of the window is w{ky}_{c + kx}), written out; the chains
        and the window's last two columns go from call to call in a tuple."""
        for k in range(held):
            src(f"w{k}_0 = xs[x{k}]")
            src(f"w{k}_1 = xs[x{k} + uint64(1)]")
        chains = [f"a{j}_{k}" for j in range(go) for k in range(3 * held)]
        window = lambda c: [f"w{k}_{c + i}" for k in range(held) for i in range(2)]
        rows = ", ".join(f"x{k}" for k in range(held))
        src(f"state0 = ({', '.join(chains + window(0))},)")
        for c in range(0, TILE_W, CALL_COLUMNS):
            src(f"state{c + CALL_COLUMNS} = columns(xs, gs, {rows}, gb, int64({c}), state{c})")
        src(f"{', '.join(chains)}, = state{TILE_W}[:{len(chains)}]")
        called.device_function("columns", f"xs, gs, {rows}, gb, c, state")
        called(f"{', '.join(chains + window(0))}, = state")
        for c in range(CALL_COLUMNS):
            for k in range(held):
                called(f"w{k}_{c + 2} = xs[x{k} + uint64(c + {c + 2})]")
            for j in range(go):
                called(f"g{j} = gs[gb + uint64(c + {j * GS + c})]")
            fmas(called, lambda kx: c + kx)
        called(f"return ({', '.join(chains + window(CALL_COLUMNS))},)")

    def bias_rolled():
        src("for c in range(cols):").indent()("bias = bias + gs[gb + uint64(c)]").dedent()

    def bias_unrolled():
        for c in range(TILE_W):
            src(f"bias = bias + gs[gb + uint64({c})]")

    def full_width_or_edge(unrolled, rolled):
        if not unroll:
            rolled()
            return
        src(f"if cols == {TILE_W}:").indent()
        unrolled()
        src.dedent()
        src("else:").indent()
        rolled()
        src.dedent()

    full_width_or_edge(chains_unrolled, chains_rolled)
    src.dedent()
    # the bias chains: one thread per output channel among those that otherwise only stage
    bias_threads = f"tid < {workers + O}" + (" and ci_first == 0" if grouped else "")
    src(f"elif {bias_threads}:").indent()
    src(f"gb = uint64((tid - {workers}) * {GS}{gy_buffer})")
    full_width_or_edge(bias_unrolled, bias_rolled)
    src.dedent().dedent()
    src(f"if tid < {workers}:").indent()
    if ragged:
        src(f"if ci_first + ci < {cin}:").indent()
    for j in range(go):
        src(f"o = o_first + og * {go} + {j}" if grouped else f"o = og * {go} + {j}")
        for k in range(3 * held):
            src(f"gw_part[n, t, (o * {cin} + {'ci_first + ' if grouped else ''}ci) * 9 + "
                f"{'ky0 * 3 + ' if split else ''}{k}] = a{j}_{k}")
    src.dedent()
    if ragged:
        src.dedent()
    src(f"if tid >= {workers} and {bias_threads}:").indent()
    src(f"gb_part[n, t, {'o_first + ' if grouped else ''}tid - {workers}] = bias").dedent()
    module = load_module(f"conv_weights_{cin}_{cout}" + ("" if first is None else
                                                          f"_first{first}") +
                         (f"_block{O}x{C}" if grouped else ""), src.text() + called.text())
    return module.kernel, threads


def conv2d_backward_weights(gy, x, out=None, image_sums=None, x2=None):
    """(gw, gb): per-tile float32 chains, folded in float64 per image, then in image order.
    With image_sums (float64 device arrays (N, Co, Ci, 3, 3) and (N, Co)), the per-image sums
    are left there for sum_images() and image_sums is returned. With x2, the input is x's
    channels followed by x2's (their concatenation, not copied)."""
    gy, x = Operand("gy", gy, 4), Operand("x", x, 4)
    n, cout, h, wd = gy.shape
    if x.shape[0] != n or x.shape[2:] != (h, wd):
        raise ValueError(f"gy {gy.shape} and x {x.shape} differ in batch or image size")
    x2, cin = _second_input(x, x2)
    if image_sums is not None:
        sw, sb = (as_device_array(a) for a in image_sums)
        if sw.shape != (n, cout, cin, 3, 3) or sb.shape != (n, cout) or \
                sw.dtype != np.float64 or sb.dtype != np.float64:
            raise ValueError(f"image_sums must be float64 ({n}, {cout}, {cin}, 3, 3) and "
                             f"({n}, {cout}), got {sw.dtype} {sw.shape} and {sb.dtype} {sb.shape}")
    else:
        sw = scratch("gw_image_sums", (n, cout, cin, 3, 3), np.float64)
        sb = scratch("gb_image_sums", (n, cout), np.float64)
    sw = sw.reshape(n, cout * cin * 9)
    th, tw = tile_grid(h, wd)
    gw_part = scratch("gw_part", (n, th * tw, cout * cin * 9), np.float32)
    gb_part = scratch("gb_part", (n, th * tw, cout), np.float32)
    flat = lambda a: a.device.reshape(a.device.size)
    variant = weights_variant(cin, cout)
    block = weights_block(cin, cout, variant)
    kernel, threads = _weights_kernel(cin, cout, variant, None if x2 is None else x.shape[1],
                                      None if block == (cout, cin) else block)
    inputs = (flat(x),) if x2 is None else (flat(x), flat(x2))
    blocks = cout // block[0] * weight_groups(cin, block[1])
    kernel[(th * tw, n, blocks), threads, launch_stream()](flat(gy), *inputs, gw_part, gb_part,
                                                           h, wd, tw)
    fold_tiles((gw_part, sw), (gb_part, sb))
    if image_sums is not None:
        return image_sums
    if out is None:
        gw_op, gw = output("gw", None, (cout, cin, 3, 3), gy)
        gb_op, gb = output("gb", None, (cout,), gy)
    else:
        gw_op, gw = output("out[0]", out[0], (cout, cin, 3, 3), gy)
        gb_op, gb = output("out[1]", out[1], (cout,), gy)
    fold_images(sw, gw.reshape(gw.size))
    fold_images(sb, gb)
    return result(gw_op, gw, gy), result(gb_op, gb, gy)
