"""The U-Net's operations (numerics §9-13): the reference against independent float64 math,
finite differences and the contract's literal rules, then the GPU kernels against the
reference, bit for bit (simulator at small sizes, GPU at sizes crossing every block seam)."""
import numpy as np
import pytest
from numba import cuda

from conftest import bits, same_bits_nan_positions
from cryokern import kernels as K
from cryokern import reference as R
from cryokern.contract import phase_weights
from float64_math import conv64, rel_err

f32 = np.float32
SLOPE = f32(0.1)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def same_bits(got, want):
    return np.array_equal(bits(got), bits(want))


def leaky64(v, slope=0.1):
    v = np.asarray(v, np.float64)
    return np.where(v > 0, v, np.float64(f32(slope)) * v)


def finite_difference(f, x, r, eps=1e-6):
    """d(sum(r * f(x)))/dx in float64, by central differences, one element at a time."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (np.sum(r * f(xp)) - np.sum(r * f(xm))) / (2 * eps)
    return g


# --- LeakyReLU (§9a) ----------------------------------------------------------------------------

def test_leaky_forward_is_one_rounded_product_where_not_positive(rng):
    x = randn(rng, 2, 3, 5, 7)
    want = np.where(x > 0, x, (np.float64(SLOPE) * x.astype(np.float64)).astype(np.float32))
    assert same_bits(R.leaky_relu(x, 0.1), want)


def test_leaky_special_values():
    x = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -1e-45], np.float32).reshape(1, 1, 1, 6)
    y = R.leaky_relu(x).ravel()
    assert bits(y[:2]).tolist() == bits(np.array([-0.0, 0.0], np.float32)).tolist()
    assert np.isnan(y[2]) and y[3] == -np.inf and y[4] == np.inf
    assert bits(y[5:]).tolist() == bits(np.array([-0.0], np.float32)).tolist()   # underflow


def test_leaky_backward_equals_finite_differences(rng):
    x = randn(rng, 1, 2, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5                 # away from the kink
    r = randn(rng, 1, 2, 4, 5)
    y = R.leaky_relu(x)
    got = R.leaky_relu_backward(r, y)
    want = finite_difference(leaky64, x, r)
    assert rel_err(got, want) < 1e-6


def test_leaky_backward_decides_from_the_output():
    g = np.full((1, 1, 1, 5), 3.0, np.float32)
    y = np.array([1.0, 0.0, -0.0, -2.0, np.nan], np.float32).reshape(1, 1, 1, 5)
    assert R.leaky_relu_backward(g, y).ravel().tolist() == [3.0] + [float(f32(3) * SLOPE)] * 4


@pytest.mark.parametrize("slope", [0.0, -0.1, float("nan"), float("inf"), 1e-50])
def test_leaky_slope_must_be_positive_and_finite(slope):
    with pytest.raises(ValueError, match="slope"):
        R.leaky_relu(np.ones((1, 1, 1, 1), np.float32), slope)


def test_conv_leaky_epilogue_equals_conv_then_leaky(rng):
    x, w, b = randn(rng, 2, 3, 6, 7), randn(rng, 4, 3, 3, 3), randn(rng, 4)
    fused = R.conv2d_forward(x, w, b, leaky_slope=0.1)
    assert same_bits(fused, R.leaky_relu(R.conv2d_forward(x, w, b)))
    assert rel_err(fused, leaky64(conv64(x, w, b))) < 1e-6
    with pytest.raises(ValueError, match="exclude"):
        R.conv2d_forward(x, w, b, relu=True, leaky_slope=0.1)


def test_backward_data_leaky_mask_equals_leaky_backward(rng):
    gy, w, y = randn(rng, 2, 4, 6, 7), randn(rng, 4, 3, 3, 3), randn(rng, 2, 3, 6, 7)
    fused = R.conv2d_backward_data(gy, w, relu_output=y, leaky_slope=0.1)
    assert same_bits(fused, R.leaky_relu_backward(R.conv2d_backward_data(gy, w), y))


# --- max-pooling (§10) --------------------------------------------------------------------------

def pool64(x):
    n, c, h, w = x.shape
    return np.asarray(x, np.float64).reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def pool_backward_loop(gy, x, add=None):
    """§10 as literal scalar loops."""
    gx = np.empty_like(x)
    for n, c, i, j in np.ndindex(gy.shape):
        window = [(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)]
        nans = [k for k, p in enumerate(window) if np.isnan(x[n, c][p])]
        if nans:
            k = nans[0]
        else:
            k = 0
            for k2 in range(1, 4):
                if x[n, c][window[k2]] > x[n, c][window[k]]:
                    k = k2
        for k2, p in enumerate(window):
            routed = gy[n, c, i, j] if k2 == k else f32(0)
            gx[n, c][p] = routed if add is None else f32(add[n, c][p] + routed)
    return gx


def test_pool_forward_is_the_window_maximum(rng):
    x = randn(rng, 2, 3, 6, 10)
    assert np.array_equal(R.maxpool2x2_forward(x).astype(np.float64), pool64(x))


def test_pool_backward_equals_finite_differences(rng):
    x = randn(rng, 1, 2, 4, 6)          # distinct values: the maximum is differentiable
    gy = randn(rng, 1, 2, 2, 3)
    want = finite_difference(pool64, x, gy, eps=1e-7)
    assert rel_err(R.maxpool2x2_backward(gy, x), want) < 1e-6


def test_pool_ties_nan_and_signed_zero_follow_the_rule():
    nan, inf = np.nan, np.inf
    windows = [[1, 1, 1, 1], [0, 2, 2, 1], [-0.0, 0.0, 0.0, -1], [0.0, -0.0, -0.0, -1],
               [1, nan, 5, nan], [nan, 1, nan, 9], [-inf, -inf, -inf, -inf], [3, 2, nan, 7]]
    x = np.array(windows, np.float32).reshape(1, len(windows), 2, 2)
    selected = [0, 1, 0, 0, 1, 0, 0, 2]
    gy = np.arange(1, len(windows) + 1, dtype=np.float32).reshape(1, -1, 1, 1)
    y = R.maxpool2x2_forward(x).ravel()
    gx = R.maxpool2x2_backward(gy, x).reshape(len(windows), 4)
    for c, k in enumerate(selected):
        assert bits(y[c]) == bits(x.reshape(-1, 4)[c, k]), c
        want = np.zeros(4, np.float32)
        want[k] = gy.ravel()[c]
        assert same_bits(gx[c], want), c
    assert same_bits(gx, pool_backward_loop(gy, x).reshape(len(windows), 4))


def test_pool_backward_add_and_mask_follow_the_contract(rng):
    x, gy, add = randn(rng, 2, 3, 4, 6), randn(rng, 2, 3, 2, 3), randn(rng, 2, 3, 4, 6)
    x[0, 0, 0, :2] = [-0.0, 0.0]
    add[0, 0, 0, :2] = [-0.0, -0.0]         # -0 + +0 = +0 where not selected
    want = pool_backward_loop(gy, x, add)
    assert same_bits(R.maxpool2x2_backward(gy, x, add=add), want)
    masked = R.maxpool2x2_backward(gy, x, add=add, relu_output=x, leaky_slope=0.1)
    assert same_bits(masked, R.leaky_relu_backward(want, x))
    assert same_bits(R.maxpool2x2_backward(gy, x, relu_output=x),
                     R.relu_backward(pool_backward_loop(gy, x), x))


def test_pool_refuses_odd_sides():
    with pytest.raises(ValueError, match="even"):
        R.maxpool2x2_forward(np.zeros((1, 1, 3, 4), np.float32))


# --- upsampling (§11) ---------------------------------------------------------------------------

def test_upsample_forward_is_nearest(rng):
    x = randn(rng, 2, 3, 3, 5)
    assert same_bits(R.upsample2x_forward(x), np.kron(x, np.ones((2, 2), np.float32)))


def test_upsample_backward_equals_finite_differences(rng):
    gy = randn(rng, 1, 2, 4, 6)
    want = finite_difference(lambda v: np.kron(v, np.ones((2, 2))), randn(rng, 1, 2, 2, 3), gy)
    assert rel_err(R.upsample2x_backward(gy), want) < 1e-6


def test_upsample_backward_adds_in_row_major_order():
    # (1e8 + 1) rounds to 1e8, then - 1e8 gives 0, then + 1: 1 (another order gives 0 or 2)
    gy = np.array([[1e8, 1], [-1e8, 1]], np.float32).reshape(1, 1, 2, 2)
    assert R.upsample2x_backward(gy).item() == 1.0
    zeros = np.full((1, 1, 2, 2), -0.0, np.float32)
    assert bits(R.upsample2x_backward(zeros)).item() == bits(f32(-0.0)).item()


def test_upsample_backward_mask(rng):
    gy, y = randn(rng, 2, 3, 4, 6), randn(rng, 2, 3, 2, 3)
    plain = R.upsample2x_backward(gy)
    assert same_bits(R.upsample2x_backward(gy, relu_output=y, leaky_slope=0.1),
                     R.leaky_relu_backward(plain, y))
    assert same_bits(R.upsample2x_backward(gy, relu_output=y), R.relu_backward(plain, y))


# --- layout (§12, §13) --------------------------------------------------------------------------

def test_layout_operations(rng):
    a = randn(rng, 2, 3, 4, 5)
    padded = R.pad_zeros(a, 8, 8)
    assert padded.shape == (2, 3, 8, 8) and not padded[:, :, 4:].any() and \
        not padded[:, :, :, 5:].any() and same_bits(R.crop(padded, 4, 5), a)
    assert bits(padded[:, :, 4:]).max() == 0                 # +0, not -0
    assert same_bits(R.add(a, a), a * f32(2))


# --- GPU kernels against the reference, bit for bit ----------------------------------------------

# (N, C, H, W), even sides: one window; an odd number of windows a row; several 256-thread
# blocks with a partial last one (2 x 3 x 9 x 17 = 918 windows); large ones on the GPU only
POOL_SMALL = [(1, 1, 2, 2), (1, 2, 6, 10), (2, 3, 18, 34)]
POOL_LARGE = [(2, 48, 512, 768), (3, 5, 998, 1014)]


def shape_cases(small, large):
    ident = lambda s: "x".join(map(str, s))
    return [pytest.param(s, id=ident(s)) for s in small] + \
           [pytest.param(s, id=ident(s), marks=pytest.mark.gpu) for s in large]


def awkward(rng, *shape):
    """Values with many ties, both zeros and some NaN: every branch of the selection."""
    v = rng.integers(-2, 3, shape).astype(np.float32)
    v[rng.random(shape) < 0.2] = -0.0
    v[rng.random(shape) < 0.02] = np.nan
    return v


def poisoned(shape):
    return cuda.to_device(np.full(shape, np.nan, np.float32))


def dev(a):
    return cuda.to_device(a)


def same_device_bits(got, want):
    return same_bits(got.copy_to_host(), want)


@pytest.mark.parametrize("shape", shape_cases(POOL_SMALL, POOL_LARGE))
def test_pool_kernels_equal_reference(rng, shape):
    n, c, h, w = shape
    x = awkward(rng, *shape)
    gy, add = randn(rng, n, c, h // 2, w // 2), randn(rng, *shape)
    out = poisoned((n, c, h // 2, w // 2))
    K.maxpool2x2_forward(dev(x), out=out)
    assert same_device_bits(out, R.maxpool2x2_forward(x))
    out = poisoned(shape)
    K.maxpool2x2_backward(dev(gy), dev(x), out=out)
    assert same_device_bits(out, R.maxpool2x2_backward(gy, x))
    shared = dev(add)           # as the step runs it: out = add, masked by the pool's input
    K.maxpool2x2_backward(dev(gy), dev(x), out=shared, add=shared, relu_output=dev(x),
                          leaky_slope=0.1)
    assert same_device_bits(shared, R.maxpool2x2_backward(gy, x, add=add, relu_output=x,
                                                          leaky_slope=0.1))
    out = poisoned(shape)
    K.maxpool2x2_backward(dev(gy), dev(x), out=out, relu_output=dev(x))
    assert same_device_bits(out, R.maxpool2x2_backward(gy, x, relu_output=x))


@pytest.mark.parametrize("shape", shape_cases(POOL_SMALL, POOL_LARGE))
def test_upsample_kernels_equal_reference(rng, shape):
    n, c, h, w = shape
    x, gy = randn(rng, n, c, h // 2, w // 2), randn(rng, *shape)
    y = awkward(rng, n, c, h // 2, w // 2)
    out = poisoned(shape)
    K.upsample2x_forward(dev(x), out=out)
    assert same_device_bits(out, R.upsample2x_forward(x))
    out = poisoned(x.shape)
    K.upsample2x_backward(dev(gy), out=out)
    assert same_device_bits(out, R.upsample2x_backward(gy))
    shared = dev(y)             # as the step runs it: over the mask
    K.upsample2x_backward(dev(gy), out=shared, relu_output=shared, leaky_slope=0.1)
    assert same_device_bits(shared, R.upsample2x_backward(gy, relu_output=y, leaky_slope=0.1))


@pytest.mark.parametrize("shape", shape_cases(POOL_SMALL[1:], POOL_LARGE[1:]))
def test_leaky_kernels_equal_reference(rng, shape):
    x, gy = randn(rng, *shape), randn(rng, *shape)
    x.ravel()[:3] = [-0.0, 0.0, -1e-45]
    y = R.leaky_relu(x)
    out = poisoned(shape)
    K.leaky_relu(dev(x), out=out)
    assert same_device_bits(out, y)
    out = poisoned(shape)
    K.leaky_relu_backward(dev(gy), dev(y), out=out)
    assert same_device_bits(out, R.leaky_relu_backward(gy, y))


@pytest.mark.parametrize("shape", shape_cases([(2, 3, 5, 7)], [(2, 48, 511, 767)]))
def test_layout_kernels_equal_reference(rng, shape):
    n, c, h, w = shape
    a = randn(rng, *shape)
    out = poisoned((n, c, h + 3, w + 1))
    K.pad_zeros(dev(a), h + 3, w + 1, out=out)
    assert same_device_bits(out, R.pad_zeros(a, h + 3, w + 1))
    out = poisoned((n, c, h - 1, w - 2))
    K.crop(dev(a), h - 1, w - 2, out=out)
    assert same_device_bits(out, R.crop(a, h - 1, w - 2))
    out = poisoned(shape)
    K.add(dev(a), dev(a[::-1].copy()), out=out)
    assert same_device_bits(out, R.add(a, a[::-1].copy()))


# conv with the LeakyReLU epilogue (N, Cin, Cout, H, W): several blocks and edge blocks (the
# GPU cases' sides cross 32 x 32 blocks and 16 x 64 tiles with edges; the reference's speed
# bounds them)
CONV_SMALL = [(2, 3, 5, 13, 17), (1, 1, 2, 18, 66), (1, 2, 1, 2, 3)]
CONV_LARGE = [(2, 48, 48, 131, 197), (1, 96, 48, 67, 101), (2, 1, 48, 131, 197)]


@pytest.mark.parametrize("shape", shape_cases(CONV_SMALL, CONV_LARGE))
def test_conv_leaky_kernels_equal_reference(rng, shape):
    n, cin, cout, h, w = shape
    x, wt, b = randn(rng, n, cin, h, w), randn(rng, cout, cin, 3, 3), randn(rng, cout)
    out = poisoned((n, cout, h, w))
    K.conv2d_forward(dev(x), dev(wt), dev(b), leaky_slope=0.1, out=out)
    assert same_device_bits(out, R.conv2d_forward(x, wt, b, leaky_slope=0.1))
    gy, y = randn(rng, n, cout, h, w), R.leaky_relu(randn(rng, n, cin, h, w))
    shared = dev(y)             # as the step runs it: the gradient over the activation
    K.conv2d_backward_data(dev(gy), dev(wt), relu_output=shared, out=shared, leaky_slope=0.1)
    assert same_device_bits(shared, R.conv2d_backward_data(gy, wt, relu_output=y,
                                                           leaky_slope=0.1))


# the decoder's convolution reading the level below nearest-upsampled in place, in phase form
# (§12)

def test_phase_weights_sum_the_taps_each_phase_reads():
    """Phase weight (p, q, a, b) of a one-hot kernel is 1 exactly where the tap is one of its
    terms: output row parity p reads kernel rows {0} and {1, 2} (p = 0), {0, 1} and {2}."""
    rows = {(0, 0): {0}, (0, 1): {1, 2}, (1, 0): {0, 1}, (1, 1): {2}}
    for ky, kx in np.ndindex(3, 3):
        w = np.zeros((1, 1, 3, 3), np.float32)
        w[0, 0, ky, kx] = 1
        c = phase_weights(w)[0, 0]
        for p, q, a, b in np.ndindex(2, 2, 2, 2):
            assert c[p, q, a, b] == (ky in rows[p, a] and kx in rows[q, b])


def test_phase_weights_add_in_row_major_order():
    """((w11 + w12) + w21) + w22: 1 + 2^-24 rounds to 1 (ties to even) twice; added first, the
    two small terms would make 1 + 2^-23."""
    w = np.zeros((1, 1, 3, 3), np.float32)
    w[0, 0, 1, 1], w[0, 0, 1, 2], w[0, 0, 2, 1] = 1, 2.0 ** -24, 2.0 ** -24
    assert phase_weights(w)[0, 0, 0, 0, 1, 1] == 1
    assert phase_weights(w)[0, 0, 0, 0, 1, 1].dtype == np.float32


def upsampled_case(rng, shape):
    """x (h x w), x2 (2h x 2w), weights with a NaN, a -0.0 and a phase weight whose sum order
    shows (test_phase_weights_add_in_row_major_order), bias."""
    n, ca, cb, cout, h, w = shape
    xa, xb = randn(rng, n, ca, h, w), randn(rng, n, cb, 2 * h, 2 * w)
    xa[0, 0, 0, :2] = [np.nan, -0.0]
    wt = randn(rng, cout, ca + cb, 3, 3)
    wt[0, 0, 1:, 1:] = [[1, 2.0 ** -24], [2.0 ** -24, 0]]
    return xa, xb, wt, randn(rng, cout)


def test_conv_of_an_upsampled_input_is_the_conv_of_its_copy_in_float64(rng):
    xa, xb, wt, b = upsampled_case(rng, (2, 3, 2, 4, 5, 9))
    xa[0, 0, 0, 0] = 1
    got = R.conv2d_forward(xa, wt, b, x2=xb, upsampled=True)
    want = conv64(np.concatenate([np.repeat(np.repeat(xa, 2, 2), 2, 3), xb], axis=1), wt, b)
    assert rel_err(got, want) < 1e-6
    assert not same_bits(got, R.conv2d_forward(R.upsample2x_forward(xa), wt, b, x2=xb))


# (N, Ca, Cb, Cout, h, w: x is h x w, x2 and the output 2h x 2w): over several blocks of
# 32 x 64 (and the third case's rows and columns past a block's edge), odd h and w, phase
# weights in groups (96 channels)
UPSAMPLED_SMALL = [(2, 2, 3, 4, 5, 9), (1, 1, 1, 2, 9, 33), (1, 5, 3, 8, 3, 4)]
UPSAMPLED_LARGE = [(1, 48, 48, 48, 67, 101), (2, 96, 1, 64, 45, 70)]


@pytest.mark.parametrize("shape", shape_cases(UPSAMPLED_SMALL, UPSAMPLED_LARGE))
def test_conv_of_an_upsampled_input_equals_reference(rng, shape):
    from cryokern import cpu as C
    n, ca, cb, cout, h, w = shape
    xa, xb, wt, b = upsampled_case(rng, shape)
    want = R.conv2d_forward(xa, wt, b, leaky_slope=0.1, x2=xb, upsampled=True)
    if n * ca * h * w <= 1000:      # (the compiled CPU backend at the simulator's sizes)
        assert same_bits_nan_positions(C.conv2d_forward(xa, wt, b, leaky_slope=0.1, x2=xb,
                                                        upsampled=True), want)
    out = poisoned((n, cout, 2 * h, 2 * w))
    K.conv2d_forward(dev(xa), dev(wt), dev(b), leaky_slope=0.1, out=out, x2=dev(xb),
                     upsampled=True)
    assert same_bits_nan_positions(out.copy_to_host(), want)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_phase_weights_staged_in_groups_give_the_chains_of_one_group(rng, group):
    """The phase kernel stages its weights in groups of input channels where all do not fit
    (the N2N U-Net's 96, in groups of 32): groups of 1, 2 (the last ragged) and 4 of 5
    channels, the bits of all at once."""
    from cryokern.kernels.phase_conv import launch_phase_chains
    xa, _, wt, b = upsampled_case(rng, (1, 5, 3, 8, 3, 4))
    outs = []
    for variant in ({}, {"channel_group": group}):
        out = poisoned((1, 8, 6, 8))
        launch_phase_chains(dev(xa), dev(wt), dev(b), out, **variant)
        outs.append(out.copy_to_host())
    assert same_bits(outs[1], outs[0])


def test_phase_geometries_give_the_same_chains(rng):
    """The phase kernel's geometry (8 or 16 output channels a block here) moves no bit; the
    48-wide U-Net's 48 upsampled channels take the smaller blocks, whose weights fit at once,
    the N2N U-Net's 96 the default's, in groups (phase_conv.phase_geometry)."""
    from cryokern.kernels import phase_conv as P
    assert P.phase_geometry(48) == P.PHASE_GEOMETRY_WHOLE != P.PHASE_GEOMETRY
    assert P.phase_geometry(96) == P.PHASE_GEOMETRY and P.phase_geometry(8) == P.PHASE_GEOMETRY
    xa, _, wt, b = upsampled_case(rng, (1, 5, 3, 12, 3, 4))
    outs = []
    for geometry in (P.PHASE_GEOMETRY, P.PHASE_GEOMETRY_WHOLE):
        out = poisoned((1, 12, 6, 8))
        P.launch_phase_chains(dev(xa), dev(wt), dev(b), out, geometry=geometry)
        outs.append(out.copy_to_host())
    assert same_bits(outs[1], outs[0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "kernels"])
def test_an_upsampled_input_needs_a_second_input_of_twice_its_size(rng, backend):
    from cryokern import cpu as C
    be = {"reference": R, "cpu": C, "kernels": K}[backend]
    put = dev if backend == "kernels" else (lambda a: a)
    xa, wt, b = randn(rng, 1, 2, 4, 6), randn(rng, 3, 4, 3, 3), randn(rng, 3)
    with pytest.raises(ValueError, match="beside x2"):
        be.conv2d_forward(put(xa), put(randn(rng, 3, 2, 3, 3)), put(b), upsampled=True)
    with pytest.raises(ValueError, match="differ in batch or image size"):
        be.conv2d_forward(put(xa), put(wt), put(b), x2=put(randn(rng, 1, 2, 4, 6)),
                          upsampled=True)


# convolutions of a concatenation without the copy (N, Ca, Cb, Cout, H, W): x2's channels
# after x's forward and in the weight gradients, the input gradient split into two arrays;
# the third case takes the weight gradients' precomputed-address path (Cin * Cout >= 64)
TWO_SMALL = [(2, 2, 3, 4, 13, 17), (1, 1, 1, 2, 18, 66), (1, 5, 3, 8, 5, 7)]
TWO_LARGE = [(1, 48, 48, 48, 67, 101), (2, 16, 8, 8, 131, 197)]


@pytest.mark.parametrize("shape", shape_cases(TWO_SMALL, TWO_LARGE))
def test_conv_of_two_inputs_equals_conv_of_concatenation(rng, shape):
    n, ca, cb, cout, h, w = shape
    xa, xb = randn(rng, n, ca, h, w), randn(rng, n, cb, h, w)
    wt, b, gy = randn(rng, cout, ca + cb, 3, 3), randn(rng, cout), randn(rng, n, cout, h, w)
    cat = np.concatenate([xa, xb], axis=1)
    want = R.conv2d_forward(cat, wt, b, leaky_slope=0.1)
    assert same_bits(R.conv2d_forward(xa, wt, b, leaky_slope=0.1, x2=xb), want)
    out = poisoned((n, cout, h, w))
    K.conv2d_forward(dev(xa), dev(wt), dev(b), leaky_slope=0.1, out=out, x2=dev(xb))
    assert same_device_bits(out, want)
    gx = R.conv2d_backward_data(gy, wt)
    ga, gb = R.conv2d_backward_data(gy, wt, split=ca)
    assert same_bits(ga, gx[:, :ca]) and same_bits(gb, gx[:, ca:])
    parts = poisoned(xa.shape), poisoned(xb.shape)
    K.conv2d_backward_data(dev(gy), dev(wt), out=parts, split=ca)
    assert same_device_bits(parts[0], ga) and same_device_bits(parts[1], gb)
    gw, gbias = R.conv2d_backward_weights(gy, cat)
    got = R.conv2d_backward_weights(gy, xa, x2=xb)
    assert same_bits(got[0], gw) and same_bits(got[1], gbias)
    outs = poisoned(gw.shape), poisoned(gbias.shape)
    K.conv2d_backward_weights(dev(gy), dev(xa), out=outs, x2=dev(xb))
    assert same_device_bits(outs[0], gw) and same_device_bits(outs[1], gbias)
