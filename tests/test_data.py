"""Epoch order, crops, the validation split and normalization: functions of the seed alone."""
import itertools

import mrcfile
import numpy as np
import pytest

from conftest import bits
from cryokern.data import (BatchLoader, PairedImages, Subset, epoch_batches, fill_image,
                           normalization, normalize, split)
from cryokern.mrcstack import DataError


def stack_pair(tmp_path, n=7, shape=(10, 14), bad=None):
    """A noisy stack and its clean half; bad = (file name, image, row, column, value) puts
    one non-finite pixel in a copy of that file's data."""
    data = np.random.default_rng(0).standard_normal((n,) + shape).astype(np.float32) * 3 + 5
    paths = []
    for name, d in (("noisy", data), ("clean", data * 0.5)):
        if bad is not None and bad[0] == name:
            d = d.copy()
            d[bad[1:4]] = bad[4]
        p = str(tmp_path / f"{name}.mrcs")
        with mrcfile.new(p) as mrc:
            mrc.set_data(d)
        paths.append(p)
    return PairedImages([tuple(paths)]), data


def test_epoch_order_and_crops_depend_on_seed_and_epoch_only(tmp_path):
    images, _ = stack_pair(tmp_path)
    sub = Subset(images, np.arange(7), crop=6)
    a = epoch_batches(sub, 3, seed=1, epoch=2)
    b = epoch_batches(sub, 3, seed=1, epoch=2)
    c = epoch_batches(sub, 3, seed=1, epoch=3)
    assert [len(s.indices) for s in a] == [3, 3, 1]
    assert all(np.array_equal(x.indices, y.indices) and np.array_equal(x.corners, y.corners)
               for x, y in zip(a, b))
    assert not all(np.array_equal(x.indices, y.indices) for x, y in zip(a, c))
    corners = np.concatenate([s.corners for s in a])
    assert corners.min() >= 0 and (corners <= np.array([10 - 6, 14 - 6])).all()
    assert sorted(np.concatenate([s.indices for s in a])) == list(range(7))


def test_validation_split_is_seeded_and_disjoint():
    class Seven:
        def __len__(self):
            return 7
    train, val = split(Seven(), 0.3, seed=4)
    assert len(val) == 2 and set(train).isdisjoint(val) and len(train) + len(val) == 7
    assert np.array_equal(split(Seven(), 0.3, seed=4)[1], val)


def test_per_image_normalization_standardizes_noisy_and_maps_clean_alike():
    rng = np.random.default_rng(0)
    noisy = (rng.standard_normal((8, 9)) * 4 + 10).astype(np.float32)
    clean = (noisy * 0.5 + 1).astype(np.float32)
    affine = normalization(noisy, "per-image")
    a, b = normalize(noisy, affine), normalize(clean, affine)
    assert abs(a.mean()) < 1e-6 and abs(a.std() - 1) < 1e-6
    m, s = noisy.mean(dtype=np.float64), noisy.std(dtype=np.float64)
    assert np.allclose(b, (clean - m) / s, atol=1e-6)
    assert normalization(noisy, "none") is None and normalize(noisy, None) is noisy


def test_loader_yields_the_batches_in_order(tmp_path):
    images, data = stack_pair(tmp_path)
    sub = Subset(images, np.arange(7))
    specs = epoch_batches(sub, 3, seed=0, epoch=0)
    buffers = [(np.empty((3, 1, 10, 14), np.float32), np.empty((3, 1, 10, 14), np.float32))
               for _ in range(2)]
    loader = BatchLoader(sub, specs, "none", buffers)
    for spec, (noisy, clean, lo, hi) in zip(specs, loader):
        assert np.array_equal(noisy[:, 0], data[spec.indices])
        assert np.array_equal(clean[:, 0], data[spec.indices] * 0.5)
        assert (lo, hi) == (clean.min(), clean.max())
    loader.close()
    loader = BatchLoader(sub, specs, "per-image", buffers, workers=3)
    for spec, (noisy, clean, _, _) in zip(specs, loader):
        for k, i in enumerate(spec.indices):
            affine = normalization(data[i], "per-image")
            assert np.array_equal(bits(noisy[k, 0]), bits(normalize(data[i], affine)))
            assert np.array_equal(bits(clean[k, 0]), bits(normalize(data[i] * 0.5, affine)))
    loader.close()


def test_a_loader_over_several_epochs_gives_each_epochs_batches(tmp_path):
    """train's one loader for the whole run: specs drawn lazily, epoch after epoch, on the
    loader's thread; taken an epoch at a time, the batches of per-epoch loaders."""
    images, data = stack_pair(tmp_path)
    sub = Subset(images, np.arange(7))
    drawn = []

    def specs():
        for epoch in range(3):
            drawn.append(epoch)
            yield from epoch_batches(sub, 3, seed=0, epoch=epoch)
    buffers = [(np.empty((3, 1, 10, 14), np.float32), np.empty((3, 1, 10, 14), np.float32))
               for _ in range(2)]
    loader = BatchLoader(sub, specs(), "none", buffers)
    batches = iter(loader)
    for epoch in range(3):
        want = epoch_batches(sub, 3, seed=0, epoch=epoch)
        for spec, (noisy, _, _, _) in zip(want, itertools.islice(batches, len(want))):
            assert np.array_equal(noisy[:, 0], data[spec.indices])
        assert drawn[-1] <= epoch + 1       # two buffers: at most a batch or two ahead
    assert next(batches, None) is None
    loader.close()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # mrcfile's, writing the bad file
@pytest.mark.parametrize("mode", ["per-image", "none"])
@pytest.mark.parametrize("bad", [("noisy", 4, 2, 3, np.nan), ("noisy", 4, 9, 13, np.inf),
                                 ("clean", 4, 2, 3, -np.inf), ("clean", 4, 9, 13, np.nan)],
                         ids=["noisy-in-crop", "noisy-outside", "clean-in-crop",
                              "clean-outside"])
def test_a_non_finite_pixel_names_its_file_and_image(tmp_path, bad, mode):
    images, _ = stack_pair(tmp_path, bad=bad)
    out = np.empty((6, 6), np.float32), np.empty((6, 6), np.float32)
    fill_image(images, (6, 6), 3, (0, 0), mode, *out)       # a good image in the same files
    with pytest.raises(DataError, match=rf"{bad[0]}\.mrcs: image 4 has NaN or Inf"):
        fill_image(images, (6, 6), 4, (0, 0), mode, *out)
