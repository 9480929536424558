"""Whole training steps on the GPU backend: equal to the reference, and to PyTorch in float64.

PyTorch (the `torch` extra) is optional for users; the GPU acceptance run sets
CRYOKERN_REQUIRE_TORCH=1, under which its absence fails the comparison instead of skipping it.
"""
import os

import numpy as np
import pytest

from conftest import bits
from cryokern.backends import get_backend
from cryokern.model import Network, init_params
from cryokern.step import OptimizerConfig, TrainStep

pytestmark = pytest.mark.gpu


def batch(seed, shape=(3, 1, 67, 131)):
    rng = np.random.default_rng(seed)
    clean = rng.random(shape).astype(np.float32)
    return (clean + 0.3 * rng.standard_normal(shape)).astype(np.float32), clean


@pytest.mark.parametrize("channels", [(1, 16, 16, 1), (1, 32, 32, 1), (1, 17, 33, 1)],
                         ids=lambda c: ",".join(map(str, c)))
@pytest.mark.parametrize("opt", [OptimizerConfig("sgd", lr=0.05, momentum=0.9, weight_decay=1e-4),
                                 OptimizerConfig("adam", lr=1e-3)])
def test_three_steps_equal_reference(opt, channels):
    """The default network, and wider ones whose layers have several blocks of output
    channels (16 a block; 33: the last block holds one)."""
    net = Network(channels)
    params = init_params(net, seed=3)
    gpu = TrainStep(get_backend("gpu"), net, params, opt)
    ref = TrainStep(get_backend("reference"), net, params, opt)
    for step in range(3):
        noisy, clean = batch(step)
        assert gpu(noisy, clean) == ref(noisy, clean)
    for name, value in ref.host_params().items():
        assert np.array_equal(bits(gpu.host_params()[name]), bits(value)), name
    for name, value in ref.host_state().items():
        assert np.array_equal(bits(gpu.host_state()[name]), bits(value)), name


@pytest.mark.parametrize("opt", [OptimizerConfig("sgd", lr=0.05, momentum=0.9, nesterov=True),
                                 OptimizerConfig("adam", lr=1e-3, weight_decay=1e-2)])
def test_steps_replayed_from_a_graph_equal_reference(opt):
    """Device-resident batches: the second step with the same arrays is recorded as a CUDA
    graph and later steps replay it; every loss and the final state equal the reference's."""
    from numba import cuda
    net = Network()
    params = init_params(net, seed=4)
    gpu = TrainStep(get_backend("gpu"), net, params, opt)
    ref = TrainStep(get_backend("reference"), net, params, opt)
    slots = [tuple(cuda.device_array((2, 1, 45, 77), np.float32) for _ in "xy") for _ in "ab"]
    for step in range(6):
        noisy, clean = batch(step, (2, 1, 45, 77))
        x, y = slots[step % 2]
        x.copy_to_device(noisy)
        y.copy_to_device(clean)
        got, _ = gpu.launch(x, y)
        assert got.result() == ref(noisy, clean)[0]
    for name, value in ref.host_params().items():
        assert np.array_equal(bits(gpu.host_params()[name]), bits(value)), name
    for name, value in ref.host_state().items():
        assert np.array_equal(bits(gpu.host_state()[name]), bits(value)), name


def import_torch():
    if os.environ.get("CRYOKERN_REQUIRE_TORCH") == "1":
        import torch    # the acceptance run: a missing torch is a failure
        return torch
    return pytest.importorskip("torch")


def test_one_step_matches_pytorch_float64():
    torch = import_torch()
    net = Network()
    params = init_params(net, seed=5)
    noisy, clean = batch(7)
    trainer = TrainStep(get_backend("gpu"), net, params, OptimizerConfig("sgd", lr=0.1))
    sse, count = trainer(noisy, clean)
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    y = torch.tensor(noisy, dtype=torch.float64)
    for i in range(net.depth):
        y = torch.nn.functional.conv2d(y, t[f"layers.{i}.weight"], t[f"layers.{i}.bias"], padding=1)
        if net.relu_after(i):
            y = torch.relu(y)
    loss = ((y - torch.tensor(clean, dtype=torch.float64)) ** 2).mean()
    loss.backward()
    assert abs(sse / count - loss.item()) / loss.item() < 1e-5
    for name, value in trainer.host_params().items():
        want = (t[name] - 0.1 * t[name].grad).detach().numpy()
        grad_got = (params[name].astype(np.float64) - value) / 0.1
        grad_want = t[name].grad.numpy()
        assert np.linalg.norm(grad_got - grad_want) / np.linalg.norm(grad_want) < 1e-5, name
        assert np.linalg.norm(value - want) / np.linalg.norm(want) < 1e-5, name
