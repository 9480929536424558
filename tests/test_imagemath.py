"""Host image statistics and maps: the documented summation order, exactly; float64 maps."""
import numpy as np
import pytest

from conftest import bits
from cryokern import imagemath


def lane_ordered_sum(values):
    """The order imagemath documents, written independently: lane i % 64 as a sequential
    float64 chain (cumsum is sequential), then lanes added pairwise."""
    flat = values.reshape(-1).astype(np.float64)
    lanes = [np.cumsum(flat[k::64])[-1] if flat[k::64].size else 0.0 for k in range(64)]
    while len(lanes) > 1:
        lanes = [lanes[2 * k] + lanes[2 * k + 1] for k in range(len(lanes) // 2)]
    return lanes[0]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 64), (37, 101)])
def test_statistics_follow_the_documented_order(shape):
    image = (np.random.default_rng(1).standard_normal(shape) * 1e3 + 7).astype(np.float32)
    count, mean, ssd, lo, hi = imagemath.statistics(image)
    assert count == image.size
    assert mean == lane_ordered_sum(image) / image.size
    deviations = image.astype(np.float64) - mean
    assert ssd == lane_ordered_sum(deviations * deviations)
    assert (lo, hi) == (image.min(), image.max())


def test_statistics_are_close_to_numpys():
    image = (np.random.default_rng(2).standard_normal((300, 200)) * 5 + 1e4).astype(np.float32)
    _, mean, ssd, _, _ = imagemath.statistics(image)
    assert np.isclose(mean, image.mean(dtype=np.float64), rtol=1e-14)
    assert np.isclose(ssd / image.size, image.var(dtype=np.float64), rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_pixel_makes_the_sum_non_finite(bad):
    image = np.ones((9, 70), np.float32)
    image[8, 69] = bad
    assert not np.isfinite(imagemath.sum_and_range(image)[0])


def test_float16_images_are_read_exactly():
    image = np.random.default_rng(3).standard_normal((16, 33)).astype(np.float16)
    assert imagemath.statistics(image) == imagemath.statistics(image.astype(np.float32))


def test_maps_round_the_float64_formula_once():
    rng = np.random.default_rng(4)
    image = (rng.standard_normal((50, 77)) * 30 + 3).astype(np.float32)
    mean, scale = 3.0000001, 1 / 29.7
    expected = ((image.astype(np.float64) - mean) * scale).astype(np.float32)
    assert np.array_equal(bits(imagemath.standardize(image, mean, scale)), bits(expected))
    back = (expected.astype(np.float64) / scale + mean).astype(np.float32)
    assert np.array_equal(bits(imagemath.destandardize(expected, mean, scale)), bits(back))


def test_maps_take_crops_and_write_into_out():
    image = np.arange(12 * 20, dtype=np.float32).reshape(12, 20)
    out = np.empty((5, 7), np.float32)
    got = imagemath.standardize(image[3:8, 4:11], 1.0, 0.5, out)
    assert got is out and np.array_equal(bits(out), bits((image[3:8, 4:11] - 1) * np.float32(0.5)))


@pytest.mark.parametrize("shape", [(3, 5), (4, 64), (7, 150)])
def test_standardize_with_range_is_the_map_and_its_range(shape):
    image = (np.random.default_rng(5).standard_normal(shape) * 8 + 2).astype(np.float32)
    out = np.empty(shape, np.float32)
    lo, hi, finite = imagemath.standardize_with_range(image, 2.5, 1 / 7.9, out)
    want = imagemath.standardize(image, 2.5, 1 / 7.9)
    assert np.array_equal(bits(out), bits(want)) and (lo, hi) == (want.min(), want.max()) and finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (6, 149), (3, 100)])
def test_standardize_with_range_flags_a_non_finite_pixel(bad, where):
    image = np.ones((7, 150), np.float32)
    image[where] = bad
    assert imagemath.standardize_with_range(image, 0.0, 1.0, np.empty_like(image))[2] is False
