"""The parity tests catch the bugs they exist for: each test here plants one (a fold in the wrong
order, a tile dropped, a block seam read wrong) into the kernels' generated source or the
reference, runs the tests meant to catch it in-process, as pytest runs them (same data), and
asserts that they fail; and that the data the suite used before (standard-normal partials,
single-block shapes, at most 16 output channels) gives the same verdict with and without the
bug, so could not have caught it.

Simulator only: on a GPU every mutant would compile for minutes, and what is tested here is
the tests.
"""
import re
import zlib

import numpy as np
import pytest

import test_fold_order as folds
import test_kernels as kernel_tests
import test_unet_ops as unet_ops
from conftest import REAL_GPU, bits, ident
from fold_data import left_fold, pairwise_fold
from cryokern import reference as R
from cryokern.kernels import codegen, conv, phase_conv, reduce
from cryokern.reference import conv as reference_conv
from cryokern.reference import loss as reference_loss
from cryokern.reference import reduce as reference_reduce

pytestmark = pytest.mark.skipif(REAL_GPU, reason="mutants run in the simulator only")


def verdict(test, node, *args):
    """'passed' or 'failed': `test` run as pytest runs tests/<node> (the same rng seed)."""
    rng = np.random.default_rng(zlib.crc32(f"tests/{node}".encode()))
    try:
        test(rng, *args)
    except AssertionError:
        return "failed"
    return "passed"


@pytest.fixture
def mutate_kernels(monkeypatch, tmp_path):
    """mutate_kernels(edit): every kernel generated from now on (convolutions, folds) is
    `edit(source)`; kernel caches are cleared before and after (the mutants' files go to
    tmp_path, not the user's cache)."""
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))

    def install(edit):
        for module in (conv, reduce, phase_conv):
            real = module.load_module
            monkeypatch.setattr(module, "load_module",
                                lambda name, source, real=real: real(name, edit(source)))
        codegen.forget_generated()
    yield install
    monkeypatch.undo()
    codegen.forget_generated()


def old_fold_tiles_test(rng, shape):
    """test_kernels.test_fold_tiles as it was: standard-normal partials, tile 0 of output 0
    -0.0 (so a one-output case is -0.0 throughout)."""
    partials = rng.standard_normal(shape).astype(np.float32)
    partials[0, :, 0] = -0.0
    got, = folds.fold_on_device(partials)
    assert np.signbit(got[0, 0])
    assert np.array_equal(bits(got, np.float64), bits(left_fold(partials, 1), np.float64))


OLD_FOLD_SHAPES = [(2, 600, 40), (1, 512, 1), (1, 300, 1), (3, 5, 7)]


def drop_last_call_of_each_full_round(source):
    """The one-output chain (256 tiles a full round, reduce.CALL_TILES a call of its device
    function) skips its full rounds' last call: their last 16 tiles."""
    last = f"acc = chain(buf, tid, int64({256 - reduce.CALL_TILES}), int64(1), acc)"
    assert last in source or "int64(1), acc)" not in source     # (a fold with that chain)
    return source.replace(last, "pass")


def reverse_each_call(source):
    """The chains' device function adds its tiles in reverse."""
    chain = re.compile(r"(?:^ *acc = acc \+ float64\(buf\[uint64\(tid \+ .*\)\]\)\n)+", re.M)
    return chain.sub(lambda m: "".join(reversed(m.group(0).splitlines(True))), source)


@pytest.mark.parametrize("edit, caught_by", [(drop_last_call_of_each_full_round, (1, 512, 1)),
                                             (reverse_each_call, (2, 600, 40))],
                         ids=["drop-a-tile", "reversed-rounds"])
def test_a_wrong_fold_in_the_kernel_is_caught(mutate_kernels, edit, caught_by):
    mutate_kernels(edit)
    node = f"test_fold_order.py::test_fold_tiles_is_the_left_fold_over_tiles[{ident(caught_by)}]"
    assert verdict(folds.test_fold_tiles_is_the_left_fold_over_tiles, node, caught_by) == "failed"
    for shape in OLD_FOLD_SHAPES:
        node = f"test_kernels.py::test_fold_tiles[{ident(shape)}]"
        assert verdict(old_fold_tiles_test, node, shape) == "passed"


def reversed_tiles(partials):
    return np.add.accumulate(partials[:, ::-1].astype(np.float64), axis=1)[:, -1]


def pairwise_tiles(partials):
    return pairwise_fold(partials, 1)


def reversed_images(sums):
    return np.add.accumulate(np.asarray(sums, np.float64)[::-1], axis=0)[-1]


@pytest.fixture(scope="module")
def old_reference():
    return old_reference_results()


def old_reference_results():
    """The reference's weight gradients and SSEs for the old parity tests' small shapes, on
    their kind of data (standard normal): what the kernels were compared with."""
    rng = np.random.default_rng(0)
    out = []
    for n, cin, cout, h, w in kernel_tests.SMALL_WEIGHTS + [(2, 16, 16, 13, 17)]:
        gy = rng.standard_normal((n, cout, h, w)).astype(np.float32)
        x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
        out += [bits(a) for a in R.conv2d_backward_weights(gy, x)]
    for n, c, _, h, w in kernel_tests.LOSS_SMALL:
        pred, target = (rng.standard_normal((n, c, h, w)).astype(np.float32) for _ in "pt")
        out.append(R.mse_loss(pred, target)[0])
    return out


# the fold-order tests that must catch a wrong fold in the reference, with their arguments
FOLD_ORDER_TESTS = {
    "test_reference_folds_are_left_folds": (),
    "test_backward_weights_fold_tiles_in_order[2x1x2x20x130]": ((2, 1, 2, 20, 130),),
    "test_loss_folds_tiles_then_images_in_order[3x2x20x130]": ((3, 2, 20, 130),),
    "test_sum_images_is_the_left_fold_over_images[float32]": (np.float32,),
    "test_sum_images_is_the_left_fold_over_images[float64]": (np.float64,)}
TILE_ORDER_TESTS = list(FOLD_ORDER_TESTS)[:3]
IMAGE_ORDER_TESTS = list(FOLD_ORDER_TESTS)[2:]


def same_bytes(a, b):
    """Equal bits and dtype (values may be arrays or float scalars)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name, patch, caught_by", [
    ("per_image", reversed_tiles, TILE_ORDER_TESTS),
    ("per_image", pairwise_tiles, TILE_ORDER_TESTS),
    ("fold_images", reversed_images, IMAGE_ORDER_TESTS)],
    ids=["tiles-reversed", "tiles-pairwise", "images-reversed"])
def test_a_wrong_fold_in_the_reference_is_caught(monkeypatch, old_reference, name, patch,
                                                 caught_by):
    """The reference's float64 folds in another order: on the old parity tests' data the
    reference gives the bits it gave before (so the kernels still equal it), and the
    fold-order tests fail."""
    for module in (reference_reduce, reference_conv, reference_loss):
        monkeypatch.setattr(module, name, patch)
    assert all(same_bytes(a, b) for a, b in zip(old_reference, old_reference_results()))
    for node in caught_by:
        test = getattr(folds, node.split("[")[0])
        assert verdict(test, f"test_fold_order.py::{node}", *FOLD_ORDER_TESTS[node]) == \
            "failed", node


def row_seam_as_image_border(source):
    """Blocks of 32 rows (the 8-row geometries) read the row above them as padding (+0)."""
    if "h0 = cuda.blockIdx.y * 32\n" not in source:
        return source
    return source.replace("hh >= 0 and", "hh >= h0 and")


def channel_blocks_share_the_first(source):
    """Every block of output channels stages the first block's weights (in either form of
    the staging: written out, with unsigned places, or a loop over groups)."""
    source = re.sub(r"o = uint64\(ob \* \d+\) \+ e % uint64\((\d+)\)", r"o = e % uint64(\1)",
                    source)
    return re.sub(r"o = ob \* \d+ \+ i % (\d+)", r"o = i % \1", source)


def old_convolution_verdicts():
    """test_forward and test_backward_data over the small shapes the suite had (one block row
    in the 8-row geometries, at most 16 output channels), with ReLU and mask (the flag
    changes only the epilogue, not the staging these bugs are in)."""
    return {verdict(test, f"test_kernels.py::{test.__name__}[{ident(s)}-True]",
                    s, True)
            for test in (kernel_tests.test_forward, kernel_tests.test_backward_data)
            for s in kernel_tests.SMALL}


@pytest.mark.parametrize("edit, test, caught_by", [
    (row_seam_as_image_border, kernel_tests.test_backward_data, (1, 16, 1, 33, 33)),
    (channel_blocks_share_the_first, kernel_tests.test_forward, (1, 1, 17, 5, 7))],
    ids=["row-seam", "channel-blocks"])
def test_a_wrong_block_seam_is_caught(mutate_kernels, edit, test, caught_by):
    mutate_kernels(edit)
    node = f"test_kernels.py::{test.__name__}[{ident(caught_by)}-True]"
    assert verdict(test, node, caught_by, True) == "failed"
    assert old_convolution_verdicts() == {"passed"}


def phase_weights_summed_in_reverse(source):
    """The phase kernel's staging adds a phase weight's terms last first."""
    terms = re.compile(r"v = (w\[o, c, \d, \d\](?: \+ w\[o, c, \d, \d\])+)")
    source, count = terms.subn(lambda m: "v = " + " + ".join(reversed(m.group(1).split(" + "))),
                               source)
    assert count == (12 if "elif k == 15:" in source else 0)   # the sums of 2 or 4 terms
    return source


def test_phase_weights_summed_in_the_wrong_order_are_caught(mutate_kernels):
    """The test's planted weights (1, 2^-24, 2^-24, 0) sum to 1 left to right, to 1 + 2^-23
    right to left."""
    mutate_kernels(phase_weights_summed_in_reverse)
    shape = unet_ops.UPSAMPLED_SMALL[0]
    node = f"test_unet_ops.py::test_conv_of_an_upsampled_input_equals_reference[{ident(shape)}]"
    assert verdict(unet_ops.test_conv_of_an_upsampled_input_equals_reference, node,
                   shape) == "failed"
