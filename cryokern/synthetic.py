"""The built-in demo dataset, so that `python -m cryokern.train` works with no data and shows
whether the network denoises.

Simulated micrographs (cryokern.simulate: random proteins through a 300 kV CTF, ice, Poisson
noise at 40 e-/Å²) of SIZE² pixels of PIXEL_SIZE Å, i.e. micrographs binned to where a
particle is 25-40 pixels across: small enough that the NumPy reference trains on them in well
under a minute, large enough to hold a particle. Noise2Noise pairs (even half -> odd half) for
training and validation, and the validation images' ground truth, against which `train` scores
the noisy input and the network before and after training. Generated deterministically on
first use into the cache root ($CRYOKERN_CACHE, else $XDG_CACHE_HOME/cryokern, else
~/.cache/cryokern) and reused.
"""
import os
import tempfile

import mrcfile
import numpy as np

from .cachedir import cache_root
from .inference import TiledDenoiser
from .metrics import fitted_metrics
from .simulate import Simulator

VERSION = "simulated-v1"
SIZE = 40                 # pixels per side
PIXEL_SIZE = 4.0          # Å per pixel
TRAIN, VAL = 48, 8        # micrographs
SEED = 20261130


def cache_dir():
    return cache_root() / VERSION


def _write(path, data):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mrcs", dir=path.parent)
    os.close(fd)
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = PIXEL_SIZE
    os.replace(tmp, path)


def dataset():
    """{'train': (noisy, clean), 'val': (noisy, clean), 'val_truth': path}, generated if
    missing: noisy is each micrograph's even half, clean its odd half (Noise2Noise)."""
    d = cache_dir()
    files = {split: (d / f"{split}_noisy.mrcs", d / f"{split}_clean.mrcs")
             for split in ("train", "val")}
    files["val_truth"] = d / "val_truth.mrcs"
    paths = [files["val_truth"], *files["train"], *files["val"]]
    if all(p.exists() for p in paths):
        return files
    d.mkdir(parents=True, exist_ok=True)
    simulator = Simulator(SEED, (SIZE, SIZE), PIXEL_SIZE)
    micrographs = [simulator.micrograph(i) for i in range(TRAIN + VAL)]
    for split, part in (("train", micrographs[:TRAIN]), ("val", micrographs[TRAIN:])):
        _write(files[split][0], np.stack([m.even for m in part]))
        _write(files[split][1], np.stack([m.odd for m in part]))
    _write(files["val_truth"], np.stack([m.truth for m in micrographs[TRAIN:]]))
    return files


def truth_scores(models, backend):
    """{name: (mean Pearson r, mean PSNR in dB)} of the validation images against their
    ground truth (cryokern.metrics.fitted_metrics: PSNR after the least-squares affine fit),
    for the noisy input and for each of `models` ({name: inference.Model}) applied to it."""
    files = dataset()
    with mrcfile.open(files["val"][0]) as noisy, mrcfile.open(files["val_truth"]) as truth:
        pairs = list(zip(noisy.data.copy(), truth.data.copy()))
    outputs = {"noisy input": [n for n, _ in pairs]}
    for name, model in models.items():
        denoiser = TiledDenoiser(model, backend, tile=0)
        outputs[name] = [denoiser.denoise(n) for n, _ in pairs]
    scores = {}
    for name, images in outputs.items():
        m = [fitted_metrics(image, t, ssim=False) for image, (_, t) in zip(images, pairs)]
        scores[name] = (float(np.mean([s["pearson"] for s in m])),
                        float(np.mean([s["psnr_fit"] for s in m])))
    return scores
