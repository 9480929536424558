"""The networks a benchmark names, read through cryokern.train's own options: the one place
for architectures in bench/ (quality.py --nets, step.py and denoise.py --preset and --arch).

A spec is "1,16,16,1" or "chain:1,16,16,1" (the chain's channels), "unet:W0,...,WL" (the
U-Net's widths, full resolution first) or "n2n" (the Noise2Noise paper's U-Net, model.N2NUNet),
"+residual" appended for a U-Net's global residual.
"""
import argparse
from dataclasses import dataclass

from cryokern import train as T
from cryokern.model import PooledNetwork
from cryokern.mrcstack import DataError

# the 48-wide U-Net (train's default U-Net, after the Noise2Noise paper's), the paper's own
# U-Net (48 channels down, 96 up: 359 GFLOP per 1024^2 forward) and the lean probe
# (254k parameters, 62 images/s of 1024^2 in PyTorch fp32 at r 0.947)
PRESETS = {"chain": ("chain:1,16,16,1",), "unet48": ("unet:48,48,48,48,48,48",),
           "n2n": ("n2n",), "lean": ("unet:16,24,32,48,64",)}
PRESETS["unets"] = PRESETS["unet48"] + PRESETS["n2n"] + PRESETS["lean"]
SPEC_HELP = ("channel lists like 1,16,16,1 (the chain), U-Net widths like "
             "unet:16,24,32,48,64 or n2n (the Noise2Noise paper's U-Net); append +residual "
             "to a U-Net for the global residual")


@dataclass(frozen=True)
class NetSpec:
    """A benchmark's network: its spec, cryokern.train's options for it, the network."""
    spec: str
    train_args: tuple
    network: object

    @property
    def name(self):
        return f"cryokern {self.spec}"

    def optimizer(self):
        """The optimizer cryokern.train gives this network by default (its kind, learning
        rate and settings)."""
        opts = T.resolve_defaults(T.build_parser().parse_args(["--noisy", "x", "--clean", "y",
                                                               *self.train_args]))
        return T.optimizer_config(opts)


def parse_net(spec):
    """A spec as a NetSpec (argparse type: a bad one is argparse.ArgumentTypeError)."""
    kind, _, rest = spec.rpartition(":")
    rest, plus, extra = rest.partition("+")
    if kind not in ("", "chain", "unet"):
        raise argparse.ArgumentTypeError(f"{spec!r}: give {SPEC_HELP}")
    if not kind and rest == "n2n":
        kind = "n2n"
    if plus and (kind not in ("unet", "n2n") or extra != "residual"):
        raise argparse.ArgumentTypeError(f"{spec!r}: give {SPEC_HELP}")
    if kind == "n2n":
        args = ("--arch", "n2n") + (("--residual",) if plus else ())
    elif kind == "unet":
        args = ("--arch", "unet", "--unet-widths", rest) + (("--residual",) if plus else ())
    else:
        args = ("--channels", rest)
    try:
        network = T.check_options(T.build_parser().parse_args(list(args)))
    except DataError as e:
        raise argparse.ArgumentTypeError(f"{spec!r}: {e}; give {SPEC_HELP}") from None
    return NetSpec(spec, args, network)


def add_network_options(parser):
    """--preset, --arch, --channels, --unet-widths, --residual (read by chosen_networks)."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="networks by name: " + "; ".join(
                            f"{k}: {' '.join(v)}" for k, v in sorted(PRESETS.items())) +
                        " (overrides --arch)")
    parser.add_argument("--arch", choices=("chain", "unet", "n2n"), default="chain")
    parser.add_argument("--channels", default="1,16,16,1", help="the chain's channels")
    parser.add_argument("--unet-widths", default="48,48,48,48,48,48", metavar="W0,...,WL")
    parser.add_argument("--residual", action="store_true", help="the U-Net's global residual")


def chosen_networks(parser, args):
    """[NetSpec] of add_network_options' options; a bad one is the parser's error (exit 2)."""
    if args.preset:
        specs = PRESETS[args.preset]
    elif args.arch == "unet":
        specs = [f"unet:{args.unet_widths}" + ("+residual" if args.residual else "")]
    elif args.arch == "n2n":
        specs = ["n2n" + ("+residual" if args.residual else "")]
    else:
        specs = [f"chain:{args.channels}"]
    try:
        return [parse_net(s) for s in specs]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))


def conv_flops(network, height, width):
    """[(name prefix, FLOP)] of each convolution's forward pass on one image (2 FLOP per
    multiply-add; a U-Net on the padded grid, level l at 2**-l of its sides)."""
    pooled = isinstance(network, PooledNetwork)
    if pooled:
        height, width = network.padded_size(height, width)
    flops = []
    for prefix, cin, cout in network.convolutions():
        level = network.level_of(prefix) if pooled else 0
        flops.append((prefix, 2 * 9 * cin * cout * (height >> level) * (width >> level)))
    return flops


def forward_flops(network, height, width):
    return sum(f for _, f in conv_flops(network, height, width))


def step_flops(network, height, width):
    """A training step's convolution FLOP on one image: forward, weight gradients and input
    gradients, each as many as the forward, but the first layer's input gradient (not needed)."""
    flops = conv_flops(network, height, width)
    return 3 * sum(f for _, f in flops) - flops[0][1]
