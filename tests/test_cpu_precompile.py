"""The CPU backend's compile workers: the jobs are exactly the compiled functions and argument
types that real training steps call (other batch and image sizes than the recording's), and a
worker compiles a job into numba's on-disk cache and marks it done."""
import numpy as np
import pytest

from cryokern.backends import get_backend
from cryokern.cpu import precompile as P
from cryokern.model import Network, UNet, init_params
from cryokern.step import OptimizerConfig, TrainStep


def _called(step, noisy, clean):
    """{(module, function, argument types)} of the compiled functions a training step and a
    validation loss call, recorded on the way through to the real functions."""
    found = set()
    patched = P._dispatchers()

    def spy(dispatcher):
        def call(*args):
            found.add(P._key(dispatcher) + (tuple(dispatcher.typeof_pyval(a) for a in args),))
            return dispatcher(*args)
        return call
    try:
        for module, name, dispatcher in patched:
            setattr(module, name, spy(dispatcher))
        step(noisy, clean)
        step.loss(noisy, clean)
    finally:
        for module, name, dispatcher in patched:
            setattr(module, name, dispatcher)
    return found


@pytest.mark.parametrize("network,optimizer,shape", [
    (Network((1, 3, 1)), OptimizerConfig("sgd", lr=0.1, momentum=0.9), (3, 1, 9, 11)),
    (UNet((2, 3), residual=True), OptimizerConfig("adam", lr=1e-3), (2, 1, 7, 10))],
    ids=["chain-sgd", "unet-adam"])
def test_jobs_are_what_a_step_calls(network, optimizer, shape):
    rng = np.random.default_rng(0)
    noisy, clean = (rng.random(shape, np.float32) for _ in range(2))
    step = TrainStep(get_backend("cpu"), network, init_params(network, 0), optimizer)
    jobs = P.jobs(network, optimizer)
    assert jobs[-1] == P.precompile.HOST_JOB
    assert set(jobs[:-1]) == _called(step, noisy, clean)
    assert len(set(jobs)) == len(jobs)


def test_longest_jobs_first():
    labels = [P.label(job) for job in P.jobs(UNet((2, 2, 2)), OptimizerConfig("adam"))]
    assert set(labels[:2]) == {"conv._conv_rows", "conv._weight_partials"}


def test_a_worker_fills_and_marks_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    job = next(j for j in P.jobs(Network((1, 2, 1)), OptimizerConfig("sgd"))
               if P.label(j) == "reduce._fold_images")
    marker = tmp_path / "ready.json"
    P.precompile.Compiling([job], marker, 1, worker=P.__name__, label=P.label).wait()
    assert marker.exists()
    assert list((tmp_path / "numba").rglob("reduce._fold_images-*.nbi"))
