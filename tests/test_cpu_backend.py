"""The compiled CPU backend (cryokern.cpu) against the NumPy reference, bit for bit: its fma,
every operation on shapes like the GPU tests', whole training steps, and a `train` run."""
import numpy as np
import pytest
from numba import njit

from conftest import bits
from cryokern import cpu as C
from cryokern import reference as R
from cryokern import train as T
from cryokern.backends import get_backend
from cryokern.cpu.fma import fma32
from cryokern.model import Network, init_params
from cryokern.step import OptimizerConfig, TrainStep
from test_train import data_args, make_pair, npz

# (N, Cin, Cout, H, W): odd sizes, single pixels, one channel, several reduction tiles
# (16 x 64) with edge tiles, the default 16 -> 16 layer, 32 channels
SHAPES = [(2, 3, 5, 13, 17), (1, 1, 2, 1, 1), (1, 2, 1, 2, 3), (1, 1, 2, 18, 66),
          (2, 16, 16, 13, 17), (1, 1, 16, 18, 66), (1, 16, 1, 17, 67), (1, 32, 32, 9, 70),
          (1, 2, 3, 33, 130)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def with_specials(a):
    """a with NaN, infinities and signed zeros in its first elements (their bits must carry)."""
    flat = a.reshape(-1)
    specials = [np.nan, np.inf, -np.inf, -0.0, 0.0][:flat.size]
    flat[:len(specials)] = specials
    return a


def same_bits(got, want):
    return np.array_equal(bits(got), bits(want))


@njit
def _fma_all(a, b, c, out):
    for i in range(out.size):
        out[i] = fma32(a[i], b[i], c[i])


def test_fma_is_the_exact_fma(rng):
    """The intrinsic against reference.fma32 (itself tested against exact rationals): random
    values, sums on float32 midpoints (where a float64 sum rounded to float32 rounds twice),
    subnormal results, specials and signed zeros."""
    a, b, c = (randn(rng, 20000) for _ in range(3))
    cancel = (-(a.astype(np.float64) * b)).astype(np.float32)        # a*b + c near 0
    t = np.float32(1 + 2 ** -23)
    ties = ([t, np.float32(1e-30), 0.0, -0.0, -0.0, np.inf, np.nan, 1e-20, 3e38],
            [np.float32(2 ** -24 * (1 - 2 ** -23)), np.float32(1e-10), 5.0, 5.0, -5.0, 0.0, 1.0,
             1e-20, 10.0],
            [t, 0.0, -0.0, -0.0, 0.0, 1.0, 1.0, 0.0, -3e38])
    a, b, c = (np.concatenate([x, x, np.float32(v)]).astype(np.float32)
               for x, v in zip((a, b, c), ties))
    c[20000:40000] = cancel
    out = np.empty_like(a)
    _fma_all(a, b, c, out)
    assert same_bits(out, R.fma32(a, b, c))


def test_plain_float32_arithmetic_is_not_fused():
    """numba must not contract a*b + c (fastmath off): two roundings, as the contract's
    separately listed products (Adam's c1 * d) need."""
    @njit
    def mul_add(a, b, c):
        return a * b + c
    a = np.float32(1 + 2 ** -23)                 # a * a = 1 + 2^-22 + 2^-46, rounded away
    c = np.float32(-(1 + 2 ** -22))
    assert mul_add(a, a, c) == np.float32(0) and R.fma32(a, a, c) == np.float32(2 ** -46)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward(rng, shape):
    n, cin, cout, h, w = shape
    x, wt, b = with_specials(randn(rng, n, cin, h, w)), randn(rng, cout, cin, 3, 3), \
        randn(rng, cout)
    b[0] = -0.0                   # a -0 chain start next to +0 taps of the padding
    for relu in (False, True):
        out = np.full((n, cout, h, w), np.nan, np.float32)
        C.conv2d_forward(x, wt, b, relu=relu, out=out)
        assert same_bits(out, R.conv2d_forward(x, wt, b, relu=relu)), relu


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_data(rng, shape):
    n, cin, cout, h, w = shape
    gy, wt = with_specials(randn(rng, n, cout, h, w)), randn(rng, cout, cin, 3, 3)
    y = with_specials(randn(rng, n, cin, h, w))
    assert same_bits(C.conv2d_backward_data(gy, wt), R.conv2d_backward_data(gy, wt))
    want = R.conv2d_backward_data(gy, wt, relu_output=y)
    assert same_bits(C.conv2d_backward_data(gy, wt, relu_output=y), want)
    C.conv2d_backward_data(gy, wt, relu_output=y, out=y)     # the step writes over the mask
    assert same_bits(y, want)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_backward_weights(rng, shape):
    n, cin, cout, h, w = shape
    gy, x = randn(rng, n, cout, h, w), randn(rng, n, cin, h, w)
    want_gw, want_gb = R.conv2d_backward_weights(gy, x)
    gw, gb = C.conv2d_backward_weights(gy, x)
    assert same_bits(gw, want_gw) and same_bits(gb, want_gb)
    sums = (np.empty((n, cout, cin, 3, 3)), np.empty((n, cout)))
    want = (np.empty_like(sums[0]), np.empty_like(sums[1]))
    C.conv2d_backward_weights(gy, x, image_sums=sums)
    R.conv2d_backward_weights(gy, x, image_sums=want)
    assert all(np.array_equal(s.view(np.int64), t.view(np.int64)) for s, t in zip(sums, want))
    out = np.empty((cout, cin, 3, 3), np.float32)
    assert same_bits(C.sum_images(sums[0], out), want_gw)


def test_backward_weights_keep_negative_zeros_and_specials(rng):
    """All -0 partials fold to -0 (the fold starts from the first partial, not from +0); NaN
    and infinities reach the sums."""
    gy = np.full((2, 2, 20, 70), -0.0, np.float32)
    x = np.abs(randn(rng, 2, 1, 20, 70))
    gy[1, 1, 3, 5] = np.inf
    for got, want in zip(C.conv2d_backward_weights(gy, x), R.conv2d_backward_weights(gy, x)):
        assert same_bits(got, want)


def test_relu_backward(rng):
    gy, y = randn(rng, 2, 3, 5, 7), with_specials(randn(rng, 2, 3, 5, 7))
    assert same_bits(C.relu_backward(gy, y), R.relu_backward(gy, y))


@pytest.mark.parametrize("shape", [(2, 1, 13, 17), (1, 1, 1, 1), (3, 2, 33, 130)],
                         ids=["13x17", "1x1", "2ch-33x130"])
def test_loss(rng, shape):
    pred, target = randn(rng, *shape), randn(rng, *shape)
    count = pred.size
    assert C.mse_loss(pred, target) == R.mse_loss(pred, target)
    assert same_bits(C.mse_grad(pred, target, count), R.mse_grad(pred, target, count))
    sums, want = np.empty(shape[0]), np.empty(shape[0])
    want_sse, want_grad = R.mse_loss_and_grad(pred, target, count, image_sums=want)
    got_sse, grad = C.mse_loss_and_grad(pred, target, count, out=pred, image_sums=sums)
    assert got_sse is sums and grad is pred and same_bits(pred, want_grad)
    assert np.array_equal(sums.view(np.int64), want.view(np.int64))
    total = np.empty(1)
    assert C.sum_images(sums, total)[0] == R.sum_images(want, np.empty(1))[0]


@pytest.mark.parametrize("momentum,weight_decay,nesterov",
                         [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 1e-2, True),
                          (0.0, 5e-3, False)])
def test_sgd(rng, momentum, weight_decay, nesterov):
    arrays = [randn(rng, 16, 16, 3, 3) for _ in range(3)]
    mine = [a.copy() for a in arrays]
    for _ in range(3):
        R.sgd_update(*arrays, 0.05, momentum, weight_decay, nesterov)
        C.sgd_update(*mine, 0.05, momentum, weight_decay, nesterov)
    assert all(same_bits(a, b) for a, b in zip(mine, arrays))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam(rng, weight_decay):
    w, g = randn(rng, 16, 1, 3, 3), randn(rng, 16, 1, 3, 3)
    arrays = [w, g, np.zeros_like(w), np.zeros_like(w)]
    mine = [a.copy() for a in arrays]
    for step in (1, 2, 3):
        R.adam_update(*arrays, step, 1e-3, weight_decay=weight_decay)
        C.adam_update(*mine, step, 1e-3, weight_decay=weight_decay)
    assert all(same_bits(a, b) for a, b in zip(mine, arrays))


def test_bad_arguments_are_refused(rng):
    x = randn(rng, 1, 2, 4, 4)
    with pytest.raises(TypeError, match="float32"):
        C.conv2d_forward(x.astype(np.float64), randn(rng, 3, 2, 3, 3), randn(rng, 3))
    with pytest.raises(ValueError, match="input channels"):
        C.conv2d_forward(x, randn(rng, 3, 1, 3, 3), randn(rng, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        C.sgd_update(randn(rng, 4, 4)[:, ::2], randn(rng, 4, 2), randn(rng, 4, 2), 0.1)


@pytest.mark.parametrize("channels,opt,size", [
    ((1, 16, 16, 1), OptimizerConfig("sgd", lr=0.05, momentum=0.9), (13, 70)),
    ((1, 32, 1), OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     (17, 9)),
    ((1, 1), OptimizerConfig("sgd", lr=0.1), (5, 7)),
    ((1, 3, 5, 1), OptimizerConfig("adam", lr=0.01, weight_decay=1e-3), (18, 66)),
], ids=["default-sgd-momentum", "32ch-nesterov-wd", "1x1ch-sgd", "adam-wd"])
def test_training_steps_equal_the_reference(channels, opt, size):
    """Three steps and a validation loss on both backends, in passes of 2 images then 1:
    every loss, parameter and optimizer buffer bit-identical."""
    net = Network(channels)
    rng = np.random.default_rng(7)
    clean = rng.random((3, 1) + size).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    runs = []
    for backend in ("cpu", "reference"):
        trainer = TrainStep(get_backend(backend), net, init_params(net, 3), opt,
                            pass_pixels=2 * size[0] * size[1])
        losses = [trainer(noisy, clean)[0] for _ in range(3)] + [trainer.loss(noisy, clean)[0]]
        runs.append((losses, trainer.host_params(), trainer.host_state()))
    (losses, params, state), (want_losses, want_params, want_state) = runs
    assert losses == want_losses
    for got, want in ((params, want_params), (state, want_state)):
        assert set(got) == set(want) and all(same_bits(got[k], want[k]) for k in want)


def test_train_cpu_run_equals_reference_run(tmp_path):
    """`train --device cpu` and `--device reference`: every array of every checkpoint."""
    pair = make_pair(tmp_path, n=5, shape=(11, 13))
    args = data_args(pair) + ["--channels", "1,4,4,1", "--epochs", "2", "--batch-size", "2",
                              "--optimizer", "adam", "--val-fraction", "0.2"]
    for device in ("cpu", "reference"):
        assert T.main(args + ["--device", device, "--out", str(tmp_path / device)]) == 0
    names = sorted(p.name for p in (tmp_path / "cpu").glob("*.npz"))
    assert names == sorted(p.name for p in (tmp_path / "reference").glob("*.npz"))
    assert {"epoch_0002.npz", "best.npz", "last.npz"} <= set(names)
    for name in names:
        got, want = npz(tmp_path / "cpu" / name), npz(tmp_path / "reference" / name)
        assert set(got) == set(want)
        for k in want:
            if k != "meta":
                assert same_bits(got[k], want[k]), (name, k)
