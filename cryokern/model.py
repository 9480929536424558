"""The denoising network: its shape, named parameters, initialization and forward pass."""
from dataclasses import dataclass

import numpy as np

DEFAULT_CHANNELS = (1, 16, 16, 1)


@dataclass(frozen=True)
class Network:
    """A stack of 3x3 'same' convolutions with ReLU after every layer but the last."""
    channels: tuple = DEFAULT_CHANNELS

    def __post_init__(self):
        channels = tuple(int(c) for c in self.channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must list at least two positive counts, got {self.channels}")
        object.__setattr__(self, "channels", channels)

    @property
    def depth(self):
        return len(self.channels) - 1

    def relu_after(self, layer):
        return layer < self.depth - 1

    def param_shapes(self):
        """{name: shape}, in layer order: layers.{i}.weight (OIHW) then layers.{i}.bias."""
        shapes = {}
        for i, (cin, cout) in enumerate(zip(self.channels, self.channels[1:])):
            shapes[f"layers.{i}.weight"] = (cout, cin, 3, 3)
            shapes[f"layers.{i}.bias"] = (cout,)
        return shapes

    def param_count(self):
        return sum(int(np.prod(s)) for s in self.param_shapes().values())


def init_params(network, seed, scheme="pytorch"):
    """Seeded float32 parameters.

    "pytorch": torch.nn.Conv2d's default, weights and bias uniform in +-1/sqrt(fan_in).
    "he-normal": weights normal with std sqrt(2/fan_in), bias zero.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for i, (cin, cout) in enumerate(zip(network.channels, network.channels[1:])):
        fan_in = cin * 9
        shape = (cout, cin, 3, 3)
        if scheme == "pytorch":
            bound = 1.0 / np.sqrt(fan_in)
            w = rng.uniform(-bound, bound, shape)
            b = rng.uniform(-bound, bound, cout)
        elif scheme == "he-normal":
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
            b = np.zeros(cout)
        else:
            raise ValueError(f"unknown initialization {scheme!r}: use 'pytorch' or 'he-normal'")
        params[f"layers.{i}.weight"] = w.astype(np.float32)
        params[f"layers.{i}.bias"] = b.astype(np.float32)
    return params


def forward(backend, network, params, x, outs=None):
    """The network's output for a batch x (N, C0, H, W) on `backend`; params already there.
    With `outs` (one buffer per layer, e.g. kept for the backward pass or reused between
    calls), layer i writes into outs[i]."""
    y = x
    for i in range(network.depth):
        y = backend.conv2d_forward(y, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"],
                                   relu=network.relu_after(i),
                                   out=None if outs is None else outs[i])
    return y
