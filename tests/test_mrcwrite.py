"""Streaming MRC writer: valid files, exact statistics, kept metadata, nothing left on failure."""
import os

import mrcfile
import numpy as np
import pytest

from conftest import write_mrc
from cryokern.mrcstack import DataError, MrcStack
from cryokern.mrcwrite import StackWriter, check_target


def write_all(path, images, **kw):
    with StackWriter(path, len(images), images.shape[1:], **kw) as w:
        for image in images:
            w.write(image)


@pytest.mark.parametrize("layout, count", [("image", 1), ("stack", 3), ("volume", 4)])
def test_written_file_is_valid_and_keeps_layout_voxel_size_and_origin(tmp_path, rng, layout, count):
    images = rng.standard_normal((count, 9, 13)).astype(np.float32)
    path = str(tmp_path / "out.mrc")
    write_all(path, images, layout=layout, voxel_size=(1.25, 1.5, 2.0),
              origin=((10.0, -4.0, 2.5), (3, 4, 5)))
    assert mrcfile.validate(path, print_file=open(os.devnull, "w"))
    with mrcfile.open(path) as mrc:
        assert np.array_equal(mrc.data, images[0] if layout == "image" else images)
        assert mrc.voxel_size.item() == (1.25, 1.5, 2.0)
    stack = MrcStack(path)
    assert stack.layout == layout
    assert stack.origin == ((10.0, -4.0, 2.5), (3, 4, 5))
    assert sorted(os.listdir(tmp_path)) == ["out.mrc"]


def test_header_statistics_are_exact_with_a_large_mean(tmp_path, rng):
    images = (1e4 + rng.standard_normal((5, 20, 30))).astype(np.float32)
    path = str(tmp_path / "s.mrcs")
    write_all(path, images)
    with mrcfile.open(path, header_only=True) as mrc:
        h = mrc.header
        ref = images.astype(np.float64)
        assert (h.dmin, h.dmax) == (images.min(), images.max())
        assert h.dmean == np.float32(ref.mean())
        assert abs(float(h.rms) - ref.std()) <= 1e-6 * ref.std()


def test_float16_file_is_mode_12_and_overflow_is_refused(tmp_path, rng):
    images = rng.standard_normal((2, 8, 8)).astype(np.float32)
    path = str(tmp_path / "h.mrcs")
    write_all(path, images, dtype=np.float16)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 12
        assert np.array_equal(mrc.data, images.astype(np.float16))
    images[1, 3, 3] = 1e5
    with pytest.raises(ValueError, match="h2.mrcs: image 1 has values beyond float16"):
        write_all(str(tmp_path / "h2.mrcs"), images, dtype=np.float16)
    assert sorted(os.listdir(tmp_path)) == ["h.mrcs"]


def test_failure_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with StackWriter(tmp_path / "x.mrcs", 2, (4, 4)) as w:
            w.write(np.zeros((4, 4), np.float32))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_an_input_is_never_a_target_even_with_force(tmp_path):
    src = write_mrc(tmp_path / "in.mrc", np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="is an input"):
        check_target(src, [src], force=True)
    with pytest.raises(DataError, match="exists; give --force"):
        check_target(src, [], force=False)
    check_target(src, [], force=True)
    check_target(tmp_path / "new.mrc", [src], force=False)


def test_a_file_written_like_another_keeps_its_header_and_extended_header(tmp_path, rng):
    """Data placed after the extended header (nsymbt bytes), every header field but the mode,
    statistics and labels kept, one label added."""
    src = str(tmp_path / "src.mrcs")
    extended = bytes(range(256)) * 3 + b"tail"
    with mrcfile.new(src) as mrc:
        mrc.set_data(rng.integers(0, 60000, (2, 5, 6)).astype(np.uint16))
        mrc.set_extended_header(np.frombuffer(extended, "V1"))
        mrc.header.exttyp = b"SERI"
        mrc.header.mapc, mrc.header.mapr = 2, 1
        mrc.header.origin = (1.0, 2.0, 3.0)
        mrc.voxel_size = (0.5, 0.75, 1.0)
    images = rng.standard_normal((2, 5, 6)).astype(np.float32)
    path = str(tmp_path / "out.mrcs")
    with StackWriter(path, 2, (5, 6), label="made by a test", like=MrcStack(src)) as w:
        w.write(images[1], 1)
        w.write(images[0], 0)
    assert mrcfile.validate(path, print_file=open(os.devnull, "w"))
    assert os.path.getsize(path) == 1024 + len(extended) + images.nbytes
    with mrcfile.open(src) as a, mrcfile.open(path) as b:
        assert np.array_equal(b.data, images) and bytes(b.extended_header) == extended
        for field in ("exttyp", "nsymbt", "mapc", "mapr", "maps", "ispg", "origin", "cella",
                      "mx", "my", "mz", "nxstart"):
            assert b.header[field].tolist() == a.header[field].tolist(), field
        assert b.header.mode == 2 and b.get_labels() == a.get_labels() + ["made by a test"]


def test_labels_are_ascii_and_at_most_80_bytes(tmp_path):
    path = str(tmp_path / "l.mrc")
    with StackWriter(path, 1, (3, 3), layout="image", label="modèle " + "x" * 100) as w:
        w.write(np.zeros((3, 3), np.float32))
    with mrcfile.open(path) as mrc:
        assert mrc.get_labels() == [("mod?le " + "x" * 100)[:80]]
