"""The compiled CPU backend's U-Net operations (numerics §9-14) against the NumPy reference, bit
for bit: each operation on odd sizes, ties, signed zeros and NaN, with the step's aliasing of
`out`; then whole U-Net training steps and model.forward of a U-Net."""
import numpy as np
import pytest

from conftest import bits
from test_unet_step import batch
from cryokern import cpu as C
from cryokern import reference as R
from cryokern.backends import get_backend
from cryokern.model import UNet, forward, init_params
from cryokern.step import OptimizerConfig, TrainStep


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def awkward(rng, *shape):
    """Values with many ties, both zeros, some NaN and infinities: every branch of the pool's
    selection and of the masks."""
    v = rng.integers(-2, 3, shape).astype(np.float32)
    v[rng.random(shape) < 0.2] = -0.0
    v[rng.random(shape) < 0.03] = np.nan
    v[rng.random(shape) < 0.02] = np.inf
    v[rng.random(shape) < 0.02] = -np.inf
    return v


def with_specials(a):
    """a with NaN, infinities, signed zeros and a subnormal in its first elements."""
    flat = a.reshape(-1)
    specials = [np.nan, np.inf, -np.inf, -0.0, 0.0, -1e-45][:flat.size]
    flat[:len(specials)] = specials
    return a


def poisoned(shape):
    return np.full(shape, np.nan, np.float32)


def same_bits(got, want):
    return got.shape == want.shape and np.array_equal(bits(got), bits(want))


# (N, C, H, W), even sides: one window, several channels, odd numbers of windows
POOL_SHAPES = [(1, 1, 2, 2), (1, 2, 6, 10), (2, 3, 18, 34), (1, 5, 14, 2)]
POOL_IDS = ["x".join(map(str, s)) for s in POOL_SHAPES]


@pytest.mark.filterwarnings("ignore:invalid value")     # the reference's inf - inf
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=POOL_IDS)
def test_pool_equals_reference(rng, shape):
    n, c, h, w = shape
    x = awkward(rng, *shape)
    gy, add = with_specials(randn(rng, n, c, h // 2, w // 2)), with_specials(randn(rng, *shape))
    assert same_bits(C.maxpool2x2_forward(x, out=poisoned(gy.shape)), R.maxpool2x2_forward(x))
    assert same_bits(C.maxpool2x2_backward(gy, x), R.maxpool2x2_backward(gy, x))
    shared = add.copy()         # as the step runs it: out = add, masked by the pool's input
    C.maxpool2x2_backward(gy, x, out=shared, add=shared, relu_output=x, leaky_slope=0.1)
    assert same_bits(shared, R.maxpool2x2_backward(gy, x, add=add, relu_output=x,
                                                   leaky_slope=0.1))
    for kwargs in ({"relu_output": x}, {"add": add}):
        assert same_bits(C.maxpool2x2_backward(gy, x, out=poisoned(shape), **kwargs),
                         R.maxpool2x2_backward(gy, x, **kwargs))
    over_x = x.copy()           # out may be x itself: a window is read before it is written
    C.maxpool2x2_backward(gy, over_x, out=over_x, relu_output=over_x, leaky_slope=0.25)
    assert same_bits(over_x, R.maxpool2x2_backward(gy, x, relu_output=x, leaky_slope=0.25))


def test_pool_tie_and_nan_rules():
    """The literal rules (§10): first NaN, else first maximum; -0 and +0 tie, the first kept."""
    windows = [[-0.0, 0.0, 0.0, -0.0], [0.0, -0.0, -1.0, -0.0], [1.0, np.nan, np.nan, 2.0],
               [2.0, 2.0, 3.0, 3.0], [-np.inf, -np.inf, -np.inf, -np.inf]]
    x = np.array(windows, np.float32).reshape(1, len(windows), 2, 2)
    y = C.maxpool2x2_forward(x).ravel()
    assert bits(y).tolist() == bits(np.array([-0.0, 0.0, np.nan, 3.0, -np.inf],
                                             np.float32)).tolist()
    gx = C.maxpool2x2_backward(np.ones((1, len(windows), 1, 1), np.float32), x)
    assert gx.reshape(len(windows), 4).argmax(axis=1).tolist() == [0, 0, 1, 2, 0]


def test_pool_refuses_odd_sides():
    with pytest.raises(ValueError, match="even sides"):
        C.maxpool2x2_forward(np.zeros((1, 1, 3, 4), np.float32))


@pytest.mark.parametrize("shape", POOL_SHAPES, ids=POOL_IDS)
def test_upsample_equals_reference(rng, shape):
    n, c, h, w = shape
    x, gy = with_specials(randn(rng, n, c, h // 2, w // 2)), with_specials(randn(rng, *shape))
    y = awkward(rng, n, c, h // 2, w // 2)
    assert same_bits(C.upsample2x_forward(x, out=poisoned(shape)), R.upsample2x_forward(x))
    assert same_bits(C.upsample2x_backward(gy), R.upsample2x_backward(gy))
    assert same_bits(C.upsample2x_backward(gy, relu_output=y),
                     R.upsample2x_backward(gy, relu_output=y))
    shared = y.copy()           # as the step runs it: over the mask
    C.upsample2x_backward(gy, out=shared, relu_output=shared, leaky_slope=0.1)
    assert same_bits(shared, R.upsample2x_backward(gy, relu_output=y, leaky_slope=0.1))


def test_upsample_backward_order_and_negative_zeros():
    """Four -0 give -0 (no start from +0); the order decides 1 + 2^-24 + 2^-24 - 1."""
    e = 2.0 ** -24
    gy = np.array([[-0.0, -0.0, -0.0, -0.0], [1.0, e, e, -1.0], [e, e, 1.0, -1.0]],
                  np.float32).reshape(3, 1, 2, 2)
    gx = C.upsample2x_backward(gy.reshape(1, 3, 2, 2)).ravel()
    assert bits(gx).tolist() == bits(np.array([-0.0, 0.0, 2 * e], np.float32)).tolist()
    assert same_bits(gx, R.upsample2x_backward(gy.reshape(1, 3, 2, 2)).ravel())


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 6, 9, 33)],
                         ids=["1x1x1x1", "2x3x5x7", "1x6x9x33"])
def test_leaky_equals_reference(rng, shape):
    x, gy = with_specials(randn(rng, *shape)), with_specials(randn(rng, *shape)[::-1].copy())
    y = R.leaky_relu(x)
    assert same_bits(C.leaky_relu(x), y)
    in_place = x.copy()
    C.leaky_relu(in_place, slope=0.3, out=in_place)
    assert same_bits(in_place, R.leaky_relu(x, slope=0.3))
    assert same_bits(C.leaky_relu_backward(gy, y), R.leaky_relu_backward(gy, y))
    yy = awkward(rng, *shape)
    shared = gy.copy()
    C.leaky_relu_backward(shared, yy, out=shared)
    assert same_bits(shared, R.leaky_relu_backward(gy, yy))


def test_leaky_special_values():
    x = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -1e-45], np.float32).reshape(1, 1, 1, 6)
    y = C.leaky_relu(x).ravel()
    assert bits(y[[0, 1, 5]]).tolist() == bits(np.array([-0.0, 0.0, -0.0], np.float32)).tolist()
    assert np.isnan(y[2]) and y[3] == -np.inf and y[4] == np.inf


@pytest.mark.parametrize("slope", [0.0, -0.1, float("nan"), float("inf"), 1e-50])
def test_leaky_slope_must_be_positive_and_finite(slope):
    x = np.ones((1, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="slope"):
        C.leaky_relu(x, slope)
    with pytest.raises(ValueError, match="slope"):
        C.conv2d_forward(x, np.ones((1, 1, 3, 3), np.float32), np.zeros(1, np.float32),
                         leaky_slope=slope)


def test_layout_equals_reference(rng):
    a, b = with_specials(randn(rng, 2, 3, 5, 7)), randn(rng, 2, 3, 5, 7)
    assert same_bits(C.pad_zeros(a, 8, 8, out=poisoned((2, 3, 8, 8))), R.pad_zeros(a, 8, 8))
    assert same_bits(C.pad_zeros(a, 5, 7), a)
    assert same_bits(C.crop(a, 4, 5, out=poisoned((2, 3, 4, 5))), R.crop(a, 4, 5))
    b.ravel()[:6] = [0.0, -0.0, 1.0, np.nan, -0.0, -np.inf]
    assert same_bits(C.add(a, b), R.add(a, b))
    shared = a.copy()           # as the step runs it: the residual over the network's output
    C.add(shared, b, out=shared)
    assert same_bits(shared, R.add(a, b))
    with pytest.raises(ValueError, match="cannot pad"):
        C.pad_zeros(a, 4, 8)
    with pytest.raises(ValueError, match="cannot crop"):
        C.crop(a, 6, 7)


# (N, Cin, Cout, H, W): odd sizes, single pixels and channels, several reduction tiles
CONV_SHAPES = [(2, 3, 5, 13, 17), (1, 1, 2, 18, 66), (1, 2, 1, 2, 3), (1, 8, 6, 5, 9)]
CONV_IDS = ["x".join(map(str, s)) for s in CONV_SHAPES]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=CONV_IDS)
def test_conv_leaky_equals_reference(rng, shape):
    n, cin, cout, h, w = shape
    x, wt, b = with_specials(randn(rng, n, cin, h, w)), randn(rng, cout, cin, 3, 3), \
        randn(rng, cout)
    assert same_bits(C.conv2d_forward(x, wt, b, leaky_slope=0.1, out=poisoned((n, cout, h, w))),
                     R.conv2d_forward(x, wt, b, leaky_slope=0.1))
    gy, y = with_specials(randn(rng, n, cout, h, w)), awkward(rng, n, cin, h, w)
    shared = y.copy()           # as the step runs it: the gradient over the activation
    C.conv2d_backward_data(gy, wt, relu_output=shared, out=shared, leaky_slope=0.1)
    assert same_bits(shared, R.conv2d_backward_data(gy, wt, relu_output=y, leaky_slope=0.1))
    assert same_bits(C.conv2d_backward_data(gy, wt, relu_output=y),
                     R.conv2d_backward_data(gy, wt, relu_output=y))
    with pytest.raises(ValueError, match="exclude"):
        C.conv2d_forward(x, wt, b, relu=True, leaky_slope=0.1)
    with pytest.raises(ValueError, match="needs relu_output"):
        C.conv2d_backward_data(gy, wt, leaky_slope=0.1)


# (N, Ca, Cb, Cout, H, W)
TWO_SHAPES = [(2, 2, 3, 4, 13, 17), (1, 1, 1, 2, 18, 66), (1, 5, 3, 8, 5, 7)]


@pytest.mark.parametrize("shape", TWO_SHAPES, ids=["x".join(map(str, s)) for s in TWO_SHAPES])
def test_conv_of_two_inputs_equals_reference(rng, shape):
    n, ca, cb, cout, h, w = shape
    xa, xb = with_specials(randn(rng, n, ca, h, w)), randn(rng, n, cb, h, w)
    wt, b = randn(rng, cout, ca + cb, 3, 3), randn(rng, cout)
    gy = with_specials(randn(rng, n, cout, h, w))
    assert same_bits(C.conv2d_forward(xa, wt, b, leaky_slope=0.1, x2=xb),
                     R.conv2d_forward(xa, wt, b, leaky_slope=0.1, x2=xb))
    want = R.conv2d_backward_data(gy, wt, split=ca)
    parts = poisoned(xa.shape), poisoned(xb.shape)
    got = C.conv2d_backward_data(gy, wt, out=parts, split=ca)
    assert got[0] is parts[0] and all(same_bits(g, v) for g, v in zip(got, want))
    assert all(same_bits(g, v) for g, v in zip(C.conv2d_backward_data(gy, wt, split=ca), want))
    # no infinities in the weight gradients' gy: inf - inf's NaN has another sign bit in the
    # reference's float64 folding than in the cpu backend's (so also in the chain's layers)
    gy = randn(rng, n, cout, h, w)
    want = R.conv2d_backward_weights(gy, xa, x2=xb)
    assert all(same_bits(g, v) for g, v in zip(C.conv2d_backward_weights(gy, xa, x2=xb), want))
    sums = [(np.zeros((n, cout, ca + cb, 3, 3)), np.zeros((n, cout))) for _ in range(2)]
    C.conv2d_backward_weights(gy, xa, x2=xb, image_sums=sums[0])
    R.conv2d_backward_weights(gy, xa, x2=xb, image_sums=sums[1])
    assert all(np.array_equal(bits(g, np.float64), bits(v, np.float64))
               for g, v in zip(*sums))
    with pytest.raises(ValueError, match="cannot split"):
        C.conv2d_backward_data(gy, wt, split=ca + cb)
    with pytest.raises(ValueError, match="not masked"):
        C.conv2d_backward_data(gy, wt, relu_output=np.ones((n, ca + cb, h, w), np.float32),
                               split=ca)
    with pytest.raises(ValueError, match="do not fit"):
        C.conv2d_forward(xa, wt, b)


# --- whole U-Net steps and forward passes ---------------------------------------------------

@pytest.mark.parametrize("opt,residual", [
    pytest.param(OptimizerConfig("sgd", lr=0.05, momentum=0.9), True, id="sgd-residual"),
    pytest.param(OptimizerConfig("sgd", lr=0.05, nesterov=True, momentum=0.9), False,
                 id="sgd-nesterov-plain"),
    pytest.param(OptimizerConfig("adam", lr=1e-3), False, id="adam-plain"),
    pytest.param(OptimizerConfig("adam", lr=1e-3, weight_decay=1e-4), True,
                 id="adam-residual")])
def test_unet_steps_equal_reference(opt, residual):
    """Three poolings (widths 4, 6, 8, 8), padded odd sides (37 x 50 -> 40 x 56), two steps:
    losses, parameters and optimizer state bit for bit."""
    net = UNet((4, 6, 8, 8), residual=residual)
    params = init_params(net, seed=3)
    cpu = TrainStep(get_backend("cpu"), net, params, opt)
    ref = TrainStep(get_backend("reference"), net, params, opt)
    for step in range(2):
        noisy, clean = batch(10 + step, (2, 1, 37, 50))
        assert cpu(noisy, clean) == ref(noisy, clean), step
    for name, value in ref.host_params().items():
        assert same_bits(cpu.host_params()[name], value), name
    for name, value in ref.host_state().items():
        assert same_bits(cpu.host_state()[name], value), name


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_unet_forward_equals_reference(residual):
    """model.forward allocating its own arrays (two poolings, padded 13 x 18)."""
    net = UNet((3, 5, 4), residual=residual)
    params = init_params(net, seed=6)
    x, _ = batch(2, (2, 1, 13, 18))
    got = forward(get_backend("cpu"), net, params, x)
    want = forward(get_backend("reference"), net, params, x)
    assert same_bits(got, want)
