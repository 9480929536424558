"""MRC stacks read image by image: modes, layouts, and a clear error for each bad file."""
import mrcfile
import numpy as np
import pytest

from cryokern.mrcstack import DataError, MrcStack


def write(path, data):
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(data)
    return str(path)


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2),
                                        (np.uint16, 6), (np.float16, 12)])
def test_reads_each_supported_mode_as_float32(tmp_path, dtype, mode):
    data = (np.arange(3 * 5 * 7) % 100).reshape(3, 5, 7).astype(dtype)
    stack = MrcStack(write(tmp_path / "a.mrcs", data))
    assert (len(stack), stack.shape) == (3, (5, 7))
    with mrcfile.open(stack.path, header_only=True) as mrc:
        assert int(mrc.header.mode) == mode
    out = np.empty((5, 7), np.float32)
    for i in range(3):
        assert np.array_equal(stack.read(i, out), data[i].astype(np.float32))


def test_a_2d_file_is_one_image(tmp_path):
    data = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    stack = MrcStack(write(tmp_path / "one.mrc", data))
    assert (len(stack), stack.shape) == (1, (6, 4))
    assert np.array_equal(stack.read(0, np.empty((6, 4), np.float32)), data)


def test_extended_header_is_skipped(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "ext.mrcs"
    with mrcfile.new(str(path)) as mrc:
        mrc.set_extended_header(np.zeros(10, dtype=[("x", "f4")]))
        mrc.set_data(data)
    assert np.array_equal(MrcStack(path).read(1, np.empty((3, 4), np.float32)), data[1])


def expect_error(path, words):
    with pytest.raises(DataError) as e:
        MrcStack(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.mrc", "no such file")


def test_not_an_mrc_file(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_bytes(b"hello" * 400)
    expect_error(path, "not a valid MRC file")


def test_truncated_data(tmp_path):
    path = write(tmp_path / "t.mrcs", np.zeros((4, 8, 8), np.float32))
    with open(path, "r+b") as f:
        f.truncate(1024 + 3 * 8 * 8 * 4 + 10)
    expect_error(path, "truncated")


def test_unsupported_mode(tmp_path):
    expect_error(write(tmp_path / "c.mrc", np.zeros((4, 4), np.complex64)), "mode 4")


def test_empty_stack(tmp_path):
    path = write(tmp_path / "e.mrcs", np.zeros((1, 8, 8), np.float32))
    with open(path, "r+b") as f:   # nz is the third int32 of the header
        f.seek(8)
        f.write(np.int32(0).tobytes())
    expect_error(path, "empty")


def test_nan_pixels_name_the_image(tmp_path):
    data = np.zeros((3, 4, 4), np.float32)
    data[2, 1, 1] = np.inf
    stack = MrcStack(write(tmp_path / "n.mrcs", data))
    stack.read(1, np.empty((4, 4), np.float32))
    with pytest.raises(DataError, match=r"n\.mrcs: image 2 has NaN or Inf"):
        stack.read(2, np.empty((4, 4), np.float32))
