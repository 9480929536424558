"""python -m cryokern.denoise: outputs equal the library's, valid MRC with the input's metadata,
tile-independent, streamed, and never written over an input."""
import os
import tracemalloc

import mrcfile
import numpy as np
import pytest

from conftest import bits, write_mrc
from cryokern import checkpoint
from cryokern.backends import get_backend
from cryokern.denoise import denoise_file, main
from cryokern.inference import Model, TiledDenoiser, load_model
from cryokern.model import Network, init_params
from cryokern.mrcstack import MrcStack


@pytest.fixture
def model_path(tmp_path):
    net = Network()
    path = str(tmp_path / "model.npz")
    checkpoint.save(path, init_params(net, 2), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    return path


@pytest.fixture
def inputs(tmp_path, rng):
    d = tmp_path / "in"
    d.mkdir()
    stack = write_mrc(d / "stack.mrcs", (rng.standard_normal((3, 21, 34)) * 5 + 40)
                      .astype(np.float32), voxel_size=1.7)
    image = write_mrc(d / "image.mrc", rng.integers(-300, 300, (26, 19)).astype(np.int16),
                      voxel_size=0.85)
    volume = write_mrc(d / "volume.mrc", rng.random((2, 15, 16)).astype(np.float32),
                       layout="volume")
    with mrcfile.open(stack, "r+") as mrc:
        mrc.header.origin = (11.0, 12.0, 0.0)
    return [stack, image, volume]


def expected(model_path, path):
    denoiser = TiledDenoiser(load_model(model_path), get_backend("reference"), tile=0)
    stack = MrcStack(path)
    return np.array([denoiser.denoise(stack.read(i, np.empty(stack.shape, np.float32)))
                     for i in range(len(stack))])


def test_outputs_equal_the_library_result_and_keep_the_metadata(tmp_path, model_path, inputs):
    out = tmp_path / "out"
    assert main([model_path, *inputs, "-o", str(out), "--tile", "8", "--device", "cpu"]) == 0
    for path in inputs:
        target = str(out / os.path.basename(path))
        assert mrcfile.validate(target, print_file=open(os.devnull, "w"))
        src, dst = MrcStack(path), MrcStack(target)
        assert (dst.layout, dst.shape, len(dst)) == (src.layout, src.shape, len(src))
        assert dst.voxel_size == pytest.approx(src.voxel_size, rel=1e-6)
        assert dst.origin == src.origin
        with mrcfile.open(target) as mrc:
            assert mrc.header.mode == 2
            data = mrc.data.reshape((len(dst),) + dst.shape)
        assert np.array_equal(bits(data), bits(expected(model_path, path)))


def test_output_does_not_depend_on_the_tile(tmp_path, model_path, inputs):
    for tile in ("0", "5", "13"):
        assert main([model_path, inputs[0], "-o", str(tmp_path / tile), "--tile", tile,
                     "--device", "cpu"]) == 0
    data = []
    for tile in ("0", "5", "13"):
        with mrcfile.open(tmp_path / tile / "stack.mrcs") as mrc:
            data.append(bits(mrc.data))
    assert np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2])


def test_float16_output(tmp_path, model_path, inputs):
    assert main([model_path, inputs[0], "-o", str(tmp_path / "o"), "--float16",
                 "--device", "cpu"]) == 0
    with mrcfile.open(tmp_path / "o" / "stack.mrcs") as mrc:
        assert mrc.header.mode == 12
        assert np.array_equal(bits(mrc.data, np.float16),
                              bits(expected(model_path, inputs[0]).astype(np.float16), np.float16))


def test_inputs_are_never_written_over(tmp_path, model_path, inputs, capsys):
    before = [open(p, "rb").read() for p in inputs]
    in_dir = os.path.dirname(inputs[0])
    assert main([model_path, *inputs, "-o", in_dir, "--force", "--device", "cpu"]) == 2
    assert "stack.mrcs: is an input" in capsys.readouterr().err
    assert [open(p, "rb").read() for p in inputs] == before
    assert sorted(os.listdir(in_dir)) == ["image.mrc", "stack.mrcs", "volume.mrc"]


def test_existing_outputs_need_force(tmp_path, model_path, inputs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "image.mrc").write_bytes(b"keep me")
    assert main([model_path, *inputs, "-o", str(out), "--device", "cpu"]) == 2
    assert "image.mrc: exists; give --force" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["image.mrc"] and (out / "image.mrc").read_bytes() == b"keep me"
    assert main([model_path, *inputs, "-o", str(out), "--force", "--device", "cpu"]) == 0
    assert mrcfile.validate(out / "image.mrc", print_file=open(os.devnull, "w"))


@pytest.mark.parametrize("case", ["model", "input"])
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(tmp_path, model_path, inputs,
                                                              capsys, case):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 2000)
    args = [str(bad), *inputs] if case == "model" else [model_path, inputs[0], str(bad)]
    assert main(args + ["-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cryokern.denoise: error: {bad}: ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_stacks_are_streamed(tmp_path, rng):
    """Peak traced memory does not grow with the stack: 16 and 256 images need the same few
    dozen images' worth, give or take the timing of the threads (a one-layer network, so that
    the reference's work arrays stay small)."""
    net = Network((1, 1))
    denoiser = TiledDenoiser(Model("m.npz", net, init_params(net, 0), "per-image"),
                             get_backend("reference"))
    peaks = {}
    for count in (4, 16, 256):       # the first run warms up one-off allocations
        path = write_mrc(tmp_path / f"s{count}.mrcs",
                         rng.standard_normal((count, 96, 96)).astype(np.float32))
        tracemalloc.start()
        denoise_file(MrcStack(path), tmp_path / f"o{count}.mrcs", denoiser)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    image_bytes = 96 * 96 * 4
    assert peaks[256] < peaks[16] + 16 * image_bytes, peaks
    assert peaks[256] < 256 * image_bytes / 6, peaks


def test_progress_counts_every_image(tmp_path, model_path, inputs):
    class Counter:
        n = 0

        def update(self, k):
            self.n += k
    counter = Counter()
    denoiser = TiledDenoiser(load_model(model_path), get_backend("reference"))
    denoise_file(MrcStack(inputs[0]), tmp_path / "o.mrcs", denoiser, progress=counter)
    assert counter.n == 3
