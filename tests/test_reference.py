"""The reference operations: contract loops (bits), float64 formulas (1e-5), finite differences."""
import numpy as np
import pytest

import contract_loops as loops
from conftest import bits
from cryokern import reference as R
from float64_math import (conv64, conv_backward_data64, conv_backward_weights64, rel_err)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- the vectorized reference is the contract, bit for bit -------------------------------------

@pytest.mark.parametrize("relu", [False, True])
def test_forward_follows_contract(rng, relu):
    x, w, b = randn(rng, 2, 2, 5, 7), randn(rng, 3, 2, 3, 3), randn(rng, 3)
    assert np.array_equal(bits(R.conv2d_forward(x, w, b, relu=relu)),
                          bits(loops.conv_forward(x, w, b, relu)))


def test_backward_data_follows_contract(rng):
    gy, w = randn(rng, 2, 3, 5, 7), randn(rng, 3, 2, 3, 3)
    assert np.array_equal(bits(R.conv2d_backward_data(gy, w)),
                          bits(loops.conv_backward_data(gy, w)))


def test_backward_weights_follows_contract_across_tiles(rng):
    # 17 x 65 spans 2 x 2 tiles of 16 x 64, with one-pixel edge tiles
    gy, x = randn(rng, 2, 2, 17, 65), randn(rng, 2, 1, 17, 65)
    gw, gb = R.conv2d_backward_weights(gy, x)
    want_gw, want_gb = loops.conv_backward_weights(gy, x)
    assert np.array_equal(bits(gw), bits(want_gw)) and np.array_equal(bits(gb), bits(want_gb))


def test_mse_loss_follows_contract_across_tiles(rng):
    pred, target = randn(rng, 2, 2, 17, 65), randn(rng, 2, 2, 17, 65)
    sse, count = R.mse_loss(pred, target)
    assert sse == loops.mse_sse(pred, target) and count == pred.size


# --- against independent float64 math ----------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 4, 1, 1), (2, 4, 2, 3), (2, 4, 33, 70)])
def test_forward_matches_float64(rng, shape):
    x, w, b = randn(rng, *shape), randn(rng, 5, shape[1], 3, 3), randn(rng, 5)
    y64 = conv64(x, w, b)
    assert rel_err(R.conv2d_forward(x, w, b), y64) < 1e-5
    assert rel_err(R.conv2d_forward(x, w, b, relu=True), np.maximum(y64, 0)) < 1e-5


def test_backward_data_matches_float64(rng):
    gy, w = randn(rng, 2, 5, 19, 70), randn(rng, 5, 3, 3, 3)
    assert rel_err(R.conv2d_backward_data(gy, w), conv_backward_data64(gy, w)) < 1e-5


def test_backward_data_relu_mask_equals_relu_backward(rng):
    gy, w, y = randn(rng, 2, 5, 9, 11), randn(rng, 5, 3, 3, 3), randn(rng, 2, 3, 9, 11)
    fused = R.conv2d_backward_data(gy, w, relu_output=y)
    assert np.array_equal(bits(fused), bits(R.relu_backward(R.conv2d_backward_data(gy, w), y)))


def test_backward_weights_matches_float64(rng):
    gy, x = randn(rng, 3, 4, 40, 130), randn(rng, 3, 2, 40, 130)
    gw, gb = R.conv2d_backward_weights(gy, x)
    want_gw, want_gb = conv_backward_weights64(gy, x)
    assert rel_err(gw, want_gw) < 1e-5 and rel_err(gb, want_gb) < 1e-5


def test_relu_backward_semantics():
    gy = np.array([1, 2, 3, 4, 5], np.float32).reshape(1, 1, 1, 5)
    y = np.array([1, 0, -0.0, -1, np.nan], np.float32).reshape(1, 1, 1, 5)
    assert R.relu_backward(gy, y).ravel().tolist() == [1, 0, 0, 0, 0]


def test_forward_relu_semantics():
    x = np.array([-1, -0.0, 0, 2], np.float32).reshape(1, 1, 1, 4)
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 1, 1] = 1
    y = R.conv2d_forward(x, w, np.zeros(1, np.float32), relu=True).ravel()
    assert y.tolist() == [0, 0, 0, 2] and not np.signbit(y).any()
    nan_bias = np.full(1, np.nan, np.float32)
    assert np.isnan(R.conv2d_forward(x, w, nan_bias, relu=True)).all()   # NaN propagates


def test_padding_taps_take_part_in_the_chain():
    """fma(+0, w, acc) with w = inf gives NaN: padded taps are computed, not skipped."""
    x = np.ones((1, 1, 1, 1), np.float32)
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):
        assert np.isnan(R.conv2d_forward(x, w, np.zeros(1, np.float32))).all()


def test_mse_matches_float64(rng):
    pred, target = randn(rng, 3, 1, 50, 70), randn(rng, 3, 1, 50, 70)
    sse, count = R.mse_loss(pred, target)
    want = ((pred.astype(np.float64) - target) ** 2).sum()
    assert count == pred.size and abs(sse - want) / want < 1e-6
    g = R.mse_grad(pred, target, count)
    assert rel_err(g, 2 * (pred.astype(np.float64) - target) / count) < 1e-6


@pytest.mark.parametrize("p,t,mse", [(0.5, 0.7, 0.04), (0.3, 0.7, 0.16)])
def test_fortran_loss_cases(p, t, mse):
    """The two cases of the Fortran project's own loss unit test."""
    pred = np.full((1, 1, 4, 4), p, np.float32)
    target = np.full((1, 1, 4, 4), t, np.float32)
    sse, count = R.mse_loss(pred, target)
    assert abs(sse / count - mse) / mse < 1e-6


# --- finite differences on tiny shapes ------------------------------------------------------

def _loss64(x, w, b, gy):
    return float((conv64(x, w, b) * gy).sum())


def test_gradients_against_finite_differences(rng):
    x, w, b, gy = randn(rng, 2, 2, 4, 5), randn(rng, 3, 2, 3, 3), randn(rng, 3), randn(rng, 2, 3, 4, 5)
    gx = R.conv2d_backward_data(gy, w)
    gw, gb = R.conv2d_backward_weights(gy, x)
    h = 1e-3
    for arr, grad, args in ((x, gx, lambda a: (a, w, b)), (w, gw, lambda a: (x, a, b)),
                            (b, gb, lambda a: (x, w, a))):
        numeric = np.zeros(arr.shape)
        base = arr.astype(np.float64)
        for i in np.ndindex(arr.shape):
            up, down = base.copy(), base.copy()
            up[i] += h
            down[i] -= h
            numeric[i] = (_loss64(*args(up), gy) - _loss64(*args(down), gy)) / (2 * h)
        assert rel_err(grad, numeric) < 1e-5


def test_mse_grad_against_finite_differences(rng):
    pred, target = randn(rng, 1, 1, 3, 4), randn(rng, 1, 1, 3, 4)
    g = R.mse_grad(pred, target, pred.size)
    p64 = pred.astype(np.float64)
    mse = lambda p: ((p - target) ** 2).mean()
    numeric = np.zeros(pred.shape)
    for i in np.ndindex(pred.shape):
        e = np.zeros(pred.shape)
        e[i] = 1e-4
        numeric[i] = (mse(p64 + e) - mse(p64 - e)) / 2e-4
    assert rel_err(g, numeric) < 1e-6


# --- optimizers against float64 formulas of torch.optim's semantics ---------------------------

@pytest.mark.parametrize("momentum,wd,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False),
                                                  (0.9, 1e-2, False), (0.9, 1e-2, True)])
def test_sgd_matches_float64(rng, momentum, wd, nesterov):
    w, v = randn(rng, 500), np.zeros(500, np.float32)
    w64, v64 = w.astype(np.float64), np.zeros(500)
    for step in range(3):
        g = randn(rng, 500)
        R.sgd_update(w, g, v, 0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        d = g + wd * w64
        if momentum:
            v64 = d if step == 0 else momentum * v64 + d
            d = d + momentum * v64 if nesterov else v64
        w64 = w64 - 0.1 * d
        assert rel_err(w, w64) < 1e-5


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_matches_float64(rng, wd):
    w, m, v = randn(rng, 500), np.zeros(500, np.float32), np.zeros(500, np.float32)
    w64, m64, v64 = w.astype(np.float64), np.zeros(500), np.zeros(500)
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-3
    for step in range(1, 4):
        g = randn(rng, 500)
        R.adam_update(w, g, m, v, step, lr, weight_decay=wd)
        d = g + wd * w64
        m64 = b1 * m64 + (1 - b1) * d
        v64 = b2 * v64 + (1 - b2) * d * d
        denom = np.sqrt(v64) / np.sqrt(1 - b2 ** step) + eps
        w64 = w64 - lr / (1 - b1 ** step) * m64 / denom
        assert rel_err(w, w64) < 1e-5 and rel_err(m, m64) < 1e-5 and rel_err(v, v64) < 1e-5


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="x must be a float32"):
        R.conv2d_forward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3, 3), np.float32),
                         np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="do not fit 2 input channels"):
        R.conv2d_forward(np.zeros((1, 2, 2, 2), np.float32), np.zeros((1, 1, 3, 3), np.float32),
                         np.zeros(1, np.float32))
