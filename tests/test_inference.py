"""Tiled inference: bit-identical to the whole image with a halo of the receptive radius, not
with less; normalization undone on output; checkpoints checked on load."""
import numpy as np
import pytest

from conftest import bits
from cryokern import checkpoint
from cryokern.backends import get_backend
from cryokern.inference import Model, TiledDenoiser, load_model, strips
from cryokern.model import Network, UNet, forward, init_params
from cryokern.mrcstack import DataError


def model(channels=(1, 16, 16, 1), seed=1, normalize="per-image"):
    net = Network(channels)
    return Model("m.npz", net, init_params(net, seed), normalize)


@pytest.mark.parametrize("shape, tile, halo, rows", [((37, 53), 8, 3, 1), ((37, 53), 16, 3, 4),
                                                   ((10, 10), 4, 5, 1), ((5, 9), 0, 3, 5)])
def test_strip_cores_partition_the_rows_and_windows_add_the_clipped_halo(shape, tile, halo, rows):
    cover = np.zeros(shape[0], int)
    for (start, stop), (top, bottom) in strips(shape, tile, halo):
        cover[top:bottom] += 1
        assert bottom - top <= rows and (bottom - top == rows or bottom == shape[0])
        assert start == max(0, top - halo) and stop == min(shape[0], bottom + halo)
    assert (cover == 1).all()


@pytest.mark.parametrize("tile", [4, 16, 40])
def test_tiles_are_bit_identical_to_the_whole_image(rng, tile):
    image = rng.standard_normal((37, 53)).astype(np.float32)
    be = get_backend("reference")
    whole = TiledDenoiser(model(), be, tile=0)(image)
    assert np.array_equal(bits(TiledDenoiser(model(), be, tile=tile)(image)), bits(whole))


def test_a_halo_short_of_the_receptive_radius_changes_the_bits(rng):
    image = rng.standard_normal((30, 30)).astype(np.float32)
    be = get_backend("reference")
    whole = TiledDenoiser(model(), be, tile=0)(image)
    short = TiledDenoiser(model(), be, tile=15, halo=2)(image)
    assert not np.array_equal(bits(short), bits(whole))


def test_normalization_is_undone_on_output(rng):
    """A one-layer network y = 2x (no ReLU) on standardized pixels gives 2 image - mean in the
    image's own units."""
    identity = model(channels=(1, 1))
    params = dict(identity.params)
    params["layers.0.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    params["layers.0.weight"][0, 0, 1, 1] = 2
    params["layers.0.bias"] = np.zeros(1, np.float32)
    double = Model("m.npz", identity.network, params, "per-image")
    image = (rng.standard_normal((12, 15)) * 30 + 500).astype(np.float32)
    out = TiledDenoiser(double, get_backend("reference"), tile=5).denoise(image)
    expected = 2 * image.astype(np.float64) - image.mean(dtype=np.float64)
    assert out.dtype == np.float32
    assert np.allclose(out, expected, rtol=1e-6, atol=0)
    raw = Model("m.npz", identity.network, params, "none")
    assert np.array_equal(bits(TiledDenoiser(raw, get_backend("reference")).denoise(image)),
                          bits(2 * image))


def save_model(path, channels=(1, 16, 16, 1), normalize="per-image", params=None):
    net = Network(channels)
    checkpoint.save(path, params or init_params(net, 0), {},
                    {"network": {"channels": list(channels)}, "normalize": normalize})
    return str(path)


def test_load_model_reads_a_checkpoint(tmp_path):
    m = load_model(save_model(tmp_path / "m.npz", normalize="none"))
    assert m.network.channels == (1, 16, 16, 1) and m.normalize == "none"
    assert m.params["layers.2.weight"].shape == (1, 16, 3, 3)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"), ("not-npz", "not a .npz checkpoint"),
    ("no-meta", "no 'meta' entry"), ("two-channel", "maps 2 channels to 1"),
    ("nan", "layers.0.weight is not finite")])
def test_load_model_names_the_file_and_the_problem(tmp_path, case, message):
    path = tmp_path / "m.npz"
    if case == "not-npz":
        path.write_bytes(b"MRC" * 100)
    elif case == "no-meta":
        np.savez(path, x=np.zeros(3))
    elif case == "two-channel":
        save_model(path, channels=(2, 4, 1))
    elif case == "nan":
        params = init_params(Network(), 0)
        params["layers.0.weight"][0, 0, 0, 0] = np.nan
        save_model(path, params=params)
    with pytest.raises(DataError, match=f"^{path}: .*{message}"):
        load_model(path)


@pytest.mark.gpu
def test_gpu_tiles_are_bit_identical_to_the_whole_image_and_to_the_reference(rng):
    image = rng.standard_normal((1000, 1300)).astype(np.float32)
    gpu = get_backend("gpu")
    reference = TiledDenoiser(model(), get_backend("reference"), tile=0)(image)
    for tile in (0, 1, 256, 333):
        assert np.array_equal(bits(TiledDenoiser(model(), gpu, tile=tile)(image)),
                              bits(reference)), tile


def test_tiles_through_the_kernel_backend_equal_the_reference(rng):
    """The device-array path (copies in and out of strips, buffer views) with the kernels, in
    the simulator where there is no GPU."""
    from cryokern.kernels import gpu_backend
    small = model(channels=(1, 4, 4, 1))
    image = rng.standard_normal((9, 10)).astype(np.float32)
    want = TiledDenoiser(small, get_backend("reference"), tile=0)(image)
    assert np.array_equal(bits(TiledDenoiser(small, gpu_backend(), tile=4)(image)), bits(want))


def unet_model(widths=(4, 6, 8), residual=False, seed=2):
    net = UNet(widths, residual=residual)
    return Model("m.npz", net, init_params(net, seed), "per-image")


@pytest.mark.parametrize("widths, shape, residual", [((4, 6, 8), (61, 43), False),
                                                     ((4, 6, 8), (61, 43), True),
                                                     ((3, 4, 5, 6), (45, 37), True)])
@pytest.mark.parametrize("tile", [2, 9, 20])
def test_unet_tiles_are_bit_identical_to_the_whole_image(rng, widths, shape, residual, tile):
    """Odd sides (padded at the bottom and right), cores of one pooling grid (tile 2) up to
    several, halos larger than the cores and, for three poolings (halo 48), than the image."""
    image = rng.standard_normal(shape).astype(np.float32)
    be = get_backend("cpu")
    m = unet_model(widths, residual)
    whole = TiledDenoiser(m, be, tile=0)(image)
    tiled = TiledDenoiser(m, be, tile=tile)
    grid = 2 ** (len(widths) - 1)
    assert m.network.receptive_radius == 6 * grid - 2
    assert tiled.halo == 6 * grid      # rounded up to the grid
    assert len(list(strips(shape, tile, tiled.halo, tiled.grid))) > 1
    assert np.array_equal(bits(tiled(image)), bits(whole))


@pytest.mark.parametrize("widths, residual", [((4, 6, 8), True), ((8, 5, 3), False),
                                              ((2, 7, 3, 9), True)])
def test_unet_arrays_sharing_memory_give_the_bits_of_arrays_of_their_own(rng, widths,
                                                                         residual):
    """The denoiser's forward pass reuses an array's memory after its last read (widths that
    grow, shrink and alternate, so each shared buffer is sized by another array): the same
    bits as model.forward with every array allocated apart, padding and residual included."""
    be = get_backend("cpu")
    m = unet_model(widths, residual)
    image = rng.standard_normal((29, 35)).astype(np.float32)
    params = {k: be.to_device(v) for k, v in m.params.items()}
    apart = forward(be, m.network, params, be.to_device(image[None, None]))
    assert np.array_equal(bits(TiledDenoiser(m, be, tile=0)(image)), bits(be.to_host(apart)[0, 0]))


class _OwnerCheckingBackend:
    """A backend proxy for the test below: every flat-buffer element remembers the array last
    written there; an operation may read an array only where it still owns its memory, and may
    not write where it reads (but for an elementwise add in place)."""

    def __init__(self, backend, flat, acts):
        self.backend, self.flat, self.acts = backend, flat, acts
        self.owner = np.full(flat.size, None, object)

    def _region(self, a):
        start = (a.ctypes.data - self.flat.ctypes.data) // 4
        inside = isinstance(a, np.ndarray) and 0 <= start < self.flat.size
        return (slice(start, start + a.size), self._name(a)) if inside else (None, None)

    def _name(self, a):
        return next(k for k, v in self.acts.items()
                    if v.ctypes.data == a.ctypes.data and v.shape == a.shape)

    def __getattr__(self, op):
        def call(*args, out=None, **kwargs):
            reads = [self._region(a) for a in list(args) + [kwargs.get("x2")]
                     if isinstance(a, np.ndarray)]
            written, name = self._region(out) if out is not None else (None, None)
            for region, read in reads:
                if region is not None:
                    assert (self.owner[region] == read).all(), f"{op} reads {read}, overwritten"
                    assert op == "add" or written is None or \
                        written.stop <= region.start or region.stop <= written.start, op
            result = getattr(self.backend, op)(*args, out=out, **kwargs)
            if written is not None:
                self.owner[written] = name
            return result
        return call


@pytest.mark.parametrize("widths, residual", [((4, 6, 8), True), ((8, 5, 3), False)])
def test_unet_arrays_share_memory_only_after_their_last_read(widths, residual):
    be = get_backend("cpu")
    m = unet_model(widths, residual)
    tiled = TiledDenoiser(m, be, tile=0)
    x, acts = tiled._unet_buffers(29, 35)
    params = {k: be.to_device(v) for k, v in m.params.items()}
    forward(_OwnerCheckingBackend(be, tiled._flat, acts), m.network, params, x, acts)


def test_unet_denoising_holds_three_arrays_a_level_instead_of_all():
    """48 wide, five poolings, a 1024 x 4096 window: ~193 floats a pixel, not ~337."""
    net = UNet()
    home, sizes = net.inference_buffers(1, 1024, 4096)
    every = sum(int(np.prod(s)) for s in net.activation_shapes(1, 1024, 4096).values())
    assert set(home.values()) == set(sizes)
    assert sum(sizes.values()) / (1024 * 4096) < 194 and every / (1024 * 4096) > 336


@pytest.mark.parametrize("widths, shape", [((4, 6, 8), (61, 43)), ((3, 4, 5, 6), (120, 20))])
def test_a_unet_halo_one_grid_short_of_the_radius_changes_the_bits(rng, widths, shape):
    """The derived radius is not merely large: the halo one pooling grid less (the largest that
    keeps the windows on the grid and is short of the radius) gives other bits."""
    image = rng.standard_normal(shape).astype(np.float32)
    be = get_backend("cpu")
    m = unet_model(widths)
    whole = TiledDenoiser(m, be, tile=0)(image)
    grid = 2 ** (len(widths) - 1)
    short = TiledDenoiser(m, be, tile=8, halo=TiledDenoiser(m, be).halo - grid)
    assert short.halo < m.network.receptive_radius
    assert not np.array_equal(bits(short(image)), bits(whole))


def test_unet_strips_start_on_the_pooling_grid():
    for (start, stop), (top, bottom) in strips((61, 43), 9, 24, 4):
        assert start % 4 == top % 4 == 0 and (bottom % 4 == 0 or bottom == 61)


def test_unet_device_memory_is_bounded_by_the_tile(rng):
    be = get_backend("cpu")
    sizes = []
    for height in (64, 200):
        tiled = TiledDenoiser(unet_model(), be, tile=8)
        tiled(rng.standard_normal((height, 16)).astype(np.float32))
        sizes.append(tiled.device_bytes())
    assert sizes[0] == sizes[1]


def test_unet_tiles_on_the_gpu_backend_equal_the_reference_whole_image(rng):
    """Device arrays carved from one flat buffer per strip (simulator-sized: one pooling)."""
    image = rng.standard_normal((13, 4)).astype(np.float32)
    m = unet_model((1, 2), residual=True)
    whole = TiledDenoiser(m, get_backend("reference"), tile=0)(image)
    tiled = TiledDenoiser(m, get_backend("gpu"), tile=4)
    assert len(list(strips(image.shape, 4, tiled.halo, tiled.grid))) == 4
    assert np.array_equal(bits(tiled(image)), bits(whole))


@pytest.mark.parametrize("widths, shape", [((4, 6, 8), (203, 40)), ((4, 6, 8), (190, 37)),
                                          (None, (57, 31))])
def test_the_default_strips_are_as_tall_as_the_memory_budget_allows(rng, widths, shape):
    """Without --tile: the whole image where its window fits the budget, else the tallest
    cores (on the pooling grid) whose windows fit; the same bits either way."""
    m = unet_model(widths) if widths else model(channels=(1, 4, 4, 1))
    be = get_backend("cpu")
    image = rng.standard_normal(shape).astype(np.float32)
    roomy = TiledDenoiser(m, be, memory=1 << 30)
    assert roomy.core_rows(shape) == shape[0]
    whole = roomy(image)
    budget = roomy.window_bytes(shape[0] // 2, shape[1])
    tight = TiledDenoiser(m, be, memory=budget)
    rows = tight.core_rows(shape)
    assert rows % tight.grid == 0 and rows < shape[0]
    assert tight.strips_bytes(rows, shape[1]) <= budget < \
        tight.strips_bytes(rows + tight.grid, shape[1])
    assert np.array_equal(bits(tight(image)), bits(whole))
    assert tight.device_bytes() <= budget


def test_the_default_budget_is_half_the_free_memory():
    be = get_backend("cpu")
    tiled = TiledDenoiser(model(), be)
    tiled.core_rows((64, 64))
    assert 0 < tiled.memory <= be.free_memory() // 2 + (64 << 20)
