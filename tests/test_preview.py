"""denoise --preview: binned, percentile-clipped 8-bit PNG/JPEG beside each output, one per
image; PNG written without Pillow and read back by an independent decoder and by Pillow."""
import os
import struct
import sys
import zlib

import mrcfile
import numpy as np
import pytest

from conftest import write_mrc
from cryokern import checkpoint
from cryokern.denoise import main
from cryokern.model import Network, init_params
from cryokern.preview import (CLIP_PERCENTILES, bin_factor, binned, png_bytes, preview_pixels)


def decode_png(data):
    """8-bit greyscale PNG pixels, by the specification (filter type 0 rows only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == \
            zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:]


@pytest.mark.parametrize("shape, factor", [
    ((4096, 4096), 4), ((5760, 4092), 6), ((1024, 700), 1), ((1025, 10), 2), ((10, 3000), 3)])
def test_bin_factor_brings_the_long_side_to_1024_or_less(shape, factor):
    assert bin_factor(shape) == factor
    assert -(-max(shape) // factor) <= 1024          # the binned long side
    if factor > 1:
        assert -(-max(shape) // (factor - 1)) > 1024


def test_binned_shape_counts_the_narrower_edge_blocks():
    assert binned(np.zeros((1025, 10), np.float32), 2).shape == (513, 5)


def test_binning_is_the_mean_of_each_block(rng):
    image = rng.standard_normal((11, 14)).astype(np.float32)
    got = binned(image, 4)
    for i in range(3):
        for j in range(4):
            block = image[4 * i:4 * i + 4, 4 * j:4 * j + 4].astype(np.float64)
            assert got[i, j] == pytest.approx(block.mean(), rel=1e-12, abs=1e-15)


def test_pixels_are_clipped_at_the_percentiles(rng):
    image = rng.random((200, 300)).astype(np.float32)
    image[5, 5], image[6, 6] = 1e6, -1e6          # a hot and a dead pixel
    pixels = preview_pixels(image)
    lo, hi = np.percentile(image.astype(np.float64), CLIP_PERCENTILES)
    want = np.rint((np.clip(image, lo, hi) - lo) / (hi - lo) * 255)
    assert np.abs(pixels.astype(int) - want).max() <= 1
    assert (pixels[5, 5], pixels[6, 6]) == (255, 0)
    # the hot pixel does not grey out the rest: the bulk still spans the range
    assert np.percentile(pixels, 5) < 30 and np.percentile(pixels, 95) > 225
    assert (preview_pixels(np.full((4, 5), 3.0, np.float32)) == 128).all()


def test_png_is_read_back_by_a_decoder_and_by_pillow(rng, tmp_path):
    pixels = rng.integers(0, 256, (37, 53)).astype(np.uint8)
    data = png_bytes(pixels)
    assert np.array_equal(decode_png(data), pixels)
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "p.png").write_bytes(data)
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), pixels)


@pytest.fixture
def model_path(tmp_path):
    net = Network((1, 2, 1))
    path = str(tmp_path / "model.npz")
    checkpoint.save(path, init_params(net, 3), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    return path


@pytest.fixture
def inputs(tmp_path, rng):
    d = tmp_path / "in"
    d.mkdir()
    return [write_mrc(d / "stack.mrcs", rng.random((3, 20, 30)).astype(np.float32)),
            write_mrc(d / "one.mrc", rng.random((1100, 9)).astype(np.float32))]


def test_png_previews_show_each_denoised_image(tmp_path, model_path, inputs):
    out = tmp_path / "out"
    assert main([model_path, *inputs, "-o", str(out), "--preview", "png", "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["one.mrc", "one.png", "stack.mrcs", "stack_0000.png",
                                       "stack_0001.png", "stack_0002.png"]
    with mrcfile.open(out / "stack.mrcs") as mrc:
        for i in range(3):
            got = decode_png((out / f"stack_000{i}.png").read_bytes())
            assert np.array_equal(got, preview_pixels(mrc.data[i]))
    with mrcfile.open(out / "one.mrc") as mrc:
        got = decode_png((out / "one.png").read_bytes())
        assert got.shape == (550, 5) and np.array_equal(got, preview_pixels(mrc.data))


def test_jpg_previews(tmp_path, model_path, inputs):
    Image = pytest.importorskip("PIL.Image")
    out = tmp_path / "out"
    assert main([model_path, inputs[0], "-o", str(out), "--preview", "jpg", "--device",
                 "cpu"]) == 0
    with mrcfile.open(out / "stack.mrcs") as mrc, Image.open(out / "stack_0001.jpg") as im:
        assert im.format == "JPEG" and im.size == (30, 20)
        assert np.abs(np.asarray(im, int) - preview_pixels(mrc.data[1])).mean() < 8


def test_jpg_without_pillow_is_refused_before_any_work(tmp_path, model_path, inputs, capsys,
                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)        # import PIL now fails
    out = tmp_path / "out"
    assert main([model_path, *inputs, "-o", str(out), "--preview", "jpg", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--preview jpg needs Pillow" in err and "cryokern[evaluate]" in err and "\n" not in err
    assert not out.exists()


def test_existing_previews_need_force_and_a_failed_file_leaves_none(tmp_path, model_path,
                                                                    inputs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stack_0002.png").write_bytes(b"keep")
    assert main([model_path, inputs[0], "-o", str(out), "--preview", "png", "--device",
                 "cpu"]) == 2
    assert "stack_0002.png: exists; give --force" in capsys.readouterr().err
    assert os.listdir(out) == ["stack_0002.png"]
    # the second image overflows float16: the first one's preview, already made, is removed
    big = write_mrc(tmp_path / "big.mrcs", np.array([[[0, 1], [3, 2]], [[0, 1e6], [3, 2]]],
                                                    np.float32))
    assert main([model_path, big, "-o", str(out), "--preview", "png", "--float16",
                 "--device", "cpu"]) == 2
    assert "big.mrcs: image 1 has values beyond float16's range" in capsys.readouterr().err
    assert os.listdir(out) == ["stack_0002.png"]
