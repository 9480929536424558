"""cryokern's networks as PyTorch modules, holding cryokern's parameters under cryokern's names.

Why: two uses need the same network in PyTorch, and one definition keeps them the same network.
The tests compare a cryokern step with PyTorch's float64 autograd of it (independent math, to
1e-5), and bench/ times PyTorch's eager step and forward of the same architecture with the same
weights as the peer. It follows model.py's numerics §13-15 with PyTorch's own operations: zero
padding of the bottom and right to the pooling grid (F.pad), 2x2 max-pooling, x2 nearest
upsampling, concatenation [upsampled, skip], LeakyReLU, a linear last layer, the optional
global residual on the padded grid, the output cropped back.

torch is not a dependency of cryokern (the `torch` extra): it is imported when a mirror is
built, never by importing this module.
"""
import functools

import numpy as np

from .model import N2NUNet, UNet


@functools.cache
def _module_classes():
    """The nn.Module classes, defined at first use so that importing this module needs no torch."""
    import torch
    from torch import nn
    F = nn.functional

    def conv(cin, cout):
        return nn.Conv2d(cin, cout, 3, padding=1)

    class Chain(nn.Module):
        """model.Network: 3x3 'same' convolutions, ReLU after every layer but the last;
        parameters layers.{i}.weight/bias."""

        def __init__(self, network):
            super().__init__()
            self.layers = nn.ModuleList(conv(a, b) for a, b in
                                        zip(network.channels, network.channels[1:]))

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = torch.relu(x)
            return x

    class Level(nn.Module):
        """Two convolutions of one encoder or decoder level (conv0, conv1)."""

        def __init__(self, cin, cout):
            super().__init__()
            self.conv0, self.conv1 = conv(cin, cout), conv(cout, cout)

    class UNetModule(nn.Module):
        """model.UNet; parameters enc.{l}.conv{0,1}, dec.{l}.conv{0,1}, out (weight, bias)."""

        def __init__(self, network):
            super().__init__()
            self.network = network
            w, cin = network.widths, network.in_channels
            self.enc = nn.ModuleList(Level(cin if level == 0 else w[level - 1], w[level])
                                     for level in range(network.levels + 1))
            self.dec = nn.ModuleList(Level(w[level + 1] + w[level], w[level])
                                     for level in range(network.levels))
            self.out = conv(w[0], network.out_channels)

        def forward(self, x):
            net, slope = self.network, self.network.leaky_slope

            def level(convs, a):
                a = F.leaky_relu(convs.conv0(a), slope)
                return F.leaky_relu(convs.conv1(a), slope)

            h, w = x.shape[2:]
            hp, wp = net.padded_size(h, w)
            if (hp, wp) != (h, w):
                x = F.pad(x, (0, wp - w, 0, hp - h))
            skips, a = [], x
            for depth, convs in enumerate(self.enc):
                a = level(convs, F.max_pool2d(a, 2) if depth else a)
                skips.append(a)
            for depth in reversed(range(net.levels)):
                up = F.interpolate(a, scale_factor=2, mode="nearest")
                a = level(self.dec[depth], torch.cat([up, skips[depth]], dim=1))
            y = self.out(a)
            if net.residual:
                y = y + x
            return y[:, :, :h, :w]

    class N2NModule(nn.Module):
        """model.N2NUNet, the Noise2Noise paper's U-Net; parameters under the paper's names
        (enc_conv0 .. enc_conv{L+1}, dec_conv{L}a .. dec_conv1c)."""

        def __init__(self, network):
            super().__init__()
            self.network = network
            for name, cin, cout in network.convolutions():
                self.add_module(name, conv(cin, cout))

        def forward(self, x):
            net, slope = self.network, self.network.leaky_slope

            def leaky(name, a):
                return F.leaky_relu(getattr(self, name)(a), slope)

            h, w = x.shape[2:]
            hp, wp = net.padded_size(h, w)
            if (hp, wp) != (h, w):
                x = F.pad(x, (0, wp - w, 0, hp - h))
            a = leaky("enc_conv1", leaky("enc_conv0", x))
            skips = [x]
            for level in range(1, net.levels + 1):
                a = F.max_pool2d(a, 2)
                skips.append(a)
                a = leaky(f"enc_conv{level + 1}", a)
            for level in reversed(range(1, net.levels)):
                a = torch.cat([F.interpolate(a, scale_factor=2, mode="nearest"), skips[level]], 1)
                a = leaky(f"dec_conv{level + 1}b", leaky(f"dec_conv{level + 1}a", a))
            a = torch.cat([F.interpolate(a, scale_factor=2, mode="nearest"), x], 1)
            head = [name for name, _ in net.head()]
            for name in head[:-1]:
                a = leaky(name, a)
            y = getattr(self, head[-1])(a)
            if net.residual:
                y = y + x
            return y[:, :, :h, :w]

    return Chain, UNetModule, N2NModule


def torch_network(network, params, dtype=None, device=None):
    """A torch.nn.Module computing `network` (model.Network, model.UNet or model.N2NUNet) with
    `params` (cryokern's {name: float32 array}; its state_dict has the same names), in `dtype`
    on `device` (default float32 on the CPU)."""
    import torch
    chain, unet, n2n = _module_classes()
    module = unet(network) if isinstance(network, UNet) else \
        n2n(network) if isinstance(network, N2NUNet) else chain(network)
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in params.items()})
    return module.to(device=device, dtype=dtype or torch.float32)
