"""The U-Net (model.UNet, numerics §14): its description, forward pass and training step.

The reference's forward pass and gradients against an independent float64 U-Net (formulas and
central differences); the GPU backend (simulator here) against the reference, bit for bit, for
whole steps with SGD and Adam, with and without the residual, on images that need padding."""
import numpy as np
import pytest

from conftest import bits
from cryokern.backends import get_backend
from cryokern.model import Network, UNet, forward, init_params
from cryokern.step import OptimizerConfig, TrainStep
from float64_math import conv64, rel_err

SMALL = UNet((2, 3, 4))                   # two poolings, a few channels: cheap to differentiate


def test_description_names_every_convolution_in_forward_order():
    net = UNet((4, 6, 8, 8), residual=True)
    assert net.levels == 3 and net.padded_size(33, 48) == (40, 48)
    convs = net.convolutions()
    assert [c[0] for c in convs] == [
        "enc.0.conv0", "enc.0.conv1", "enc.1.conv0", "enc.1.conv1", "enc.2.conv0",
        "enc.2.conv1", "enc.3.conv0", "enc.3.conv1", "dec.2.conv0", "dec.2.conv1",
        "dec.1.conv0", "dec.1.conv1", "dec.0.conv0", "dec.0.conv1", "out"]
    shapes = net.param_shapes()
    assert shapes["enc.0.conv0.weight"] == (4, 1, 3, 3)
    assert shapes["dec.2.conv0.weight"] == (8, 8 + 8, 3, 3)    # upsampled bottom, then skip
    assert shapes["dec.0.conv0.weight"] == (4, 6 + 4, 3, 3)
    assert shapes["out.weight"] == (1, 4, 3, 3) and shapes["out.bias"] == (1,)
    assert net.param_count() == sum(int(np.prod(s)) for s in shapes.values())
    p = init_params(net, seed=3)
    assert set(p) == set(shapes) and all(p[k].shape == shapes[k] for k in p)
    assert all(np.array_equal(p[k], init_params(net, seed=3)[k]) for k in p)


def test_description_refuses_bad_options():
    with pytest.raises(ValueError, match="residual"):
        UNet((4, 4), out_channels=2, residual=True)
    with pytest.raises(ValueError, match="two positive widths"):
        UNet((4,))
    with pytest.raises(ValueError, match="slope"):
        UNet((4, 4), leaky_slope=0.0)


def test_chain_initialization_is_unchanged():
    """The chain draws its parameters as before the U-Net (same generator calls, same order)."""
    net = Network()
    rng = np.random.default_rng(11)
    p = init_params(net, seed=11)
    for i, (cin, cout) in enumerate(zip(net.channels, net.channels[1:])):
        bound = 1.0 / np.sqrt(cin * 9)
        assert np.array_equal(p[f"layers.{i}.weight"],
                              rng.uniform(-bound, bound, (cout, cin, 3, 3)).astype(np.float32))
        assert np.array_equal(p[f"layers.{i}.bias"],
                              rng.uniform(-bound, bound, cout).astype(np.float32))


# --- an independent float64 U-Net ---------------------------------------------------------------

def unet64(net, params, x):
    """The U-Net of the model's docstring, in float64 from the textbook operations."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    slope = np.float64(net.leaky_slope)
    n, _, h, w = x.shape
    hp, wp = net.padded_size(h, w)
    v = np.zeros((n, x.shape[1], hp, wp))
    v[:, :, :h, :w] = x

    def conv(prefix, a, leaky=True):
        y = conv64(a, p[f"{prefix}.weight"], p[f"{prefix}.bias"])
        return np.where(y > 0, y, slope * y) if leaky else y

    skips, a = [], v
    for level in range(net.levels + 1):
        if level > 0:
            m, c, hh, ww = a.shape
            a = a.reshape(m, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
        a = conv(f"enc.{level}.conv1", conv(f"enc.{level}.conv0", a))
        skips.append(a)
    for level in reversed(range(net.levels)):
        up = np.kron(a, np.ones((2, 2)))
        a = np.concatenate([up, skips[level]], axis=1)
        a = conv(f"dec.{level}.conv1", conv(f"dec.{level}.conv0", a))
    out = conv("out", a, leaky=False)
    if net.residual:
        out = out + v
    return out[:, :, :h, :w]


def batch(seed, shape):
    rng = np.random.default_rng(seed)
    clean = rng.random(shape).astype(np.float32)
    return (clean + 0.3 * rng.standard_normal(shape)).astype(np.float32), clean


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("size", [(8, 12), (7, 9)])            # the second needs padding
def test_reference_forward_equals_float64_unet(residual, size):
    net = UNet((2, 3, 4), residual=residual)
    params = init_params(net, seed=1)
    x, _ = batch(0, (2, 1) + size)
    got = forward(get_backend("reference"), net, params, x)
    assert got.shape == x.shape
    assert rel_err(got, unet64(net, params, x)) < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_reference_step_gradient_equals_finite_differences(residual):
    """Every parameter's gradient from one step (lr 0: the step leaves them in .grads) against
    central differences of the float64 U-Net's mean squared error."""
    net = UNet((2, 3, 4), residual=residual)
    params = init_params(net, seed=2)
    x, target = batch(1, (2, 1, 7, 9))
    trainer = TrainStep(get_backend("reference"), net, params, OptimizerConfig("sgd", lr=0.0))
    trainer(x, target)

    def loss(p):
        return np.mean((unet64(net, p, x) - target.astype(np.float64)) ** 2)

    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    eps = 1e-6
    for name, value in p64.items():
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            keep = value[i]
            value[i] = keep + eps
            up = loss(p64)
            value[i] = keep - eps
            down = loss(p64)
            value[i] = keep
            fd[i] = (up - down) / (2 * eps)
        assert rel_err(trainer.grads[name], fd) < 1e-4, name


def test_reference_steps_in_passes_equal_one_pass_and_loss_equals_forward():
    """Passes of one image give the bits of one pass (per-image float64 sums, numerics §4);
    the validation loss is the loss of the forward pass's output."""
    net = UNet((2, 3, 4), residual=True)
    params = init_params(net, seed=8)
    be = get_backend("reference")
    opt = OptimizerConfig("adam", lr=1e-2)
    whole = TrainStep(be, net, params, opt)
    split = TrainStep(be, net, params, opt, pass_pixels=7 * 10)
    for step in range(2):
        noisy, clean = batch(10 + step, (3, 1, 7, 10))
        assert whole(noisy, clean) == split(noisy, clean)
    for name, value in whole.host_params().items():
        assert np.array_equal(bits(split.host_params()[name]), bits(value)), name
    noisy, clean = batch(20, (3, 1, 7, 10))
    pred = forward(be, net, whole.host_params(), noisy)
    assert whole.loss(noisy, clean) == be.mse_loss(pred, clean)
    with pytest.raises(ValueError, match="does not fit"):
        whole(noisy, clean[:, :, :6])


# --- the GPU backend against the reference, bit for bit ------------------------------------------

def steps_equal_reference(net, opt, shape, steps=2, seed=4):
    params = init_params(net, seed=seed)
    gpu = TrainStep(get_backend("gpu"), net, params, opt)
    ref = TrainStep(get_backend("reference"), net, params, opt)
    for step in range(steps):
        noisy, clean = batch(seed + step, shape)
        assert gpu(noisy, clean) == ref(noisy, clean), step
    for name, value in ref.host_params().items():
        assert np.array_equal(bits(gpu.host_params()[name]), bits(value)), name
    for name, value in ref.host_state().items():
        assert np.array_equal(bits(gpu.host_state()[name]), bits(value)), name


@pytest.mark.parametrize("opt,residual,shape", [
    pytest.param(OptimizerConfig("sgd", lr=0.05, momentum=0.9), True, (1, 1, 7, 10),
                 id="sgd-residual"),
    pytest.param(OptimizerConfig("adam", lr=1e-3), False, (2, 1, 7, 10), id="adam-plain")])
def test_gpu_steps_equal_reference_small(opt, residual, shape):
    """Simulator-sized: two levels, padding (7 x 10 -> 8 x 12). The simulator runs every thread
    of every block (about a minute for a step of one image, two for two), so each optimizer
    and each residual setting once here; the GPU cases below run the other pairings."""
    steps_equal_reference(UNet((2, 3, 4), residual=residual), opt, shape, steps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("opt,residual,widths,shape,steps", [
    pytest.param(OptimizerConfig("sgd", lr=0.05, momentum=0.9), False, (8, 8, 8, 8),
                 (2, 1, 512, 768), 1, id="sgd-plain-512x768"),
    pytest.param(OptimizerConfig("adam", lr=1e-3), True, (8, 8, 8, 8), (2, 1, 131, 197), 2,
                 id="adam-residual-odd"),
    pytest.param(OptimizerConfig("adam", lr=1e-3), True, (48, 48, 48, 48), (2, 1, 64, 96), 1,
                 id="adam-residual-48-wide"),
    pytest.param(OptimizerConfig("sgd", lr=0.05), False, (48, 48, 48, 48), (1, 1, 45, 70), 2,
                 id="sgd-plain-48-wide-odd")])
def test_gpu_steps_equal_reference(opt, residual, widths, shape, steps):
    """Three levels: block and tile seams of every kernel at every level, padded odd sides,
    and the U-Net's 48-channel layers (the reference's speed bounds the sizes; two widths
    only, so that a GPU run compiles few kernels)."""
    steps_equal_reference(UNet(widths, residual=residual), opt, shape, steps=steps)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("network", [UNet((8, 8, 8, 8)), UNet((8, 8, 8, 8), residual=True),
                                     Network((1, 4, 4, 1))], ids=["plain", "residual", "chain"])
def test_one_step_matches_pytorch_float64(network, device):
    """The step's forward output, loss and gradients within 1e-5 (relative) of PyTorch's
    float64 autograd of the same network (cryokern.torch_mirror; padded odd sides), on the
    compiled CPU backend and on the GPU."""
    torch = pytest.importorskip("torch")
    from cryokern.torch_mirror import torch_network
    params = init_params(network, seed=5)
    noisy, clean = batch(7, (2, 1, 67, 91))
    backend = get_backend(device)
    trainer = TrainStep(backend, network, params, OptimizerConfig("sgd", lr=0.0))
    sse, count = trainer(noisy, clean)
    mirror = torch_network(network, params, dtype=torch.float64)
    y = mirror(torch.tensor(noisy, dtype=torch.float64))
    got = backend.to_host(forward(backend, network, trainer.params, backend.to_device(noisy)))
    assert rel_err(got, y.detach().numpy()) < 1e-5
    loss = ((y - torch.tensor(clean, dtype=torch.float64)) ** 2).mean()
    loss.backward()
    assert abs(sse / count - loss.item()) / loss.item() < 1e-5
    grads = dict(mirror.named_parameters())
    assert set(grads) == set(trainer.grads)
    for name, g in trainer.grads.items():
        assert rel_err(backend.to_host(g), grads[name].grad.numpy()) < 1e-5, name


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gpu_forward_equals_reference(residual):
    """model.forward allocating its own arrays, on the GPU backend (one level, padded 5 x 7)."""
    net = UNet((2, 3), residual=residual)
    params = init_params(net, seed=6)
    x, _ = batch(2, (1, 1, 5, 7))
    gpu = get_backend("gpu")
    got = forward(gpu, net, {k: gpu.to_device(v) for k, v in params.items()}, gpu.to_device(x))
    want = forward(get_backend("reference"), net, params, x)
    assert got.shape == x.shape and np.array_equal(bits(gpu.to_host(got)), bits(want))
