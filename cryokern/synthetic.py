"""The built-in synthetic dataset, so that `python -m cryokern.train` works with no data.

Particle-like clean images (elliptical Gaussian blobs of random size, orientation and density
on a flat background) and noisy observations with Poisson (shot) noise at a low dose plus
Gaussian read noise, as MRC stacks. Generated deterministically on first use into a cache
directory ($CRYOKERN_CACHE, else $XDG_CACHE_HOME/cryokern, else ~/.cache/cryokern) and reused.
"""
import os
import tempfile

import mrcfile
import numpy as np

from .cachedir import cache_root

VERSION = "synthetic-v1"
SIZE = 64                 # pixels per side: small enough to train in about a minute on a CPU
TRAIN, VAL = 48, 16       # images
DOSE = 20.0               # expected photons per unit of clean density
READ_NOISE = 0.05         # Gaussian sigma, in units of clean density
SEED = 20261124


def cache_dir():
    return cache_root() / VERSION


def particles(rng, n, size):
    """n clean images: 4 to 9 blobs each, densities in (0.3, 1), on a 0.1 background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.full((n, size, size), 0.1)
    for img in images:
        for _ in range(rng.integers(4, 10)):
            cy, cx = rng.uniform(4, size - 4, 2)
            sy, sx = rng.uniform(1.5, 5.0, 2)
            t = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dy * np.cos(t) + dx * np.sin(t)) / sy
            v = (-dy * np.sin(t) + dx * np.cos(t)) / sx
            img += rng.uniform(0.3, 1.0) * np.exp(-0.5 * (u * u + v * v))
    return images


def observe(rng, clean):
    return rng.poisson(clean * DOSE) / DOSE + rng.normal(0.0, READ_NOISE, clean.shape)


def _write(path, data):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mrcs", dir=path.parent)
    os.close(fd)
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = 1.0
    os.replace(tmp, path)


def dataset():
    """{'train': (noisy, clean), 'val': (noisy, clean)} paths, generated if missing."""
    d = cache_dir()
    files = {split: (d / f"{split}_noisy.mrcs", d / f"{split}_clean.mrcs")
             for split in ("train", "val")}
    if all(p.exists() for pair in files.values() for p in pair):
        return files
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for split, n in (("train", TRAIN), ("val", VAL)):
        clean = particles(rng, n, SIZE)
        noisy = observe(rng, clean)
        _write(files[split][1], clean)
        _write(files[split][0], noisy)
    return files
