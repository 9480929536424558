"""GPU kernels against the reference, bit for bit (simulator at small sizes, GPU at all sizes).

Outputs are poisoned with NaN before each launch, so an element the kernel never wrote fails.
"""
import re

import numpy as np
import pytest
from numba import cuda

from conftest import bits, ident
from contract_loops import fold_tiles_then_images
from cryokern import kernels as K
from cryokern import reference as R
from cryokern.contract import tile_grid
from cryokern.kernels import conv
from cryokern.kernels.arrays import is_device_array

# (N, Cin, Cout, H, W): single pixels, odd shapes, several blocks with edge blocks; for weight
# gradients also several reduction tiles (16 x 64) and the default 1 -> 16 and 16 -> 1 layers
SMALL = [(2, 3, 5, 13, 17), (1, 1, 2, 1, 1), (1, 2, 1, 2, 3), (1, 1, 2, 18, 66)]
SMALL_WEIGHTS = SMALL + [(1, 2, 3, 18, 66), (1, 1, 16, 18, 66), (1, 16, 1, 17, 67)]
# the default network's generated kernels over a few blocks, each block reading its halo
# across a seam from its neighbours: forward 1 -> 16 (blocks of 16 x 32 pixels) and 16 -> 1
# (32 x 32) over 2 x 2 blocks, 16 -> 16 (32 x 32; the simulator's costliest) over two block
# rows, the seam no 8-row geometry had crossed; backward-data (masked, as the step runs it)
# of 16 -> 1 (the kernel 1 -> 16) over 2 x 2 blocks, of 16 -> 16 over two block rows
FORWARD_SEAMS = [(1, 1, 16, 17, 33), (1, 16, 16, 33, 20), (1, 16, 1, 33, 33)]
BACKWARD_SEAMS = [(1, 16, 1, 33, 33), (1, 16, 16, 33, 20)]
# more than 16 output channels, so several blocks of output channels (16 a block; the last
# one part full): forward from one input channel and from two (the 8-row geometry of wider
# layers); backward-data of layers with 17 and 33 input channels
MANY_OUTPUTS_FORWARD = [(1, 1, 17, 5, 7), (1, 1, 33, 5, 7), (1, 2, 17, 5, 7)]
MANY_OUTPUTS_BACKWARD = [(1, 17, 1, 5, 7), (1, 33, 2, 5, 7)]
LARGE = [(4, 16, 16, 1024, 1024), (3, 16, 16, 997, 1013), (2, 1, 16, 256, 256),
         (2, 16, 1, 256, 256)]
# the layers of --channels 1,32,32,1, and odd counts (3 blocks of output channels, the last
# holding one)
LARGE_MANY_OUTPUTS = [(2, 1, 32, 100, 150), (2, 32, 32, 100, 150), (2, 32, 1, 100, 150),
                      (2, 17, 33, 67, 131)]

def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def poisoned(shape):
    return cuda.to_device(np.full(shape, np.nan, np.float32))


def same_bits(got, want):
    got = got.copy_to_host() if is_device_array(got) else np.asarray(got)
    return np.array_equal(bits(got), bits(want))


def cases(gpu_only, small=SMALL, flags=None, small_last_flag=()):
    """Small shapes (simulator and GPU) and large ones (GPU only); with `flags`, every small
    shape runs with each flag, and the large ones and `small_last_flag` with the last flag only
    (the reference, or the simulator, is slow)."""
    if flags is None:
        return [pytest.param(s, id=ident(s)) for s in small] + \
               [pytest.param(s, id=ident(s), marks=pytest.mark.gpu) for s in gpu_only]
    last = lambda s, *marks: pytest.param(s, flags[-1], id=f"{ident(s)}-{flags[-1]}", marks=marks)
    return [pytest.param(s, f, id=f"{ident(s)}-{f}") for s in small for f in flags] + \
           [last(s) for s in small_last_flag] + [last(s, pytest.mark.gpu) for s in gpu_only]


@pytest.mark.parametrize("shape,relu", cases(LARGE + LARGE_MANY_OUTPUTS, flags=[False, True],
                                              small_last_flag=FORWARD_SEAMS +
                                              MANY_OUTPUTS_FORWARD))
def test_forward(rng, shape, relu):
    n, cin, cout, h, w = shape
    x, wt, b = randn(rng, n, cin, h, w), randn(rng, cout, cin, 3, 3), randn(rng, cout)
    out = poisoned((n, cout, h, w))
    K.conv2d_forward(cuda.to_device(x), cuda.to_device(wt), cuda.to_device(b), relu=relu, out=out)
    assert same_bits(out, R.conv2d_forward(x, wt, b, relu=relu))


@pytest.mark.parametrize("shape,masked", cases(LARGE + LARGE_MANY_OUTPUTS, flags=[False, True],
                                                small_last_flag=BACKWARD_SEAMS +
                                                MANY_OUTPUTS_BACKWARD))
def test_backward_data(rng, shape, masked):
    n, cin, cout, h, w = shape
    gy, wt, y = randn(rng, n, cout, h, w), randn(rng, cout, cin, 3, 3), randn(rng, n, cin, h, w)
    mask = y if masked else None
    out = poisoned((n, cin, h, w))
    K.conv2d_backward_data(cuda.to_device(gy), cuda.to_device(wt),
                           relu_output=None if mask is None else cuda.to_device(mask), out=out)
    assert same_bits(out, R.conv2d_backward_data(gy, wt, relu_output=mask))


@pytest.mark.parametrize("shape", cases(LARGE[:1], SMALL[:1] + SMALL[3:]))
def test_backward_data_may_write_over_its_mask(rng, shape):
    """The training step writes each layer's input gradient over its ReLU output."""
    n, cin, cout, h, w = shape
    gy, wt, y = randn(rng, n, cout, h, w), randn(rng, cout, cin, 3, 3), randn(rng, n, cin, h, w)
    want = R.conv2d_backward_data(gy, wt, relu_output=y)
    shared = cuda.to_device(y)
    K.conv2d_backward_data(cuda.to_device(gy), cuda.to_device(wt), relu_output=shared, out=shared)
    assert same_bits(shared, want)
    R.conv2d_backward_data(gy, wt, relu_output=y, out=y)
    assert same_bits(y, want)


# backward-data's mask read in turns (conv._MaskPlan) in layouts no default layer uses: two
# words of bits (9 x 8 outputs a thread, 40 a turn), a last turn only part full (8 outputs, 3 a
# turn), turns that end before the input channels do (4 of 6); one block each
@pytest.mark.parametrize("geometry,shape", [((9, 8, 1), (1, 8, 2, 13, 17)),
                                            ((8, 1, 1), (1, 1, 3, 18, 20)),
                                            ((4, 4, 1), (1, 4, 6, 9, 17))],
                         ids=["two-words", "part-turn", "fewer-turns"])
def test_backward_data_mask_plans(rng, geometry, shape):
    n, cin, cout, h, w = shape
    gy, wt, y = randn(rng, n, cout, h, w), randn(rng, cout, cin, 3, 3), randn(rng, n, cin, h, w)
    y[0, 0, 0, :4] = [np.nan, -0.0, 0.0, np.inf]
    out = poisoned((n, cin, h, w))
    conv._launch_forward(cuda.to_device(gy), cuda.to_device(wt),
                         cuda.to_device(np.zeros(cin, np.float32)), out, False,
                         cuda.to_device(y), True, geometry=geometry)
    assert same_bits(out, R.conv2d_backward_data(gy, wt, relu_output=y))


def test_backward_data_mask_past_the_last_channel(rng):
    """In a block whose channels overhang the layer's (17 = 16 + 1), the mask is loaded
    through selects (codegen.select_load): the channels past the last read element 0 instead
    (the simulator raises on a read past the array) and drop it; special values in the last
    channel, at the image's last row and column, decide as the reference does."""
    n, cin, cout, h, w = 1, 17, 2, 9, 33
    gy, wt, y = randn(rng, n, cout, h, w), randn(rng, cout, cin, 3, 3), randn(rng, n, cin, h, w)
    y[0, 16, -1, -4:] = [np.nan, -0.0, 0.0, np.inf]
    y[0, 16, :4, -1] = [np.nan, -0.0, 0.0, np.inf]
    y[0, 0, 0, 0] = np.nan          # element 0, which the overhanging channels' selects read
    out = poisoned((n, cin, h, w))
    K.conv2d_backward_data(cuda.to_device(gy), cuda.to_device(wt), relu_output=cuda.to_device(y),
                           out=out)
    assert same_bits(out, R.conv2d_backward_data(gy, wt, relu_output=y))


def test_written_out_kernels_branch_little():
    """Branches per mask element and per output (287 in backward-data 1 -> 16) made numba's
    front end take most of a cold start (bench/compile_time.py, NOTES v28): backward-data
    now loads its mask a row at a time and sets and applies its bits with selects (103 left,
    64 of them the stores' channel guards). The written-out fmas are calls of a device
    function that numba compiles once (codegen.Source.device_function): the weight
    gradients' tile row CALL_COLUMNS columns a call, forward's and backward-data's input
    channel a kernel row a call."""
    import inspect
    source = inspect.getsource(conv._forward_kernel(1, 16, False, True, True)[0].py_func)
    assert source.count("if ") < 120
    assert not [line for line in source.splitlines() if "mask[" in line and " if " in line]
    assert source.count("= taps(") == 3 and "fma(" not in source
    weights = inspect.getsource(conv._weights_kernel(16, 16, conv.weights_variant(16, 16))[0]
                                .py_func)
    # the chains' test and the bias chains' test; the full-width row in calls
    assert weights.count(f"if cols == {conv.TILE_W}:") == 2
    assert weights.count("= columns(") == conv.TILE_W // conv.CALL_COLUMNS


@pytest.mark.parametrize("shape", cases(LARGE + LARGE_MANY_OUTPUTS, SMALL_WEIGHTS))
def test_backward_weights(rng, shape):
    n, cin, cout, h, w = shape
    gy, x = randn(rng, n, cout, h, w), randn(rng, n, cin, h, w)
    gw, gb = poisoned((cout, cin, 3, 3)), poisoned((cout,))
    K.conv2d_backward_weights(cuda.to_device(gy), cuda.to_device(x), out=(gw, gb))
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    assert same_bits(gw, want_gw) and same_bits(gb, want_gb)


# the weight-gradient kernels as conv2d_backward_weights builds them, their partials folded
# on the host (in the simulator, folding 16 x 16 x 9 outputs costs more than the kernel):
# 16 -> 16 over edge tiles of two images, and over two full-width tiles (the written-out
# branch) between edge columns; 17 and 33 output channels
@pytest.mark.parametrize("shape", [(2, 16, 16, 13, 17), (1, 16, 16, 2, 130), (1, 2, 17, 5, 7),
                                   (1, 2, 33, 18, 66)], ids=ident)
def test_backward_weights_kernels(rng, shape):
    check_weights_variant(rng, shape, conv.weights_variant(*shape[1:3]))


# ways of building the weight-gradient kernel (conv.WeightsVariant) that no default layer uses:
# without prefetch (addresses computed per row, or precomputed), rolled rows, kernel rows on
# threads of their own or not; the shapes have full-width and edge tiles
WEIGHTS_VARIANTS = [conv.WeightsVariant(32, None, False, True, False),
                    conv.WeightsVariant(128, None, True, True, False),
                    conv.WeightsVariant(128, None, True, False, False),
                    conv.WeightsVariant(64, None, False, False, True),
                    conv.WeightsVariant(64, None, False, True, True, False),
                    conv.WeightsVariant(64, None, True, True, True, True),
                    conv.WeightsVariant(32, None, False, False, False, True)]


@pytest.mark.parametrize("variant", WEIGHTS_VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("shape", [(1, 16, 1, 17, 67), (1, 2, 3, 18, 66)], ids=ident)
def test_backward_weights_variants(rng, shape, variant):
    check_weights_variant(rng, shape, variant)


@pytest.mark.parametrize("outputs", [2, 3, 6])
def test_backward_weights_outputs_per_thread(rng, outputs):
    """Output channels per chain-holding thread other than the automatic 4 or 1."""
    check_weights_variant(rng, (1, 4, 6, 18, 66),
                          conv.WeightsVariant(128, None, True, True, True, outputs=outputs))


def test_backward_weights_outputs_must_divide_cout():
    with pytest.raises(ValueError, match="do not divide"):
        conv._weights_kernel(4, 6, conv.WeightsVariant(128, None, True, True, True, outputs=4))


# Weight gradients of wide layers (conv.weights_block): a block holds the chains of a group of
# output channels and a group of input channels, grid dimension z numbering the groups. In
# the simulator, blocks are forced small by lowering the shared-memory limit; the chains, and
# so the bits, are those of one block holding all.
@pytest.mark.parametrize("variant, block, first, w", [
    (conv.WeightsVariant(128, None, True, True, True, outputs=4), (8, 2), 3, 66),  # 4 a thread,
    (conv.WeightsVariant(32, None, False, True, False), (8, 3), None, 66),  # input groups across
    (conv.WeightsVariant(64, None, False, True, True, True), (4, 3), None, 7),  # x and x2; ...
    (conv.WeightsVariant(128, None, True, True, True, outputs=4), (8, 4), 3, 66),  # kernel rows
    (conv.WeightsVariant(32, None, False, True, False), (16, 5), None, 66),        # split; ...
    (conv.WeightsVariant(64, None, False, True, True, True), (4, 4), None, 7)],    # groups of 4
    ids=["outputs4-two-inputs", "rolled-addresses", "split-rows",                  # and 2, of
         "ragged-two-inputs", "ragged-rolled-addresses", "ragged-split-rows"])     # 5 and 1
def test_backward_weights_blocks_of_channels(rng, variant, block, first, w):
    """Blocks of 8 x 2, 8 x 3 and 4 x 3 of 16 x 6 channels, and input groups that do not
    divide the 6 (4 then 2, 5 then 1: the last group's missing channels store nothing); width
    66: a full-width tile (the written-out rows) and an edge tile."""
    n, cin, cout, h = 2, 6, 16, 2
    gy, x = randn(rng, n, cout, h, w), randn(rng, n, cin, h, w)
    th, tw = tile_grid(h, w)
    gw, gb = poisoned((n, th * tw, cout * cin * 9)), poisoned((n, th * tw, cout))
    kernel, threads = conv._weights_kernel(cin, cout, variant, first, block)
    inputs = [x] if first is None else [x[:, :first], x[:, first:]]
    blocks = cout // block[0] * conv.weight_groups(cin, block[1])
    kernel[(th * tw, n, blocks), threads](cuda.to_device(gy.ravel()),
                                          *(cuda.to_device(a.ravel()) for a in inputs),
                                          gw, gb, h, w, tw)
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    got_gw = np.float32(fold_tiles_then_images(gw.copy_to_host())).reshape(want_gw.shape)
    got_gb = np.float32(fold_tiles_then_images(gb.copy_to_host()))
    assert same_bits(got_gw, want_gw) and same_bits(got_gb, want_gb)


def test_backward_weights_in_blocks_of_channels_equal_reference(rng, monkeypatch):
    """conv2d_backward_weights where one block cannot hold the layer (here: shared memory
    lowered to 1500 bytes, so 2 output x 1 input channels a block, 4 blocks a tile), of a
    concatenation; the block stages its rows behind two barriers a row (the second buffers of
    one barrier do not fit), where the tests above take one."""
    monkeypatch.setattr(conv, "STATIC_SHARED_BYTES", 1500)
    n, cin, cout, h, w = 2, 2, 4, 3, 5
    variant = conv.weights_variant(cin, cout)
    assert conv.weights_block(cin, cout, variant) == (2, 1)
    assert not conv.weights_one_barrier(variant, 2, 1)
    gy, x = randn(rng, n, cout, h, w), randn(rng, n, cin, h, w)
    gw, gb = poisoned((cout, cin, 3, 3)), poisoned((cout,))
    K.conv2d_backward_weights(cuda.to_device(gy), cuda.to_device(x[:, :1].copy()),
                              out=(gw, gb), x2=cuda.to_device(x[:, 1:].copy()))
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    assert same_bits(gw, want_gw) and same_bits(gb, want_gb)


def test_the_blocks_of_the_hot_weight_kernels_stage_behind_one_barrier_a_row():
    """The seed's 16 -> 16 and the 48-wide U-Net's 48 -> 48 (its block of 48 x 16 channels)
    have the shared memory for the second buffers (and the tests above run such blocks)."""
    for cin, cout in [(16, 16), (48, 48)]:
        variant = conv.weights_variant(cin, cout)
        assert conv.weights_one_barrier(variant, *conv.weights_block(cin, cout, variant))


def test_weights_blocks_fit_a_block_and_keep_the_default_layers_whole():
    """Every layer up to 256 -> 256 channels gets blocks that fit the GPU's limits (threads,
    registers at the cap, static shared memory) and tile its channels; the default network's
    layers and --channels 1,32,32,1's stay one block (their generated kernels unchanged)."""
    for cin, cout in [(1, 16), (16, 16), (16, 1), (1, 32), (32, 32), (32, 1)]:
        assert conv.weights_block(cin, cout, conv.weights_variant(cin, cout)) == (cout, cin)
    widths = sorted({1, 2, 3, 16, 17, 33, 48, 64, 96, 97, 128, 144, 192, 251, 256})
    for cin in widths:
        for cout in widths:
            variant = conv.weights_variant(cin, cout)
            o, c = conv.weights_block(cin, cout, variant)
            threads, shared = conv._weights_block_needs(cin, cout, variant, o, c)
            cap = variant.max_registers or conv.UNCAPPED_REGISTERS
            assert cout % o == 0 and 0 < c <= cin
            assert threads <= 1024 and threads * cap <= 65536 and shared <= 48 * 1024


def test_weights_blocks_of_a_prime_channel_count_hold_many_channels():
    """The Noise2Noise U-Net's 96 + 1 -> 64: 97 is prime, so groups that divide it held one
    input channel a block; equal groups of 25 (the last 22) hold them in 4 blocks. Layers whose
    dividing groups hold at least half as many chains keep them (64 -> 64, 64 -> 128); the
    measured blocks of TUNED_WEIGHT_BLOCKS (two outputs a thread: 97 -> 64 in groups of 14,
    48 -> 48 of 16) where they fit."""
    rule = conv.WeightsVariant(128, 128, True, True, True)
    assert conv.weights_block(97, 64, rule) == (64, 25)
    assert conv.weights_block(64, 64, conv.weights_variant(64, 64)) == (32, 32)
    assert conv.weights_block(64, 128, conv.weights_variant(64, 128)) == (32, 32)
    for (cin, cout), (outputs, block) in conv.TUNED_WEIGHT_BLOCKS.items():
        variant = conv.weights_variant(cin, cout)
        assert conv._outputs_per_thread(cin, cout, variant) == outputs
        assert conv.weights_block(cin, cout, variant) == block
    assert conv.weights_block(97, 64, conv.weights_variant(97, 64)) == (64, 14)


def test_weights_block_must_tile_the_channels():
    with pytest.raises(ValueError, match="do not tile"):
        conv._weights_kernel(4, 8, conv.weights_variant(4, 8), None, (3, 4))
    with pytest.raises(ValueError, match="do not tile"):
        conv._weights_kernel(4, 8, conv.weights_variant(4, 8), None, (8, 5))


# the U-Net's wide layers, whose weight gradients one block could not hold (48 -> 48: 624
# threads at 128 registers; the concatenation's 96 -> 48: 1,216 threads), and wider ones,
# whose forward or backward-data blocks stage their weights in groups of channels (from 78
# input channels forward, 78 output channels backward-data: 96 + 1 -> 64 forward in groups of
# 49, 64 -> 192 backward-data in groups of 64, 256 -> 256 both in groups of 64)
# (N, Cin, Cout, H, W, and Ca: the input a concatenation of Ca and Cin - Ca channels, or None)
WIDE = [(1, 48, 48, 18, 66, None), (2, 96, 48, 17, 67, 48), (1, 64, 128, 18, 66, None),
        (1, 144, 96, 18, 66, None), (1, 256, 256, 5, 7, None), (1, 97, 64, 18, 66, 96),
        (1, 64, 192, 17, 67, None)]
wide_cases = pytest.mark.parametrize("shape", [
    pytest.param(s, id=ident(s[:5]) + ("" if s[5] is None else f"-cat{s[5]}"),
                 marks=pytest.mark.gpu) for s in WIDE])


def wide_inputs(rng, shape):
    """x, and the kernels' x (and x2) arguments for it."""
    n, cin, _, h, w, ca = shape
    x = randn(rng, n, cin, h, w)
    if ca is None:
        return x, cuda.to_device(x), {}
    return x, cuda.to_device(x[:, :ca].copy()), {"x2": cuda.to_device(x[:, ca:].copy())}


@wide_cases
def test_wide_layers_weight_gradients(rng, shape):
    n, cin, cout, h, w, _ = shape
    x, x_first, x2 = wide_inputs(rng, shape)
    gy = randn(rng, n, cout, h, w)
    gw, gbias = poisoned((cout, cin, 3, 3)), poisoned((cout,))
    K.conv2d_backward_weights(cuda.to_device(gy), x_first, out=(gw, gbias), **x2)
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    assert same_bits(gw, want_gw) and same_bits(gbias, want_gb)


@wide_cases
def test_wide_layers_forward_and_backward_data(rng, shape):
    """Forward with ReLU, backward-data with its mask, and of a concatenation backward-data
    into the two parts."""
    n, cin, cout, h, w, ca = shape
    x, x_first, x2 = wide_inputs(rng, shape)
    wt, b, gy = randn(rng, cout, cin, 3, 3), randn(rng, cout), randn(rng, n, cout, h, w)
    y = poisoned((n, cout, h, w))
    K.conv2d_forward(x_first, cuda.to_device(wt), cuda.to_device(b), relu=True, out=y, **x2)
    assert same_bits(y, R.conv2d_forward(x, wt, b, relu=True))
    gx, active = poisoned((n, cin, h, w)), np.maximum(x, np.float32(0))   # a ReLU's output
    K.conv2d_backward_data(cuda.to_device(gy), cuda.to_device(wt),
                           relu_output=cuda.to_device(active), out=gx)
    assert same_bits(gx, R.conv2d_backward_data(gy, wt, relu_output=active))
    if ca is not None:
        parts = poisoned((n, ca, h, w)), poisoned((n, cin - ca, h, w))
        K.conv2d_backward_data(cuda.to_device(gy), cuda.to_device(wt), out=parts, split=ca)
        want = R.conv2d_backward_data(gy, wt)
        assert same_bits(parts[0], want[:, :ca]) and same_bits(parts[1], want[:, ca:])


# Forward and backward-data blocks stage their weights in shared memory: all input channels' at
# once where they fit the 48 KB a static declaration may hold, else in groups of input channels
# (conv.forward_channel_group). Before groups, every layer with 78 or more input channels (16
# output channels a block; backward-data: 78 or more output channels) declared more.
def forward_geometries():
    """Every geometry forward_variant gives a layer of 1..512 channels on each side."""
    return {conv.forward_variant(cin, cout, transposed, masked)[0]
            for cin in (1, 2) for cout in range(1, 513)
            for transposed in (False, True) for masked in (False, True)}


def test_kernels_staging_weights_in_groups_are_capped_at_128_registers():
    """Uncapped, ptxas gave them ~167 registers (one block per SM); the kernels whose weights
    fit at once keep their measured caps (48 -> 48 forward uncapped at 128 registers)."""
    for cin, cout, transposed, masked in [(96, 96, False, False), (78, 48, False, False),
                                          (96, 192, True, False)]:
        geometry, cap = conv.forward_variant(cin, cout, transposed, masked)
        assert conv.staged_in_groups(cin, geometry) and cap == 128
    assert conv.forward_variant(48, 48, False, False)[1] is None
    assert conv.forward_variant(77, 48, False, False)[1] is None


def test_forward_blocks_stay_within_static_shared_memory():
    """For every layer of 1..512 channels on each side (forward and backward-data, masked or
    not), the block's static shared memory fits 48 KB; the layers that fit whole keep every
    channel in one group (their kernels unchanged), the others take the fewest groups."""
    limit = 48 * 1024
    geometries = forward_geometries()
    assert {(8, 8, 2), (4, 16, 1), (8, 1, 1)} <= geometries    # wide, from 1 channel, to 1
    for geometry in geometries:
        for cin in range(1, 513):
            windows = conv.input_windows(cin, geometry, None)
            group = conv.forward_channel_group(cin, geometry, windows)
            assert 0 < group <= cin
            assert conv.forward_shared_bytes(geometry, group, windows) <= limit
            if conv.forward_shared_bytes(geometry, cin, windows) <= limit:
                assert group == cin
            else:
                fewer = -(-cin // (-(-cin // group) - 1))     # one group less
                assert conv.forward_shared_bytes(geometry, fewer, windows) > limit
    wide = (8, 8, 2)                                # 16 output channels a block
    assert conv.forward_channel_group(77, wide, 1) == 77
    assert conv.forward_channel_group(69, wide, 2) == 69        # beside two windows
    assert [conv.input_windows(c, wide, None) for c in (1, 16, 77, 78)] == [1, 1, 1, 2]
    assert conv.input_windows(16, wide, 8) == 2                 # over a concatenation
    assert [conv.forward_channel_group(c, wide, conv.input_windows(c, wide, None))
            for c in (78, 96, 97, 144, 192, 512)] == [39, 48, 49, 48, 64, 64]


def declared_shared_bytes(kernel):
    """Bytes of the float32 shared arrays a generated kernel's source declares."""
    with open(kernel.py_func.__code__.co_filename) as f:
        sizes = re.findall(r"cuda\.shared\.array\((\d+), float32\)", f.read())
    return 4 * sum(map(int, sizes))


@pytest.mark.parametrize("cin, cout, masked, transposed, first", [
    (16, 16, False, False, None), (77, 16, False, False, None), (78, 16, False, False, None),
    (97, 64, False, False, 96), (144, 96, False, False, None), (96, 144, True, True, None),
    (96, 144, False, True, 48), (512, 16, False, False, None)],
    ids=["16-16", "77-16", "78-16", "96+1-64", "144-96", "backward-data-144-96",
         "backward-data-48+96-96", "512-16"])
def test_forward_kernels_declare_the_shared_memory_of_the_rule(cin, cout, masked, transposed,
                                                               first):
    """The generated source declares what forward_shared_bytes counts (no compilation)."""
    kernel = conv._forward_kernel(cin, cout, False, masked, transposed, first=first)[0]
    geometry = conv.forward_variant(cin, cout, transposed, masked)[0]
    windows = conv.input_windows(cin, geometry, first)
    group = conv.forward_channel_group(cin, geometry, windows)
    want = conv.forward_shared_bytes(geometry, group, windows)
    assert declared_shared_bytes(kernel) == want <= 48 * 1024


def test_a_forward_block_that_cannot_stage_its_weights_is_refused():
    """A geometry whose input window alone passes 48 KB, and a group larger than fits."""
    with pytest.raises(ValueError, match="cannot stage one input channel"):
        conv._forward_kernel(4, 4, False, False, False, geometry=(96, 1, 1))
    with pytest.raises(ValueError, match="cannot stage the weights of 78 input channels"):
        conv._forward_kernel(78, 16, False, False, False, channel_group=78)


# In the simulator, groups cut small: a channel count crossing a group boundary, a last group
# part full, the mask read in turns across groups, two inputs and two outputs
def test_forward_in_groups_of_input_channels_at_the_shared_memory_limit(rng):
    """A geometry of 64 output channels a block holds 20 input channels' weights in 48 KB: 21
    input channels (x's 5 and x2's 16) go in groups of 11 and 10, as the rule makes them."""
    geometry = (1, 64, 1)
    assert conv.forward_channel_group(21, geometry, conv.input_windows(21, geometry, 5)) == 11
    n, ca, cin, cout, h, w = 1, 5, 21, 3, 3, 4
    x, wt, b = randn(rng, n, cin, h, w), randn(rng, cout, cin, 3, 3), randn(rng, cout)
    y = poisoned((n, cout, h, w))
    conv._launch_forward(cuda.to_device(x[:, :ca].copy()), cuda.to_device(wt),
                         cuda.to_device(b), y, False, None, False, leaky_slope=np.float32(0.1),
                         x2=cuda.to_device(x[:, ca:].copy()), geometry=geometry)
    assert same_bits(y, R.conv2d_forward(x, wt, b, leaky_slope=0.1))


@pytest.mark.parametrize("split", [None, 2], ids=["masked", "split"])
def test_backward_data_in_groups_of_channels(rng, split):
    """Backward-data of a 3 -> 5 layer staging 2 of its 5 output channels' weights at a time
    (groups 2, 2, 1): with the LeakyReLU mask, read in turns (8 x 3 outputs a thread, 6 a
    turn, in 4 of the 5 channel turns), or split into two outputs (the gradient of a
    concatenation)."""
    n, cin, cout, h, w = 1, 3, 5, 9, 6
    gy, wt, y = randn(rng, n, cout, h, w), randn(rng, cout, cin, 3, 3), randn(rng, n, cin, h, w)
    y[0, 0, 0, :3] = [np.nan, -0.0, 0.0]
    zero = cuda.to_device(np.zeros(cin, np.float32))
    if split is None:
        out = poisoned((n, cin, h, w))
        conv._launch_forward(cuda.to_device(gy), cuda.to_device(wt), zero, out, False,
                             cuda.to_device(y), True, leaky_slope=np.float32(0.1),
                             channel_group=2)
        assert same_bits(out, R.conv2d_backward_data(gy, wt, relu_output=y, leaky_slope=0.1))
        return
    out, out2 = poisoned((n, split, h, w)), poisoned((n, cin - split, h, w))
    conv._launch_forward(cuda.to_device(gy), cuda.to_device(wt), zero, out, False, None, True,
                         y2=out2, channel_group=2)
    want = R.conv2d_backward_data(gy, wt)
    assert same_bits(out, want[:, :split]) and same_bits(out2, want[:, split:])


# conv._forward_kernel's opt-in early_loads (the next input channel's window loaded without a
# branch, NOTES v34): over 1 x 2 blocks (2 rows x 4 channels a thread: blocks of 8 x 32 pixels,
# a window of 3 staging slots, the last part full), two blocks of output channels (the last
# overhanging the layer's 5), weights staged in groups of 2 of the 5 input channels; forward
# with LeakyReLU from one array and from a concatenation (2 + 3 channels, a group across the
# seam), backward-data with the LeakyReLU mask; and THE variant's geometry (8, 16, 1), one block
@pytest.mark.parametrize("case", ["forward", "concatenation", "backward-data", "8x16x1"])
def test_forward_early_loads(rng, case):
    geometry, channel_group = ((8, 16, 1), None) if case == "8x16x1" else ((2, 4, 1), 2)
    n, cin, cout, h, w = (1, 2, 3, 5, 7) if case == "8x16x1" else (1, 5, 5, 7, 33)
    variant = dict(geometry=geometry, channel_group=channel_group, early_loads=True)
    slope = np.float32(0.1)
    if case == "backward-data":
        gy, wt, y = randn(rng, n, cout, h, w), randn(rng, cout, cin, 3, 3), randn(rng, n, cin, h, w)
        y[0, 0, 0, :3] = [np.nan, -0.0, 0.0]
        out = poisoned((n, cin, h, w))
        conv._launch_forward(cuda.to_device(gy), cuda.to_device(wt),
                             cuda.to_device(np.zeros(cin, np.float32)), out, False,
                             cuda.to_device(y), True, leaky_slope=slope, **variant)
        assert same_bits(out, R.conv2d_backward_data(gy, wt, relu_output=y, leaky_slope=0.1))
        return
    x, wt, b = randn(rng, n, cin, h, w), randn(rng, cout, cin, 3, 3), randn(rng, cout)
    y = poisoned((n, cout, h, w))
    two = case == "concatenation"
    conv._launch_forward(cuda.to_device(x[:, :2].copy() if two else x), cuda.to_device(wt),
                         cuda.to_device(b), y, False, None, False, leaky_slope=slope,
                         x2=cuda.to_device(x[:, 2:].copy()) if two else None, **variant)
    assert same_bits(y, R.conv2d_forward(x, wt, b, leaky_slope=0.1))


def check_weights_variant(rng, shape, variant):
    n, cin, cout, h, w = shape
    gy, x = randn(rng, n, cout, h, w), randn(rng, n, cin, h, w)
    th, tw = tile_grid(h, w)
    gw, gb = poisoned((n, th * tw, cout * cin * 9)), poisoned((n, th * tw, cout))
    kernel, threads = conv._weights_kernel(cin, cout, variant)
    kernel[(th * tw, n), threads](cuda.to_device(gy.ravel()), cuda.to_device(x.ravel()), gw, gb,
                                  h, w, tw)
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    got_gw = np.float32(fold_tiles_then_images(gw.copy_to_host())).reshape(want_gw.shape)
    got_gb = np.float32(fold_tiles_then_images(gb.copy_to_host()))
    assert same_bits(got_gw, want_gw) and same_bits(got_gb, want_gb)


# planes of 3 x 3 tiles, edge tiles among them, in three channels; and of 5 tiles across, three
# items of one band (two tiles a warp), the last holding one partial tile
LOSS_SMALL = SMALL + [(2, 3, 1, 35, 130), (1, 2, 1, 33, 300)]


@pytest.mark.parametrize("shape", cases([(4, 1, 1, 1024, 1024), (3, 1, 1, 997, 1013)],
                                        LOSS_SMALL))
def test_loss_and_grad(rng, shape):
    n, c, _, h, w = shape
    pred, target = randn(rng, n, c, h, w), randn(rng, n, c, h, w)
    out = poisoned(pred.shape)
    sse, g = K.mse_loss_and_grad(cuda.to_device(pred), cuda.to_device(target), pred.size, out=out)
    want_sse, count = R.mse_loss(pred, target)
    assert sse == want_sse and count == pred.size
    assert same_bits(out, R.mse_grad(pred, target, count))
    assert K.mse_loss(pred, target) == (want_sse, count)
    assert same_bits(K.mse_grad(pred, target, count), R.mse_grad(pred, target, count))


@pytest.mark.parametrize("shape", cases([(4, 1, 1, 1024, 1024)], [(2, 1, 1, 20, 70)]))
def test_loss_gradient_may_write_over_the_prediction(rng, shape):
    """The training step writes the loss gradient over the network's output."""
    n, c, _, h, w = shape
    pred, target = randn(rng, n, c, h, w), randn(rng, n, c, h, w)
    want_sse, count = R.mse_loss(pred, target)
    want = R.mse_grad(pred, target, count)
    shared = cuda.to_device(pred)
    sse, _ = K.mse_loss_and_grad(shared, cuda.to_device(target), count, out=shared)
    assert sse == want_sse and same_bits(shared, want)
    sse, _ = R.mse_loss_and_grad(pred, target, count, out=pred)
    assert sse == want_sse and same_bits(pred, want)


@pytest.mark.parametrize("shape", cases([(4, 1, 1, 1024, 1024)], [(2, 1, 1, 20, 70),
                                                                   (2, 3, 1, 35, 130)]))
def test_loss_may_stay_on_the_device(rng, shape):
    """With image_sums the float64 sums stay on the device; sum_images folds them into a
    device scalar: the SSE, never returned to the host, as the training step uses it."""
    n, c, _, h, w = shape
    pred, target = randn(rng, n, c, h, w), randn(rng, n, c, h, w)
    want_sse, count = R.mse_loss(pred, target)
    sums, total = cuda.device_array(n, np.float64), cuda.device_array(1, np.float64)
    got, _ = K.mse_loss_and_grad(cuda.to_device(pred), cuda.to_device(target), count,
                                 image_sums=sums)
    assert got is sums and K.sum_images(sums, total) is total
    assert total.copy_to_host()[0] == want_sse
    host_sums, host_total = np.zeros(n), np.zeros(1)
    got, _ = R.mse_loss_and_grad(pred, target, count, image_sums=host_sums)
    assert got is host_sums and R.sum_images(host_sums, host_total)[0] == want_sse


def test_loss_refuses_bad_image_sums_before_writing_over_the_prediction(rng):
    pred, target = randn(rng, 2, 1, 20, 70), randn(rng, 2, 1, 20, 70)
    shared = cuda.to_device(pred)
    with pytest.raises(ValueError, match="image_sums must be float64"):
        K.mse_loss_and_grad(shared, cuda.to_device(target), pred.size, out=shared,
                            image_sums=cuda.device_array(3, np.float64))
    assert same_bits(shared, pred)
    kept = pred.copy()
    with pytest.raises(ValueError):
        R.mse_loss_and_grad(kept, target, pred.size, out=kept, image_sums=np.zeros(3))
    assert same_bits(kept, pred)


@pytest.mark.parametrize("shape", cases([(4, 16, 16, 1024, 1024)], [(3, 2, 3, 20, 70)]))
def test_per_image_sums_in_two_calls_equal_one_call(rng, shape):
    """image_sums leaves each image's float64 sums; sum_images over them gives the bits of a
    whole-batch call (a batch run in passes of fewer images)."""
    n, ci, co, h, w = shape
    gy, x = randn(rng, n, co, h, w), randn(rng, n, ci, h, w)
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    sw = cuda.device_array((n, co, ci, 3, 3), np.float64)
    sb = cuda.device_array((n, co), np.float64)
    for a, b in ((0, 1), (1, n)):
        K.conv2d_backward_weights(cuda.to_device(gy[a:b]), cuda.to_device(x[a:b]),
                                  image_sums=(sw[a:b], sb[a:b]))
    gw, gb = cuda.device_array((co, ci, 3, 3), np.float32), cuda.device_array(co, np.float32)
    assert K.sum_images(sw, gw) is gw and K.sum_images(sb, gb) is gb
    assert same_bits(gw, want_gw) and same_bits(gb, want_gb)
    pred, target = np.ascontiguousarray(gy[:, :1]), np.ascontiguousarray(x[:, :1])
    want_sse, count = R.mse_loss(pred, target)
    sums = cuda.device_array(n, np.float64)
    for a, b in ((0, 1), (1, n)):
        K.mse_loss_and_grad(cuda.to_device(pred[a:b]), cuda.to_device(target[a:b]), count,
                            image_sums=sums[a:b])
    total = cuda.device_array(1, np.float64)
    K.sum_images(sums, total)
    assert total.copy_to_host()[0] == want_sse
    ref_sums = np.zeros(n)
    R.mse_loss_and_grad(pred, target, count, image_sums=ref_sums)
    assert np.array_equal(bits(ref_sums, np.float64), bits(sums.copy_to_host(), np.float64))
    assert R.sum_images(ref_sums, np.zeros(1))[0] == want_sse


def test_relu_backward(rng):
    gy, y = randn(rng, 2, 3, 5, 7), randn(rng, 2, 3, 5, 7)
    y[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    assert same_bits(K.relu_backward(gy, y), R.relu_backward(gy, y))


@pytest.mark.parametrize("momentum,wd,nesterov", [(0.0, 0.0, False), (0.9, 1e-2, False),
                                                  (0.9, 1e-2, True)])
def test_sgd(rng, momentum, wd, nesterov):
    w, v = randn(rng, 300), randn(rng, 300)
    gw, gv = w.copy(), v.copy()
    for _ in range(2):
        g = randn(rng, 300)
        R.sgd_update(w, g, v, 0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        K.sgd_update(gw, g, gv, 0.05, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        assert same_bits(gw, w) and same_bits(gv, v)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam(rng, wd):
    w = randn(rng, 300)
    m, v = np.zeros(300, np.float32), np.zeros(300, np.float32)
    dw, dm, dv = (cuda.to_device(a) for a in (w, m, v))
    for step in range(1, 4):
        g = randn(rng, 300)
        R.adam_update(w, g, m, v, step, 1e-3, weight_decay=wd)
        K.adam_update(dw, cuda.to_device(g), dm, dv, step, 1e-3, weight_decay=wd)
        assert same_bits(dw, w) and same_bits(dm, m) and same_bits(dv, v)


def test_returns_the_kind_it_was_given(rng):
    x, wt, b = randn(rng, 1, 2, 4, 5), randn(rng, 3, 2, 3, 3), randn(rng, 3)
    assert isinstance(K.conv2d_forward(x, wt, b), np.ndarray)
    assert is_device_array(K.conv2d_forward(cuda.to_device(x), wt, b))


def test_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="x must be a float32"):
        K.conv2d_forward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3), np.float32),
                         np.zeros(1, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["forward", "backward_data", "backward_weights", "loss"])
def test_deterministic(rng, kernel):
    """The same inputs twice give the same bits: no race, no order that depends on timing."""
    gy, x = (cuda.to_device(randn(rng, 4, 16, 1024, 1024)) for _ in range(2))
    wt, b = cuda.to_device(randn(rng, 16, 16, 3, 3)), cuda.to_device(randn(rng, 16))
    run = {"forward": lambda: K.conv2d_forward(x, wt, b, relu=True).copy_to_host(),
           "backward_data": lambda: K.conv2d_backward_data(gy, wt, relu_output=x).copy_to_host(),
           "backward_weights": lambda: np.concatenate(
               [a.copy_to_host().ravel() for a in K.conv2d_backward_weights(gy, x)]),
           "loss": lambda: np.array([K.mse_loss(gy, x)[0]], np.float64)}[kernel]
    first = run()
    assert all(np.array_equal(np.asarray(first).view(np.uint8), np.asarray(run()).view(np.uint8))
               for _ in range(3))
