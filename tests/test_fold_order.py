"""Numerics §4 steps 3-5 (float64 folds over tiles, then images) on data where the order decides
the bits: the kernels' folds, the reference's, and whole reductions (weight gradients, loss).

The tests assert that their data tells the contract's left fold from the reversed and the
pairwise one (fold_data), so that a fold in another order, one that drops or repeats a tile,
or one that starts from the wrong value gives other bits here (test_sharpness plants such
bugs and checks that these tests fail); -0.0 partials are a case of their own.
"""
import numpy as np
import pytest
from numba import cuda

import contract_loops as loops
from conftest import bits, ident
from fold_data import (differs_in_order, left_fold, order_sensitive_partials,
                       order_sensitive_squares, order_sensitive_sums, total_in_other_orders)
from cryokern import kernels as K
from cryokern import reference as R
from cryokern.contract import TILE_H, TILE_W, tile_grid
from cryokern.kernels.reduce import fold_tiles
from cryokern.reference import reduce as reference_reduce

def fold_on_device(*jobs):
    """fold_tiles over host partials (N, T, K); the per-image float64 sums, on the host."""
    sums = [cuda.to_device(np.full((p.shape[0], p.shape[2]), np.nan)) for p in jobs]
    fold_tiles(*[(cuda.to_device(p), s) for p, s in zip(jobs, sums)])
    return [s.copy_to_host() for s in sums]


# many outputs: 4 full rounds of 128 tiles and a partial one, a partial block of 32 outputs
# (40), three blocks (72); one output: two full rounds of 256 tiles, a full and a partial one;
# few tiles (a partial round only), three tiles
FOLD_SHAPES = [(2, 600, 40), (1, 300, 72), (1, 512, 1), (1, 300, 1), (3, 5, 7), (2, 3, 1)]


@pytest.mark.parametrize("shape", FOLD_SHAPES + [pytest.param(s, marks=pytest.mark.gpu) for s in
                                                 [(4, 4096, 1), (4, 1024, 2304), (3, 997, 16)]],
                         ids=ident)
def test_fold_tiles_is_the_left_fold_over_tiles(rng, shape):
    """Each image's float64 sum of its tiles, added in tile order from tile 0's partial."""
    partials = order_sensitive_partials(rng, *shape)
    assert differs_in_order(partials, 1).all()
    got, = fold_on_device(partials)
    assert np.array_equal(bits(got, np.float64), bits(left_fold(partials, 1), np.float64))


@pytest.mark.parametrize("shape", [(1, 300, 1), (2, 5, 40)], ids=ident)
def test_fold_tiles_keeps_a_negative_zero(shape):
    """-0.0 partials fold to -0.0 (the fold starts from tile 0's partial, not from +0), and
    one +0.0 among them makes the sum +0.0."""
    partials = np.full(shape, -0.0, np.float32)
    partials[-1, -1, -1] = 0.0
    got, = fold_on_device(partials)
    want = np.full((shape[0], shape[2]), -0.0)
    want[-1, -1] = 0.0
    assert np.array_equal(bits(got, np.float64), bits(want, np.float64))


@pytest.mark.parametrize("values", [
    (2.0 ** 53, 1.0, -1.0),        # the chain rounds 2^53 + 1 (a tree would not): the chain
    (2.0 ** 50, 1.0, -1.0),        # 52 - ceil(log2 3) = 50 bits: no sum can round, a tree
    (2.0 ** 51, 1.0, -1.0),        # 51 bits: one could, so the chain
    (np.inf, 1.0, -1.0), (np.nan, 1.0, 2.0),
    (1e-45, 3e-45, 1.0)])          # subnormals, counted as wide as the smallest normal
def test_fold_tiles_adds_in_another_order_only_where_nothing_rounds(values):
    """The one-output fold adds in a tree only where no addition of the chain can round, and
    runs the chain otherwise: each case gives the chain's bits. In the first, the orders
    differ."""
    partials = np.array(values, np.float32).reshape(1, len(values), 1)
    got, = fold_on_device(partials)
    want = left_fold(partials, 1)
    assert np.array_equal(bits(got, np.float64), bits(want, np.float64))
    if values[0] == 2.0 ** 53:
        assert differs_in_order(partials, 1).all()


def test_fold_tiles_jobs_in_one_launch(rng):
    """Three jobs of different output counts (several blocks, one, a single output) share a
    launch; each gets its own left fold."""
    parts = [order_sensitive_partials(rng, 2, 300, k) for k in (72, 16, 1)]
    for p, got in zip(parts, fold_on_device(*parts)):
        assert np.array_equal(bits(got, np.float64), bits(left_fold(p, 1), np.float64))


def test_fold_tiles_rejects_jobs_of_other_shapes(rng):
    """Jobs of one launch must share images and tiles; a mismatch is named, nothing launched."""
    a = cuda.to_device(np.zeros((2, 300, 4), np.float32))
    b = cuda.to_device(np.zeros((2, 200, 4), np.float32))
    sums = [cuda.to_device(np.zeros((2, 4))) for _ in range(2)]
    with pytest.raises(ValueError, match="differ in images or tiles"):
        fold_tiles((a, sums[0]), (b, sums[1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_images_is_the_left_fold_over_images(rng, dtype):
    """Steps 4-5, kernel and reference: per-image sums added in image order, rounded once."""
    sums = order_sensitive_sums(rng, 4, 40)
    assert differs_in_order(sums, 0, dtype).all()
    want = bits(left_fold(sums, 0).astype(dtype), dtype)
    out = cuda.to_device(np.full(40, np.nan, dtype))
    got = K.sum_images(cuda.to_device(sums), out).copy_to_host()
    assert np.array_equal(bits(got, dtype), want)
    assert np.array_equal(bits(R.sum_images(sums, np.zeros(40, dtype)), dtype), want)


def test_reference_folds_are_left_folds(rng):
    """The reference's step 3 (np.add.accumulate) and the contract loops' steps 3-5 are the
    explicit left folds."""
    partials = order_sensitive_partials(rng, 3, 5, 7)
    assert np.array_equal(bits(reference_reduce.per_image(partials), np.float64),
                          bits(left_fold(partials, 1), np.float64))
    column = partials[:, :, 0]
    assert total_in_other_orders(column)[0] == loops.fold_tiles_then_images(column)


def spike_per_tile(rng, shape, values):
    """An (N, C, H, W) array of zeros but one pixel a tile of each plane, values (N, C*T)
    in plane then tile order (the loss's partial order), the pixel at least one pixel inside
    the image (so that every 3x3 tap around it reads the image)."""
    n, c, h, w = shape
    th, tw = tile_grid(h, w)
    a = np.zeros(shape, np.float32)
    for t in range(th * tw):
        ti, tj = divmod(t, tw)
        rows = np.arange(max(1, ti * TILE_H), min((ti + 1) * TILE_H, h - 1))
        cols = np.arange(max(1, tj * TILE_W), min((tj + 1) * TILE_W, w - 1))
        for i in range(n):
            for ch in range(c):
                a[i, ch, rng.choice(rows), rng.choice(cols)] = values[i, ch * th * tw + t]
    return a


# 2 x 3 tiles (two bands, an edge band and an edge column); on the GPU, the default 16 -> 16
# layer over 4 x 4 tiles
@pytest.mark.parametrize("shape", [(2, 1, 2, 20, 130), pytest.param((2, 16, 16, 64, 256),
                                                                     marks=pytest.mark.gpu)],
                         ids=ident)
def test_backward_weights_fold_tiles_in_order(rng, shape):
    """Tiles whose chains each hold one product gy * 1 (a spike of gy, x all ones): every
    weight and bias partial is the spike, and the gradients are their float32-rounded folds,
    which the orders change."""
    n, cin, cout, h, w = shape
    tiles = np.prod(tile_grid(h, w))
    partials = order_sensitive_partials(rng, n, tiles, cout, rounded=np.float32)
    gy = spike_per_tile(rng, (n, cout, h, w), partials.transpose(0, 2, 1).reshape(n, -1))
    x = np.ones((n, cin, h, w), np.float32)
    want = np.array([total_in_other_orders(partials[:, :, o])[0] for o in range(cout)],
                    np.float32)
    want_gw = np.broadcast_to(want[:, None, None, None], (cout, cin, 3, 3))
    gw, gb = R.conv2d_backward_weights(gy, x)
    assert np.array_equal(bits(gw), bits(want_gw)) and np.array_equal(bits(gb), bits(want))
    gw, gb = K.conv2d_backward_weights(cuda.to_device(gy), cuda.to_device(x))
    assert np.array_equal(bits(gw.copy_to_host()), bits(want_gw))
    assert np.array_equal(bits(gb.copy_to_host()), bits(want))


# three images of two planes of 2 x 3 tiles; on the GPU, 4 x 1024 x 1000 (1024 tiles an image)
@pytest.mark.parametrize("shape", [(3, 2, 20, 130), pytest.param((4, 1, 1024, 1000),
                                                                  marks=pytest.mark.gpu)],
                         ids=ident)
def test_loss_folds_tiles_then_images_in_order(rng, shape):
    """Tiles holding one nonzero difference d each: every partial is d*d, and the SSE is their
    fold over tiles (plane by plane), then over images, which the orders change."""
    n, c, h, w = shape
    d = order_sensitive_squares(rng, n, c * np.prod(tile_grid(h, w)))
    totals = total_in_other_orders(d * d)
    assert (totals[1:] != totals[0]).all()
    pred, target = spike_per_tile(rng, shape, d), np.zeros(shape, np.float32)
    assert R.mse_loss(pred, target)[0] == totals[0]
    assert K.mse_loss(cuda.to_device(pred), cuda.to_device(target))[0] == totals[0]
