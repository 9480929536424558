"""The Noise2Noise paper's U-Net (model.N2NUNet, numerics §15): its description against the
paper's table, its forward pass and gradients against independent float64 math, whole training
steps bit for bit on every backend, its receptive radius against the brute-force dependence,
tiled denoising, and --arch n2n through a checkpoint."""
import json
import os

import numpy as np
import pytest

from conftest import bits
from float64_math import conv64, rel_err
from test_inference import _OwnerCheckingBackend
from test_unet_ops import dev, poisoned, randn, same_device_bits, shape_cases
from test_train import data_args, make_pair, npz
from test_unet_step import batch
from cryokern import denoise as D
from cryokern import evaluate as E
from cryokern import train as T
from cryokern.backends import get_backend
from cryokern.inference import Model, TiledDenoiser, load_model, strips
from cryokern.model import N2NUNet, forward, init_params, network_from_description
from cryokern.step import OptimizerConfig, TrainStep

SMALL = N2NUNet(levels=2, enc_width=2, dec_width=3, head_widths=(3, 2))


def test_the_default_is_the_papers_table():
    """Lehtinen et al. 2018, appendix: n = m = 1; 359 GFLOP per 1024^2 forward (the issue's)."""
    net = N2NUNet()
    table = [("enc_conv0", 1, 48), ("enc_conv1", 48, 48)] + \
        [(f"enc_conv{k}", 48, 48) for k in range(2, 7)] + \
        [("dec_conv5a", 96, 96), ("dec_conv5b", 96, 96)] + \
        [x for k in (4, 3, 2) for x in ((f"dec_conv{k}a", 144, 96), (f"dec_conv{k}b", 96, 96))] + \
        [("dec_conv1a", 97, 64), ("dec_conv1b", 64, 32), ("dec_conv1c", 32, 1)]
    assert net.convolutions() == table
    levels = [net.level_of(name) for name, _, _ in table]
    assert levels == [0, 0, 1, 2, 3, 4, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0]
    flops = sum(2 * 9 * cin * cout * (1024 >> lv) ** 2
                for (_, cin, cout), lv in zip(table, levels))
    assert round(flops / 1e9) == 359
    shapes = net.activation_shapes(1, 1024, 1024)
    assert shapes["pool.5"] == shapes["enc_conv6"] == (1, 48, 32, 32)
    assert shapes["up.4"] == (1, 48, 64, 64) and shapes["up.0"] == (1, 96, 1024, 1024)
    assert net.padded_size(1000, 1030) == (1024, 1056) and "input" not in shapes
    assert network_from_description(json.loads(json.dumps(net.describe()))) == net
    small = N2NUNet(2, 4, 6, (5,), residual=True, leaky_slope=0.2)
    assert network_from_description(json.loads(json.dumps(small.describe()))) == small
    assert [c[0] for c in small.convolutions()][-2:] == ["dec_conv1a", "dec_conv1b"]


def test_description_refuses_bad_options():
    with pytest.raises(ValueError, match="residual"):
        N2NUNet(out_channels=2, residual=True)
    with pytest.raises(ValueError, match="at least one pooling"):
        N2NUNet(levels=0)
    with pytest.raises(ValueError, match="slope"):
        N2NUNet(leaky_slope=-1.0)


# --- the concatenation's gradient, first part only (numerics §12) ------------------------------

# (N, Ca, Cb, Cout, H, W): only the first Ca input channels' gradient; the paper's level-0
# concatenation (96 + 1 -> 64) and its widest (96 + 48 -> 96) on the GPU
FIRST_SMALL = [(1, 3, 1, 4, 5, 7), (2, 2, 3, 5, 6, 4)]
FIRST_LARGE = [(1, 96, 1, 64, 67, 101), (1, 96, 48, 96, 45, 70)]


@pytest.mark.parametrize("shape", shape_cases(FIRST_SMALL, FIRST_LARGE))
def test_backward_data_of_the_first_part_only_is_the_splits_first_part(rng, shape):
    """Every backend: the split's first part, bit for bit, the second not written."""
    from cryokern import cpu
    from cryokern import kernels as K
    from cryokern import reference as R
    n, ca, cb, cout, h, w = shape
    wt, gy = randn(rng, cout, ca + cb, 3, 3), randn(rng, n, cout, h, w)
    want, _ = R.conv2d_backward_data(gy, wt, split=ca)
    for ops in (R, cpu):
        out = np.full((n, ca, h, w), np.nan, np.float32)
        assert ops.conv2d_backward_data(gy, wt, out=(out, None), split=ca)[1] is None
        assert np.array_equal(bits(out), bits(want)), ops.__name__
    out = poisoned((n, ca, h, w))
    assert K.conv2d_backward_data(dev(gy), dev(wt), out=(out, None), split=ca)[1] is None
    assert same_device_bits(out, want)


# --- an independent float64 network ----------------------------------------------------------

def n2n64(net, params, x):
    """The paper's table in float64 from the textbook operations."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    slope = np.float64(net.leaky_slope)
    n, c, h, w = x.shape
    hp, wp = net.padded_size(h, w)
    v = np.zeros((n, c, hp, wp))
    v[:, :, :h, :w] = x

    def conv(name, a, leaky=True):
        y = conv64(a, p[f"{name}.weight"], p[f"{name}.bias"])
        return np.where(y > 0, y, slope * y) if leaky else y

    def pool(a):
        m, k, hh, ww = a.shape
        return a.reshape(m, k, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))

    a = conv("enc_conv1", conv("enc_conv0", v))
    inputs = [v]
    for level in range(1, net.levels + 1):
        a = pool(a)
        inputs.append(a)
        a = conv(f"enc_conv{level + 1}", a)
    for level in reversed(range(net.levels)):
        a = np.concatenate([np.kron(a, np.ones((2, 2))), inputs[level]], axis=1)
        if level:
            a = conv(f"dec_conv{level + 1}b", conv(f"dec_conv{level + 1}a", a))
    names = [name for name, _ in net.head()]
    for name in names[:-1]:
        a = conv(name, a)
    out = conv(names[-1], a, leaky=False)
    if net.residual:
        out = out + v
    return out[:, :, :h, :w]


def small(residual=False, **kwargs):
    return N2NUNet(**{**dict(levels=2, enc_width=2, dec_width=3, head_widths=(3, 2)), **kwargs},
                   residual=residual)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("size", [(8, 12), (7, 9)])            # the second needs padding
def test_reference_forward_equals_float64(residual, size):
    net = small(residual)
    params = init_params(net, seed=1)
    x, _ = batch(0, (2, 1) + size)
    got = forward(get_backend("reference"), net, params, x)
    assert got.shape == x.shape
    assert rel_err(got, n2n64(net, params, x)) < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_reference_step_gradient_equals_finite_differences(residual):
    """Every parameter's gradient (four entries of each weight, every bias) from one step
    against central differences of the float64 network's mean squared error."""
    net = small(residual)
    params = init_params(net, seed=2)
    x, target = batch(1, (2, 1, 7, 9))
    trainer = TrainStep(get_backend("reference"), net, params, OptimizerConfig("sgd", lr=0.0))
    trainer(x, target)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    rng = np.random.default_rng(0)

    def loss():
        return np.mean((n2n64(net, p64, x) - target.astype(np.float64)) ** 2)

    for name, value in p64.items():
        flat = value.reshape(-1)
        picks = range(flat.size) if value.ndim == 1 else rng.choice(flat.size, 4, replace=False)
        got = trainer.grads[name].reshape(-1)
        for i in picks:
            keep = flat[i]
            flat[i] = keep + 1e-6
            up = loss()
            flat[i] = keep - 1e-6
            down = loss()
            flat[i] = keep
            fd = (up - down) / 2e-6
            assert abs(got[i] - fd) <= 1e-4 * max(abs(fd), 1e-3), (name, i)


# --- whole steps, bit for bit ----------------------------------------------------------------

def steps_equal_reference(device, net, opt, shape, steps=2, seed=4, pass_pixels=None):
    params = init_params(net, seed=seed)
    other = TrainStep(get_backend(device), net, params, opt, pass_pixels=pass_pixels)
    ref = TrainStep(get_backend("reference"), net, params, opt)
    for step in range(steps):
        noisy, clean = batch(seed + step, shape)
        assert other(noisy, clean) == ref(noisy, clean), step
    for name, value in ref.host_params().items():
        assert np.array_equal(bits(other.host_params()[name]), bits(value)), name
    for name, value in ref.host_state().items():
        assert np.array_equal(bits(other.host_state()[name]), bits(value)), name


CASES = [pytest.param(OptimizerConfig("sgd", lr=0.05, momentum=0.9), True, id="sgd-residual"),
         pytest.param(OptimizerConfig("adam", lr=1e-3), False, id="adam-plain")]


@pytest.mark.parametrize("opt,residual", CASES)
def test_cpu_steps_equal_reference(opt, residual):
    """Padded sides (7 x 10 -> 8 x 12), two steps, the CPU's batch in passes of one image."""
    steps_equal_reference("cpu", small(residual), opt, (2, 1, 7, 10), pass_pixels=70)


@pytest.mark.parametrize("opt,residual", CASES)
def test_gpu_steps_equal_reference_small(opt, residual):
    """The kernels (numba's simulator here), two poolings on padded sides: both
    concatenations' gradients (the skip's, and at level 0 the first part only) and pool.1's
    two parts added."""
    steps_equal_reference("gpu", small(residual), opt, (1, 1, 7, 10), steps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("opt,residual,net,shape,steps", [
    pytest.param(OptimizerConfig("sgd", lr=0.05, momentum=0.9), False,
                 N2NUNet(3, 8, 12, (8, 4)), (2, 1, 131, 197), 2, id="sgd-plain-odd"),
    pytest.param(OptimizerConfig("adam", lr=1e-3), True, N2NUNet(3), (1, 1, 64, 96), 1,
                 id="adam-residual-paper-widths"),
    pytest.param(OptimizerConfig("adam", lr=1e-3), False, small(), (2, 1, 7, 10), 2,
                 id="adam-plain-two-levels")])
def test_gpu_steps_equal_reference(opt, residual, net, shape, steps):
    net = N2NUNet(net.levels, net.enc_width, net.dec_width, net.head_widths, residual=residual)
    steps_equal_reference("gpu", net, opt, shape, steps=steps)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_one_step_matches_pytorch_float64(residual, device):
    """Forward output, loss and every gradient within 1e-5 (relative) of PyTorch's float64
    autograd of cryokern.torch_mirror's module (padded odd sides, three poolings)."""
    torch = pytest.importorskip("torch")
    from cryokern.torch_mirror import torch_network
    network = N2NUNet(3, 6, 8, (6, 4), residual=residual)
    params = init_params(network, seed=5)
    noisy, clean = batch(7, (2, 1, 37, 45))
    backend = get_backend(device)
    trainer = TrainStep(backend, network, params, OptimizerConfig("sgd", lr=0.0))
    sse, count = trainer(noisy, clean)
    mirror = torch_network(network, params, dtype=torch.float64)
    y = mirror(torch.tensor(noisy, dtype=torch.float64))
    got = backend.to_host(forward(backend, network, trainer.params, backend.to_device(noisy)))
    assert rel_err(got, y.detach().numpy()) < 1e-5
    assert rel_err(got, n2n64(network, params, noisy)) < 1e-5
    loss = ((y - torch.tensor(clean, dtype=torch.float64)) ** 2).mean()
    loss.backward()
    assert abs(sse / count - loss.item()) / loss.item() < 1e-5
    grads = dict(mirror.named_parameters())
    assert set(grads) == set(trainer.grads)
    for name, g in trainer.grads.items():
        assert rel_err(backend.to_host(g), grads[name].grad.numpy()) < 1e-5, name


# --- the receptive radius, brute force ---------------------------------------------------------

class _Dependence:
    """A backend of boolean arrays: each operation's output is True where it depends on a True
    input (a 3x3 convolution: any channel within one pixel; pooling: the window; upsampling:
    the pixel it copies; the rest elementwise), so that model.forward computes which outputs
    depend on the input's True pixels, whatever the weights' values."""

    @staticmethod
    def empty(shape):
        return np.zeros(shape, bool)

    @staticmethod
    def _put(value, out):
        if out is None:
            return value
        out[...] = value
        return out

    def conv2d_forward(self, x, w, b, out=None, x2=None, leaky_slope=None, upsampled=False):
        if upsampled:
            x = self.upsample2x_forward(x)
        any_in = x.any(axis=1) | (False if x2 is None else x2.any(axis=1))
        padded = np.pad(any_in, ((0, 0), (1, 1), (1, 1)))
        h, wd = any_in.shape[1:]
        near = np.zeros_like(any_in)
        for dy in range(3):
            for dx in range(3):
                near |= padded[:, dy:dy + h, dx:dx + wd]
        return self._put(np.repeat(near[:, None], w.shape[0], axis=1), out)

    def maxpool2x2_forward(self, x, out=None):
        n, c, h, w = x.shape
        return self._put(x.reshape(n, c, h // 2, 2, w // 2, 2).any(axis=(3, 5)), out)

    def upsample2x_forward(self, x, out=None):
        return self._put(x.repeat(2, axis=2).repeat(2, axis=3), out)

    def pad_zeros(self, x, height, width, out=None):
        y = np.zeros(x.shape[:2] + (height, width), bool)
        y[:, :, :x.shape[2], :x.shape[3]] = x
        return self._put(y, out)

    def crop(self, x, height, width, out=None):
        return self._put(x[:, :, :height, :width], out)

    def add(self, a, b, out=None):
        return self._put(a | b, out)


@pytest.mark.parametrize("net", [N2NUNet(1, 2, 2, (2, 2)), N2NUNet(2, 2, 2, (2, 2)),
                                 N2NUNet(3, 2, 2, (2, 2)), N2NUNet(2, 2, 2, (2,)),
                                 N2NUNet(2, 2, 2, (2, 2, 2, 2)), N2NUNet(3, 2, 2, (2, 2, 2))],
                         ids=["1", "2", "3", "2-short-head", "2-long-head", "3-head-4"])
def test_receptive_radius_is_the_brute_force_reach(net):
    """One input row True at a time: the rows of output a grid block depends on reach exactly
    receptive_radius rows beyond the block, on either side."""
    grid = net.row_grid
    height = 2 * net.receptive_radius + 5 * grid
    block = (height // grid // 2) * grid            # a block in the middle
    params = {k: np.zeros(s, bool) for k, s in net.param_shapes().items()}
    reach = []
    for row in range(height):
        x = np.zeros((1, 1, height, 3), bool)
        x[0, 0, row] = True
        y = forward(_Dependence(), net, params, x)
        if y[0, 0, block:block + grid].any():
            reach.append(row)
    assert block - reach[0] == reach[-1] - (block + grid - 1) == net.receptive_radius


def test_the_papers_receptive_radius():
    assert N2NUNet().receptive_radius == 128 and N2NUNet(2).receptive_radius == 16


# --- tiled denoising ---------------------------------------------------------------------------

def n2n_model(residual=False, seed=2, **kwargs):
    net = small(residual, **kwargs)
    return Model("m.npz", net, init_params(net, seed), "per-image")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("tile", [4, 21])
def test_tiles_are_bit_identical_to_the_whole_image(rng, residual, tile):
    image = rng.standard_normal((61, 43)).astype(np.float32)
    be = get_backend("cpu")
    m = n2n_model(residual)
    whole = TiledDenoiser(m, be, tile=0)(image)
    tiled = TiledDenoiser(m, be, tile=tile)
    assert tiled.halo == m.network.receptive_radius == 16
    assert len(list(strips(image.shape, tile, tiled.halo, tiled.grid))) > 1
    assert np.array_equal(bits(tiled(image)), bits(whole))
    params = {k: be.to_device(v) for k, v in m.params.items()}
    apart = forward(be, m.network, params, be.to_device(image[None, None]))
    assert np.array_equal(bits(whole), bits(be.to_host(apart)[0, 0]))


def test_tiles_on_the_gpu_backend_equal_the_reference_whole_image(rng):
    """Device arrays carved from one flat buffer per strip (simulator-sized: one pooling)."""
    image = rng.standard_normal((21, 4)).astype(np.float32)
    m = n2n_model(True, levels=1, enc_width=2, head_widths=(2,))
    whole = TiledDenoiser(m, get_backend("reference"), tile=0)(image)
    tiled = TiledDenoiser(m, get_backend("gpu"), tile=4)
    assert len(list(strips(image.shape, 4, tiled.halo, tiled.grid))) == 6
    assert np.array_equal(bits(tiled(image)), bits(whole))


@pytest.mark.gpu
def test_gpu_tiles_of_the_papers_network_equal_the_whole_image(rng):
    image = rng.standard_normal((700, 333)).astype(np.float32)
    net = N2NUNet(residual=True)
    m = Model("m.npz", net, init_params(net, 4), "per-image")
    whole = TiledDenoiser(m, get_backend("gpu"), tile=0)(image)
    for tile in (64, 300):
        assert np.array_equal(bits(TiledDenoiser(m, get_backend("gpu"), tile=tile)(image)),
                              bits(whole)), tile


def test_a_halo_one_grid_short_of_the_radius_changes_the_bits(rng):
    image = rng.standard_normal((90, 20)).astype(np.float32)
    be = get_backend("cpu")
    m = n2n_model(levels=3)
    whole = TiledDenoiser(m, be, tile=0)(image)
    short = TiledDenoiser(m, be, tile=8, halo=m.network.receptive_radius - m.network.row_grid)
    assert not np.array_equal(bits(short(image)), bits(whole))


@pytest.mark.parametrize("residual", [False, True])
def test_arrays_share_memory_only_after_their_last_read(residual):
    be = get_backend("cpu")
    m = n2n_model(residual, head_widths=(4,))
    tiled = TiledDenoiser(m, be, tile=0)
    x, acts = tiled._unet_buffers(29, 35)
    params = {k: be.to_device(v) for k, v in m.params.items()}
    forward(_OwnerCheckingBackend(be, tiled._flat, acts), m.network, params, x, acts)


def test_denoising_holds_fewer_floats_than_every_array():
    """The paper's widths, a 1024 x 4096 window: ~240 floats a pixel, not ~416."""
    net = N2NUNet()
    home, sizes = net.inference_buffers(1, 1024, 4096)
    every = sum(int(np.prod(s)) for s in net.activation_shapes(1, 1024, 4096).values())
    assert set(home.values()) == set(sizes)
    assert sum(sizes.values()) / (1024 * 4096) < 241 and every / (1024 * 4096) > 416


# --- --arch n2n through a checkpoint -----------------------------------------------------------

def test_arch_n2n_trains_and_its_checkpoint_denoises(tmp_path):
    """The paper's network (five poolings: 24 x 40 padded to 32 x 64), one epoch on the CPU;
    the checkpoint rebuilds it, denoising it equals the trained parameters' forward, and the
    denoise and evaluate commands load it."""
    pair = make_pair(tmp_path, n=3, shape=(24, 40))
    out = str(tmp_path / "run")
    args = data_args(pair) + ["--arch", "n2n", "--residual", "--epochs", "1", "--batch-size",
                              "2", "--val-fraction", "0.34", "--optimizer", "adam",
                              "--device", "cpu", "--out", out]
    assert T.main(args) == 0
    meta = json.loads(str(npz(os.path.join(out, "last.npz"))["meta"]))
    assert meta["network"]["kind"] == "n2n"
    model = load_model(os.path.join(out, "last.npz"))
    assert model.network == N2NUNet(residual=True)
    image = np.random.default_rng(3).standard_normal((24, 40)).astype(np.float32)
    be = get_backend("cpu")
    want = forward(be, model.network, model.params, image[None, None])[0, 0]
    assert np.array_equal(bits(TiledDenoiser(model, be, tile=0)(image)), bits(want))
    noisy, clean = pair
    assert D.main([os.path.join(out, "last.npz"), noisy, "-o", str(tmp_path / "den"),
                   "--device", "cpu"]) == 0
    assert (tmp_path / "den" / os.path.basename(noisy)).exists()
    report = tmp_path / "r.json"
    assert E.main([os.path.join(out, "last.npz"), "--noisy", noisy, "--clean", clean,
                   "--json", str(report), "--device", "cpu"]) == 0
    assert json.loads(report.read_text())["network"]["kind"] == "n2n"


@pytest.mark.parametrize("args, message", [
    (["--arch", "n2n", "--unet-widths", "4,8"], "--unet-widths shapes another network"),
    (["--arch", "n2n", "--channels", "1,4,1"], "--channels shapes another network")])
def test_other_architectures_options_exit_2_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert T.main(args + ["--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()
