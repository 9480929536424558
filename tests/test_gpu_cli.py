"""The denoise and evaluate commands on the GPU (page-locked slots, reader and writer threads,
tiles on the device): their outputs equal the CPU run's, byte for byte (headers included: both
copy the input's header and labels, and add the same label)."""
import json

import numpy as np
import pytest

from conftest import write_mrc
from cryokern import checkpoint, denoise, evaluate
from cryokern.model import Network, init_params

pytestmark = pytest.mark.gpu


@pytest.fixture
def model_path(tmp_path):
    net = Network()
    path = str(tmp_path / "model.npz")
    checkpoint.save(path, init_params(net, 6), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    return path


def test_denoise_on_the_gpu_writes_the_bytes_of_the_cpu_run(tmp_path, rng, model_path):
    """A stack longer than the pipeline's slots (so slots are reused), and a 2-D int16 image;
    tiles of strips on the GPU, whole images on the CPU."""
    inputs = [write_mrc(tmp_path / "stack.mrcs",
                        (rng.standard_normal((9, 300, 420)) * 4 + 20).astype(np.float32)),
              write_mrc(tmp_path / "image.mrc",
                        rng.integers(-500, 500, (257, 333)).astype(np.int16))]
    runs = {"gpu": ["--tile", "128"], "cpu": ["--tile", "0"]}
    for device, options in runs.items():
        out = tmp_path / device
        assert denoise.main([model_path, *inputs, "-o", str(out), "--device", device,
                             *options]) == 0
    for name in ("stack.mrcs", "image.mrc"):
        assert (tmp_path / "gpu" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes()


def test_evaluate_on_the_gpu_scores_as_the_cpu_run(tmp_path, rng, model_path):
    clean = rng.random((3, 200, 230)).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    files = ["--noisy", write_mrc(tmp_path / "n.mrcs", noisy),
             "--clean", write_mrc(tmp_path / "c.mrcs", clean)]
    reports = {}
    for device in ("gpu", "cpu"):
        path = tmp_path / f"{device}.json"
        assert evaluate.main([model_path, *files, "--json", str(path), "--device", device]) == 0
        reports[device] = json.loads(path.read_text())
    assert reports["gpu"]["backend"] != reports["cpu"]["backend"]
    for report in reports.values():
        del report["backend"], report["seconds"]
    assert reports["gpu"] == reports["cpu"]
