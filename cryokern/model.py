"""The denoising networks: their shapes, named parameters, initialization and forward passes.

Three architectures: `Network`, the seed's chain of 3x3 convolutions with ReLU (the Fortran
original's network), `UNet`, the multi-scale network of numerics §9-14, and `N2NUNet`, the
Noise2Noise paper's U-Net (§15). The two U-Nets are `PooledNetwork`s: they pad and tile alike.
"""
from dataclasses import dataclass

import numpy as np

from .contract import DEFAULT_LEAKY_SLOPE, leaky_slope as leaky_slope_f32

DEFAULT_CHANNELS = (1, 16, 16, 1)
# After the Noise2Noise paper's U-Net (Lehtinen et al. 2018): five poolings, 48 channels at every
# level (the paper's decoder convolutions are 96 wide; here every level is 48; N2NUNet is the
# paper's own)
DEFAULT_UNET_WIDTHS = (48,) * 6


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

    @property
    def receptive_radius(self):
        """Rows (and columns) of input an output pixel depends on, each side: one per 3x3
        convolution."""
        return self.depth

    @property
    def row_grid(self):
        """A tile's top row must be a multiple of this for its bits to be the whole image's."""
        return 1

    def describe(self):
        """The architecture as a checkpoint's meta records it (network_from_description)."""
        return {"kind": "chain", "channels": list(self.channels)}

    def label(self):
        return f"chain {','.join(map(str, self.channels))}"

    def relu_after(self, layer):
        return layer < self.depth - 1

    def convolutions(self):
        """[(name prefix, cin, cout)] in layer order."""
        return [(f"layers.{i}", cin, cout)
                for i, (cin, cout) in enumerate(zip(self.channels, self.channels[1:]))]

    def param_shapes(self):
        """{name: shape}, in layer order: layers.{i}.weight (OIHW) then layers.{i}.bias."""
        return conv_param_shapes(self.convolutions())

    def param_count(self):
        return sum(int(np.prod(s)) for s in self.param_shapes().values())


def conv_param_shapes(convolutions):
    shapes = {}
    for prefix, cin, cout in convolutions:
        shapes[f"{prefix}.weight"] = (cout, cin, 3, 3)
        shapes[f"{prefix}.bias"] = (cout,)
    return shapes


class PooledNetwork:
    """What the two U-Nets share: `levels` 2x2 poolings, so sides padded to multiples of
    2**levels (§13) and tiles on that grid (inference.py); 3x3 convolutions named by
    convolutions(), at the levels level_of() gives."""

    @property
    def row_grid(self):
        """A tile's top row must be a multiple of 2**levels: the poolings then group the same
        rows as in the whole image."""
        return 1 << self.levels

    def padded_size(self, height, width):
        """The sides rounded up to multiples of 2**levels (§13)."""
        m = 1 << self.levels
        return -(-height // m) * m, -(-width // m) * m

    def param_shapes(self):
        """{name: shape} in forward order: {prefix}.weight (OIHW) then {prefix}.bias."""
        return conv_param_shapes(self.convolutions())

    def param_count(self):
        return sum(int(np.prod(s)) for s in self.param_shapes().values())

    def inference_buffers(self, n, height, width):
        """For a forward pass only (denoising): {array name: buffer name} and {buffer name:
        floats}, each array a prefix of its buffer, which is sized for the largest it holds
        (buffer_homes() says which arrays share one; an array it leaves out is not made)."""
        shapes = self.activation_shapes(n, height, width)
        home = self.buffer_homes()
        home = {name: home[name] for name in shapes if name in home}
        sizes = {}
        for name, buffer in home.items():
            sizes[buffer] = max(sizes.get(buffer, 0), int(np.prod(shapes[name])))
        return home, sizes


@dataclass(frozen=True)
class UNet(PooledNetwork):
    """A U-Net of 3x3 'same' convolutions (numerics §14).

    `widths[l]` channels at level l (full resolution is level 0), `levels = len(widths) - 1`
    poolings; the last entry is the bottom level's. Encoder level l: two convolutions with
    LeakyReLU (enc.{l}.conv0, enc.{l}.conv1), then 2x2 max-pooling (not after the bottom,
    enc.{levels}). Decoder level l = levels-1 .. 0: x2 nearest upsampling of the level below's
    output, concatenated (upsampled first) with enc.{l}'s output, then two convolutions with
    LeakyReLU to widths[l] channels (dec.{l}.conv0, dec.{l}.conv1). Last, a linear convolution
    to out_channels (out), plus the input with `residual`. Sides that are not multiples of
    2**levels are padded with zeros at the bottom and right and the output cropped (§13)."""
    widths: tuple = DEFAULT_UNET_WIDTHS
    in_channels: int = 1
    out_channels: int = 1
    residual: bool = False
    leaky_slope: float = DEFAULT_LEAKY_SLOPE

    def __post_init__(self):
        widths = tuple(int(c) for c in self.widths)
        if len(widths) < 2 or min(widths) < 1 or min(self.in_channels, self.out_channels) < 1:
            raise ValueError(f"a U-Net needs at least two positive widths (one pooling) and "
                             f"positive in/out channels, got {self.widths}")
        if self.residual and self.in_channels != self.out_channels:
            raise ValueError("the residual needs as many output channels as input channels")
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "leaky_slope", float(leaky_slope_f32(self.leaky_slope)))

    @property
    def levels(self):
        return len(self.widths) - 1

    @property
    def receptive_radius(self):
        """Full-resolution rows of input beyond its pooling-grid block (2**L rows, L = levels,
        blocks starting at multiples of 2**L) that an output row depends on, each side:
        6 * 2**L - 2 (L = 1: 10, 2: 22, 3: 46, the default 5: 190). A tile whose window starts
        and ends on the grid needs this halo, rounded up to the grid (inference.py).

        Follow the top of the set of rows the output row depends on backwards through the
        network, from the top of its block (row 0; a lower row in the block reaches no higher
        after the roundings below). At level l a row covers 2**l full-resolution rows. The
        output convolution and dec.0's two: -1, -3. Each upsampling into level l makes the set
        start on level l+1's rows: rounded down to a multiple of 2**(l+1) (-3 -> -4). dec.l's
        two convolutions (l >= 1): -2 * 2**l each side, giving -2**(l+2), already on the grid
        of the next upsampling. So after the decoder: -2**(L+1). The bottom's two
        convolutions: -2**(L+1) more, -2**(L+2); the poolings keep blocks whole; the encoder's
        levels L-1..0: -2 * (2**L - 1). Sum: 6 * 2**L - 2; the bottom edge is the mirror
        image. Off the grid the reach is up to 7 * 2**L - 4 (each upsampling a full 2**l),
        which is why tiles keep to the grid. tests/test_inference.py shows one grid less
        changes the bits."""
        return 6 * (1 << self.levels) - 2

    def describe(self):
        """The architecture as a checkpoint's meta records it (network_from_description)."""
        return {"kind": "unet", "widths": list(self.widths), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "residual": self.residual,
                "leaky_slope": self.leaky_slope}

    def label(self):
        return f"U-Net {','.join(map(str, self.widths))}{' residual' if self.residual else ''}"

    def convolutions(self):
        """[(name prefix, cin, cout)] in the order of the forward pass."""
        w, convs = self.widths, []
        for level in range(self.levels + 1):
            cin = self.in_channels if level == 0 else w[level - 1]
            convs += [(f"enc.{level}.conv0", cin, w[level]),
                      (f"enc.{level}.conv1", w[level], w[level])]
        for level in reversed(range(self.levels)):
            convs += [(f"dec.{level}.conv0", w[level + 1] + w[level], w[level]),
                      (f"dec.{level}.conv1", w[level], w[level])]
        return convs + [("out", w[0], self.out_channels)]

    def level_of(self, prefix):
        """The level (2**-level of the sides) a convolution runs at."""
        return int(prefix.split(".")[1]) if prefix != "out" else 0

    def activation_shapes(self, n, height, width):
        """{name: shape} of one forward pass's arrays on a batch of n images (numerics §14):
        "input" (padded, only where padding is needed), enc.{l}.{0,1} (each convolution's
        output), pool.{l} (level l's input, l >= 1), up.{l}, dec.{l}.{0,1}, "out" (the
        network's output on the padded grid) and "pred" (cropped, only where padding is). The
        concatenation is not an array: dec.{l}.conv0 reads up.{l} and enc.{l}.1."""
        hp, wp = self.padded_size(height, width)
        shapes = {}
        if (hp, wp) != (height, width):
            shapes["input"] = (n, self.in_channels, hp, wp)
        w = self.widths
        for level in range(self.levels + 1):
            size = (hp >> level, wp >> level)
            if level > 0:
                shapes[f"pool.{level}"] = (n, w[level - 1]) + size
            shapes[f"enc.{level}.0"] = shapes[f"enc.{level}.1"] = (n, w[level]) + size
        for level in reversed(range(self.levels)):
            size = (hp >> level, wp >> level)
            shapes[f"up.{level}"] = (n, w[level + 1]) + size
            shapes[f"dec.{level}.0"] = shapes[f"dec.{level}.1"] = (n, w[level]) + size
        shapes["out"] = (n, self.out_channels, hp, wp)
        if (hp, wp) != (height, width):
            shapes["pred"] = (n, self.out_channels, height, width)
        return shapes

    def buffer_homes(self):
        """{array name: buffer name} for a forward pass only (denoising), arrays sharing a
        buffer where unet_forward's order lets one's last read come before the next one's first
        write; no up.l (the decoder reads the level below upsampled in place). Per level l:
        "skip.l" holds enc.l.1 until the decoder reads it; "a.l" and "b.l" take turns (pool.l
        in b.l, enc.l.0 in a.l; dec.l.0, dec.l.1 in b.l, a.l), so that a level holds three
        arrays instead of five or six: ~190 floats a pixel for the 48-wide U-Net instead of
        ~340."""
        bottom = self.levels
        home = {"input": "input", "out": "b.0", "pred": "a.0"}
        for level in range(bottom + 1):
            home.update({f"pool.{level}": f"b.{level}", f"enc.{level}.0": f"a.{level}",
                         f"enc.{level}.1": f"skip.{level}" if level < bottom else f"b.{level}",
                         f"dec.{level}.0": f"b.{level}",
                         f"dec.{level}.1": f"a.{level}"})
        return home

    def level_output(self, level):
        """The name of the array the decoder of `level` upsamples: the level below's output."""
        return f"enc.{level + 1}.1" if level + 1 == self.levels else f"dec.{level + 1}.1"


@dataclass(frozen=True)
class N2NUNet(PooledNetwork):
    """The Noise2Noise paper's U-Net (Lehtinen et al. 2018, appendix table; numerics §15), its
    convolutions named as there. Level 0: enc_conv0 (in_channels -> enc_width), enc_conv1;
    then `levels` times: 2x2 max-pooling to level l (pool.l), one convolution enc_conv{l+1}
    (the last, at the bottom level, 1/32 of the sides for the paper's five). Decoder level
    l = levels-1 .. 1: x2 nearest upsampling of the level below's output (up.l), concatenated
    (upsampled first) with pool.l, level l's input, then dec_conv{l+1}a and dec_conv{l+1}b to
    dec_width. Level 0: the upsampling concatenated with the network's input, then the head,
    dec_conv1a, dec_conv1b (head_widths) and the linear dec_conv1c to out_channels (plus the
    input with `residual`). LeakyReLU after every convolution but the last. Unlike UNet, a
    skip is a level's input (the pooling's output, or the input), not its convolutions'
    output, and the decoder is wider than the encoder. Sides padded as UNet's (§13)."""
    levels: int = 5
    enc_width: int = 48
    dec_width: int = 96
    head_widths: tuple = (64, 32)
    in_channels: int = 1
    out_channels: int = 1
    residual: bool = False
    leaky_slope: float = DEFAULT_LEAKY_SLOPE

    def __post_init__(self):
        head = tuple(int(c) for c in self.head_widths)
        if int(self.levels) < 1 or min((self.enc_width, self.dec_width,
                                        self.in_channels, self.out_channels) + head) < 1 \
                or not 1 <= len(head) <= 24:
            raise ValueError(f"the Noise2Noise U-Net needs at least one pooling, positive "
                             f"widths and 1 to 24 head widths, got levels {self.levels}, "
                             f"widths {self.enc_width}/{self.dec_width}/{self.head_widths}")
        if self.residual and self.in_channels != self.out_channels:
            raise ValueError("the residual needs as many output channels as input channels")
        object.__setattr__(self, "levels", int(self.levels))
        object.__setattr__(self, "head_widths", head)
        object.__setattr__(self, "leaky_slope", float(leaky_slope_f32(self.leaky_slope)))

    def head(self):
        """The level-0 convolutions after the concatenation: [(name, cout)], the last linear."""
        names = [f"dec_conv1{chr(ord('a') + k)}" for k in range(len(self.head_widths) + 1)]
        return list(zip(names, self.head_widths + (self.out_channels,)))

    def convolutions(self):
        """[(name prefix, cin, cout)] in the order of the forward pass."""
        e, d, top = self.enc_width, self.dec_width, self.levels
        convs = [("enc_conv0", self.in_channels, e), ("enc_conv1", e, e)]
        convs += [(f"enc_conv{level + 1}", e, e) for level in range(1, top + 1)]
        for level in reversed(range(1, top)):
            below = e if level + 1 == top else d
            convs += [(f"dec_conv{level + 1}a", below + e, d), (f"dec_conv{level + 1}b", d, d)]
        cin = (e if top == 1 else d) + self.in_channels
        for name, cout in self.head():
            convs.append((name, cin, cout))
            cin = cout
        return convs

    def level_of(self, prefix):
        """The level (2**-level of the sides) a convolution runs at."""
        number = int(prefix.rstrip("abcdefghijklmnopqrstuvwxyz")[8:])
        return max(0, number - 1) if prefix.startswith("enc") else number - 1

    def level_output(self, level):
        """The name of the array the decoder of `level` upsamples: the level below's output."""
        return f"enc_conv{level + 2}" if level + 1 == self.levels else f"dec_conv{level + 2}b"

    @property
    def receptive_radius(self):
        """Full-resolution rows of input beyond its pooling-grid block (2**L rows, L = levels,
        blocks starting at multiples of 2**L) that an output row depends on, each side: for the
        paper's head (three convolutions at level 0) 4 * 2**L (L = 1: 8, 2: 16, 5: 128).

        As UNet.receptive_radius: follow the top of the set of rows the output row depends
        on backwards from the top of its block (row 0). Each convolution at level l reaches
        2**l rows further; each upsampling into level l rounds down to a multiple of
        2**(l+1); poolings keep blocks whole. The skips (a level's input, read by the
        decoder) reach less far than the path through the levels below, which passes the
        same input later, so the deepest path decides: the head, the decoder levels 1..L-1
        (two convolutions each), the bottom convolution, the encoder's convolutions at levels
        L-1..1 (one each) and level 0's two. The bottom edge is the mirror image.
        tests/test_n2n_unet.py checks it against the brute-force dependence."""
        reach = len(self.head())                            # the head's convolutions
        for level in range(1, self.levels + 1):
            reach = -(-reach // (1 << level)) * (1 << level)     # the upsampling into level-1
            if level < self.levels:
                reach += 2 * (1 << level)                   # dec_conv{level+1}a and b
        reach += 1 << self.levels                           # the bottom's convolution
        reach += sum(1 << level for level in range(1, self.levels)) + 2   # the encoder
        return reach

    def describe(self):
        """The architecture as a checkpoint's meta records it (network_from_description)."""
        return {"kind": "n2n", "levels": self.levels, "enc_width": self.enc_width,
                "dec_width": self.dec_width, "head_widths": list(self.head_widths),
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "residual": self.residual, "leaky_slope": self.leaky_slope}

    def label(self):
        return (f"N2N U-Net {self.levels} levels {self.enc_width}/{self.dec_width}/"
                f"{','.join(map(str, self.head_widths))}{' residual' if self.residual else ''}")

    def activation_shapes(self, n, height, width):
        """{name: shape} of one forward pass's arrays on a batch of n images (numerics §15):
        "input" (padded, only where padding is needed), each convolution's output under the
        convolution's name but the last's ("out": the network's output on the padded grid),
        pool.{l} (level l's input, l >= 1), up.{l} (the upsampling into level l) and "pred"
        (cropped, only where padding is). The concatenations are not arrays."""
        hp, wp = self.padded_size(height, width)
        shapes = {}
        if (hp, wp) != (height, width):
            shapes["input"] = (n, self.in_channels, hp, wp)
        convs = {name: cout for name, _, cout in self.convolutions()}
        last = self.head()[-1][0]

        def at(level, channels):
            return (n, channels, hp >> level, wp >> level)
        shapes["enc_conv0"] = at(0, convs["enc_conv0"])
        shapes["enc_conv1"] = at(0, convs["enc_conv1"])
        for level in range(1, self.levels + 1):
            shapes[f"pool.{level}"] = at(level, self.enc_width)
            shapes[f"enc_conv{level + 1}"] = at(level, self.enc_width)
        for level in reversed(range(self.levels)):
            shapes[f"up.{level}"] = at(level, convs[self.level_output(level)])
            names = [f"dec_conv{level + 1}a", f"dec_conv{level + 1}b"] if level else \
                [name for name, _ in self.head()]
            for name in names:
                shapes["out" if name == last else name] = at(level, convs[name])
        if (hp, wp) != (height, width):
            shapes["pred"] = (n, self.out_channels, height, width)
        return shapes

    def buffer_homes(self):
        """{array name: buffer name} for a forward pass only (denoising), arrays sharing a
        buffer where n2n_forward's order lets one's last read come before the next one's first
        write; no up.l (the decoder reads the level below upsampled in place): per level l,
        "skip.l" holds pool.l until the decoder reads it (level 0's is the input), "a.l" and
        "b.l" take turns (enc_conv{l+1} in a.l, dec_conv{l+1}a and b in a.l, b.l; level 0:
        enc_conv0, enc_conv1 in a.0, b.0, the head's in turns): ~240 floats a pixel for the
        paper's widths instead of ~420."""
        home = {"input": "input", "enc_conv0": "a.0", "enc_conv1": "b.0"}
        for level in range(1, self.levels + 1):
            home.update({f"pool.{level}": f"skip.{level}", f"enc_conv{level + 1}": f"a.{level}",
                         f"dec_conv{level + 1}a": f"a.{level}",
                         f"dec_conv{level + 1}b": f"b.{level}"})
        names = [name for name, _ in self.head()[:-1]] + ["out", "pred"]
        for k, name in enumerate(names):
            home[name] = "ab"[k % 2] + ".0"
        return home


def network_from_description(description):
    """The network a checkpoint's meta["network"] describes; a description with only
    "channels" (checkpoints from before the U-Net) is a chain. ValueError/KeyError/TypeError
    if it is not one."""
    kind = description.get("kind", "chain")
    if kind == "chain":
        return Network(tuple(description["channels"]))
    if kind == "unet":
        return UNet(tuple(description["widths"]), int(description["in_channels"]),
                    int(description["out_channels"]), bool(description["residual"]),
                    float(description["leaky_slope"]))
    if kind == "n2n":
        return N2NUNet(int(description["levels"]), int(description["enc_width"]),
                       int(description["dec_width"]), tuple(description["head_widths"]),
                       int(description["in_channels"]), int(description["out_channels"]),
                       bool(description["residual"]), float(description["leaky_slope"]))
    raise ValueError(f"unknown network kind {kind!r}")


def init_params(network, seed, scheme="pytorch"):
    """Seeded float32 parameters.

    "pytorch": torch.nn.Conv2d's default, weights and bias uniform in +-1/sqrt(fan_in).
    "he-normal": weights normal with std sqrt(2/fan_in), bias zero.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for prefix, cin, cout in network.convolutions():
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
        params[f"{prefix}.weight"] = w.astype(np.float32)
        params[f"{prefix}.bias"] = b.astype(np.float32)
    return params


def forward(backend, network, params, x, outs=None):
    """The network's output for a batch x (N, C0, H, W) on `backend`; params already there.
    With `outs` (chain: one buffer per layer; U-Net: a dict of the arrays named by
    activation_shapes), e.g. kept for the backward pass or reused between calls, the layers
    write there."""
    if isinstance(network, UNet):
        return unet_forward(backend, network, params, x, outs)
    if isinstance(network, N2NUNet):
        return n2n_forward(backend, network, params, x, outs)
    y = x
    for i in range(network.depth):
        y = backend.conv2d_forward(y, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"],
                                   relu=network.relu_after(i),
                                   out=None if outs is None else outs[i])
    return y


def unet_forward(backend, net, params, x, acts=None):
    """The U-Net's forward pass (numerics §14) into `acts` (allocated when None); returns its
    output: acts["pred"] where the image was padded, else acts["out"]. The decoder's first
    convolution reads the level below upsampled in place, in phase form (§12); where `acts`
    has an up.l (training keeps it for the backward pass), the level below is also upsampled
    into it."""
    n, _, height, width = x.shape
    shapes = net.activation_shapes(n, height, width)
    if acts is None:
        acts = {name: backend.empty(shape) for name, shape in shapes.items()
                if not name.startswith("up.")}
    slope = net.leaky_slope

    def conv(prefix, source, target, leaky=True, skip=None, upsampled=False):
        backend.conv2d_forward(source, params[f"{prefix}.weight"], params[f"{prefix}.bias"],
                               out=acts[target], leaky_slope=slope if leaky else None, x2=skip,
                               upsampled=upsampled)

    source = x
    if "input" in shapes:
        source = backend.pad_zeros(x, *shapes["input"][2:], out=acts["input"])
    for level in range(net.levels + 1):
        if level > 0:
            backend.maxpool2x2_forward(acts[f"enc.{level - 1}.1"], out=acts[f"pool.{level}"])
            source = acts[f"pool.{level}"]
        conv(f"enc.{level}.conv0", source, f"enc.{level}.0")
        conv(f"enc.{level}.conv1", acts[f"enc.{level}.0"], f"enc.{level}.1")
    for level in reversed(range(net.levels)):
        below, up = acts[net.level_output(level)], acts.get(f"up.{level}")
        if up is not None:
            backend.upsample2x_forward(below, out=up)
        conv(f"dec.{level}.conv0", below, f"dec.{level}.0", skip=acts[f"enc.{level}.1"],
             upsampled=True)
        conv(f"dec.{level}.conv1", acts[f"dec.{level}.0"], f"dec.{level}.1")
    conv("out", acts["dec.0.1"], "out", leaky=False)
    if net.residual:
        inputs = acts["input"] if "input" in shapes else x
        backend.add(acts["out"], inputs, out=acts["out"])
    if "pred" in shapes:
        return backend.crop(acts["out"], height, width, out=acts["pred"])
    return acts["out"]


def n2n_forward(backend, net, params, x, acts=None):
    """The Noise2Noise U-Net's forward pass (numerics §15) into `acts` (allocated when None);
    returns its output: acts["pred"] where the image was padded, else acts["out"]. As
    unet_forward: the decoder reads the level below upsampled in place (§12), and upsamples it
    into up.l too where `acts` has one."""
    n, _, height, width = x.shape
    shapes = net.activation_shapes(n, height, width)
    if acts is None:
        acts = {name: backend.empty(shape) for name, shape in shapes.items()
                if not name.startswith("up.")}
    last = net.head()[-1][0]

    def conv(prefix, source, skip=None, upsampled=False):
        target = "out" if prefix == last else prefix
        backend.conv2d_forward(source, params[f"{prefix}.weight"], params[f"{prefix}.bias"],
                               out=acts[target], x2=skip, upsampled=upsampled,
                               leaky_slope=None if prefix == last else net.leaky_slope)
        return acts[target]

    inputs = x
    if "input" in shapes:
        inputs = backend.pad_zeros(x, *shapes["input"][2:], out=acts["input"])
    source = conv("enc_conv1", conv("enc_conv0", inputs))
    for level in range(1, net.levels + 1):
        pooled = backend.maxpool2x2_forward(source, out=acts[f"pool.{level}"])
        source = conv(f"enc_conv{level + 1}", pooled)
    for level in reversed(range(net.levels)):
        up = acts.get(f"up.{level}")
        if up is not None:
            backend.upsample2x_forward(source, out=up)
        if level:
            source = conv(f"dec_conv{level + 1}b",
                          conv(f"dec_conv{level + 1}a", source, skip=acts[f"pool.{level}"],
                               upsampled=True))
    head = [name for name, _ in net.head()]
    source = conv(head[0], source, skip=inputs, upsampled=True)
    for name in head[1:]:
        source = conv(name, source)
    if net.residual:
        backend.add(acts["out"], inputs, out=acts["out"])
    if "pred" in shapes:
        return backend.crop(acts["out"], height, width, out=acts["pred"])
    return acts["out"]
