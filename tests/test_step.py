"""The model layer: parameters, initialization, and whole training steps on the reference."""
import numpy as np
import pytest

from conftest import bits
from cryokern.backends import get_backend
from cryokern.model import N2NUNet, Network, UNet, forward, init_params
from cryokern.step import (DEFAULT_PASS_BYTES, OptimizerConfig, TrainStep, pass_pixels_for,
                            workspace_bytes)


def test_default_network_has_2625_parameters():
    net = Network()
    assert net.param_count() == 2625
    assert list(net.param_shapes()) == ["layers.0.weight", "layers.0.bias", "layers.1.weight",
                                        "layers.1.bias", "layers.2.weight", "layers.2.bias"]
    assert Network((1, 32, 32, 32, 1)).depth == 4


def test_pytorch_init_bounds_and_seed():
    net = Network()
    p = init_params(net, seed=7)
    for name, a in p.items():
        fan_in = net.param_shapes()[name.replace("bias", "weight")][1] * 9
        assert a.dtype == np.float32 and np.abs(a).max() <= 1 / np.sqrt(fan_in)
    assert all(np.array_equal(bits(p[k]), bits(init_params(net, seed=7)[k])) for k in p)
    assert not np.array_equal(p["layers.1.weight"], init_params(net, seed=8)["layers.1.weight"])
    he = init_params(net, seed=7, scheme="he-normal")
    assert abs(he["layers.1.weight"].std() - np.sqrt(2 / 144)) < 0.02
    assert not he["layers.0.bias"].any()


def synthetic_batch(rng, n=2, size=(12, 20)):
    clean = np.zeros((n, 1) + size, np.float32)
    yy, xx = np.mgrid[:size[0], :size[1]]
    for i in range(n):
        cy, cx = rng.uniform(2, size[0] - 2), rng.uniform(2, size[1] - 2)
        clean[i, 0] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    return noisy, clean


def run_steps(optimizer, steps=4, seed=0):
    be = get_backend("reference")
    net = Network((1, 4, 4, 1))
    noisy, clean = synthetic_batch(np.random.default_rng(seed))
    trainer = TrainStep(be, net, init_params(net, seed), optimizer)
    losses = [trainer(noisy, clean)[0] for _ in range(steps)]
    return losses, trainer


@pytest.mark.parametrize("opt", [OptimizerConfig("sgd", lr=0.05, momentum=0.9),
                                 OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-3),
                                 OptimizerConfig("adam", lr=0.01)])
def test_training_reduces_loss_reproducibly(opt):
    losses, trainer = run_steps(opt)
    assert losses[-1] < 0.9 * losses[0], losses
    again, trainer2 = run_steps(opt)
    assert losses == again
    for k, v in trainer.host_params().items():
        assert np.array_equal(bits(v), bits(trainer2.host_params()[k]))


def test_step_loss_equals_forward_loss():
    be = get_backend("reference")
    net = Network((1, 3, 1))
    noisy, clean = synthetic_batch(np.random.default_rng(1))
    params = init_params(net, 1)
    sse, count = TrainStep(be, net, params, OptimizerConfig(lr=0.0))(noisy, clean)
    pred = forward(be, net, params, noisy)
    assert count == clean.size and sse == be.mse_loss(pred, clean)[0]


def test_mismatched_parameters_rejected():
    with pytest.raises(ValueError, match="layers.0.weight has shape"):
        p = init_params(Network(), 0)
        p["layers.0.weight"] = np.zeros((16, 2, 3, 3), np.float32)
        TrainStep(get_backend("reference"), Network(), p, OptimizerConfig())


@pytest.mark.parametrize("channels", [(1, 4, 4, 1), (1, 3, 3, 3, 1), (1, 2, 5, 1)])
def test_step_gradients_match_float64_backprop(channels):
    """The step's gradients, with its work buffers shared between activations and gradients,
    against an independent float64 backward pass."""
    from float64_math import conv64, conv_backward_data64, conv_backward_weights64, rel_err
    net = Network(channels)
    noisy, clean = synthetic_batch(np.random.default_rng(2))
    params = init_params(net, 3)
    trainer = TrainStep(get_backend("reference"), net, params, OptimizerConfig(lr=0.0))
    trainer(noisy, clean)
    trainer(noisy, clean)          # a second step reuses (and must refill) the shared buffers
    acts = [noisy.astype(np.float64)]
    for i in range(net.depth):
        y = conv64(acts[-1], params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
        acts.append(np.maximum(y, 0) if net.relu_after(i) else y)
    g = 2 * (acts[-1] - clean) / clean.size
    for i in reversed(range(net.depth)):
        gw, gb = conv_backward_weights64(g, acts[i])
        assert rel_err(trainer.grads[f"layers.{i}.weight"], gw) < 1e-5, i
        assert rel_err(trainer.grads[f"layers.{i}.bias"], gb) < 1e-5, i
        g = conv_backward_data64(g, params[f"layers.{i}.weight"]) * (acts[i] > 0)


@pytest.mark.parametrize("backend", ["reference", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("opt", [OptimizerConfig("sgd", lr=0.05, momentum=0.9),
                                 OptimizerConfig("adam", lr=0.01)])
def test_a_batch_run_in_passes_gives_the_bits_of_one_pass(backend, opt):
    """Passes of fewer images (less memory) keep each image's float64 sums and add them in
    image order: losses, weights and optimizer state are bit-identical to a single pass."""
    net = Network((1, 2, 2, 1))
    noisy, clean = synthetic_batch(np.random.default_rng(5), n=3, size=(5, 7))

    def run(pass_pixels):
        trainer = TrainStep(get_backend(backend), net, init_params(net, 2), opt,
                            pass_pixels=pass_pixels)
        losses = [trainer(noisy, clean)[0], trainer.loss(noisy, clean)[0]]
        return losses, trainer

    whole, t1 = run(1 << 21)
    split, t2 = run(2 * 5 * 7)         # passes of 2 images, then 1
    assert t2._passes(noisy.shape) == [(0, 2), (2, 3)]
    assert whole == split
    for got, want in ((t2.host_params(), t1.host_params()), (t2.host_state(), t1.host_state())):
        for k in want:
            assert np.array_equal(bits(got[k]), bits(want[k])), k


@pytest.mark.parametrize("net", [Network(), Network((1, 48, 96, 1)), UNet(),
                                 UNet(widths=(8, 16, 24)), N2NUNet()])
def test_the_default_pass_holds_what_its_memory_budget_allows(net):
    """The default pass size is the network's: the work arrays a pass allocates are the
    bytes workspace_bytes counts, and as many whole images as fit DEFAULT_PASS_BYTES."""
    per_pixel = workspace_bytes(net, 1, 64, 64) / 64 ** 2
    trainer = TrainStep(get_backend("reference"), net, init_params(net, 0), OptimizerConfig())
    assert trainer.pass_pixels == pass_pixels_for(net) == int(DEFAULT_PASS_BYTES // per_pixel)
    images = trainer.pass_pixels // (64 * 64)
    arrays = trainer._layers.workspace(images, 64, 64)
    allocated = sum(a.nbytes for a in (arrays.values() if isinstance(arrays, dict) else arrays))
    assert allocated == workspace_bytes(net, images, 64, 64) <= DEFAULT_PASS_BYTES
    assert workspace_bytes(net, images + 1, 64, 64) > DEFAULT_PASS_BYTES


@pytest.mark.parametrize("backend", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_snapshot_is_the_state_when_taken_and_queued_loss_equals_loss(backend):
    """snapshot() is the state behind the steps queued before it (one wait for all arrays),
    whatever runs after; queue_loss, recorded or not, gives loss()'s bits. (The kernels'
    snapshot in the simulator: test_train's kernel-backend run, whose checkpoints are
    snapshots.)"""
    net = Network((1, 2, 2, 1))
    noisy, clean = synthetic_batch(np.random.default_rng(6), n=2, size=(5, 6))
    be = get_backend(backend)
    trainer = TrainStep(be, net, init_params(net, 3), OptimizerConfig("sgd", 0.05, momentum=0.9))
    x, y = be.to_device(noisy), be.to_device(clean)
    trainer.launch(x, y)
    snapshot = trainer.snapshot()
    want = trainer.host_params(), trainer.host_state()
    trainer.launch(x, y)
    got = snapshot.result()
    assert got[1] and [list(g) for g in got] == [list(w) for w in want]
    for g, w in zip(got, want):
        for k in w:
            assert np.array_equal(bits(g[k]), bits(w[k])), k
    assert not np.array_equal(trainer.host_params()["layers.0.weight"], got[0]["layers.0.weight"])
    sse = trainer.loss(x, y)
    for _ in range(3):          # recorded from the second sighting where there are graphs
        pending, count = trainer.queue_loss(x, y, record=True)
        assert (pending.result(), count) == sse
