"""Parallel precompilation: the jobs compile exactly the kernels a training step launches, the
workers run them, and the generated sources are written once (numba's cache keys on them)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cryokern import precompile
from cryokern.backends import get_backend
from cryokern.kernels import codegen
from cryokern.model import N2NUNet, UNet, forward, init_params
from cryokern.step import OptimizerConfig, TrainStep

SGD = OptimizerConfig("sgd", lr=0.1, momentum=0.9)


def _generated(cache):
    return sorted(p.name for p in (cache / "kernels").glob("*.py"))


@pytest.mark.parametrize("network,shape", [
    ((1, 2, 1), (2, 1, 5, 7)),                          # a chain's channel list, as train gives
    (UNet((1, 2), residual=True), (1, 1, 3, 5)),
    (N2NUNet(2, 1, 2, (1,), residual=True), (1, 1, 3, 5))], ids=["chain", "unet", "n2n"])
def test_jobs_compile_the_kernels_a_step_launches(tmp_path, monkeypatch, network, shape):
    """Every generated kernel module of a real step, validation loss and denoising forward pass
    (another batch and image size) comes from the jobs, and no other; the jobs run through the
    kernel functions."""
    optimizer = OptimizerConfig("adam", 1e-3)
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path / "jobs"))
    codegen.forget_generated()
    job_list = precompile.jobs(network, optimizer)
    assert job_list[-1] == precompile.HOST_JOB
    for job in job_list[:-1]:
        assert precompile.run_job(job) >= 0
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path / "step"))
    codegen.forget_generated()
    network = precompile.as_network(network)
    step = TrainStep(get_backend("gpu"), network, init_params(network, 0), optimizer)
    x = np.random.default_rng(0).random(shape, np.float32)
    step(x, x)
    step.loss(x, x)
    forward(step.backend, network, step.params, x)
    assert _generated(tmp_path / "jobs") == _generated(tmp_path / "step")
    assert len(_generated(tmp_path / "step")) > 0


def test_weights_jobs_leave_their_folds_to_the_fold_jobs(tmp_path, monkeypatch):
    """A weight-gradient job compiles its kernel and not the tile fold after it (the fold's own
    job does, side by side); the fold job generates the fold."""
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    codegen.forget_generated()
    job_list = precompile.jobs((1, 2, 1), SGD)
    weights = [job for job in job_list if job[0][0] == "conv2d_backward_weights"]
    for job in weights:
        precompile.run_job(job)
    assert not [name for name in _generated(tmp_path) if name.startswith("fold_tiles")]
    assert len([name for name in _generated(tmp_path) if name.startswith("conv_weights")]) == 2
    precompile.run_job(next(job for job in job_list if job[0][0] == "reduce.fold_tiles"))
    assert [name for name in _generated(tmp_path) if name.startswith("fold_tiles")]


def test_one_job_per_generated_operation_and_one_for_the_rest():
    job_list = precompile.jobs((1, 16, 16, 1), SGD)
    labels = [precompile.label(job) for job in job_list]
    assert sorted(labels[:9]) == sorted(
        [f"conv2d_forward {a}->{b}" for a, b in ((1, 16), (16, 16), (16, 1))] +
        [f"conv2d_backward_weights {a}->{b}" for a, b in ((1, 16), (16, 16), (16, 1))] +
        ["conv2d_backward_data 16->16 masked", "conv2d_backward_data 1->16 masked",
         "mse_loss_and_grad"])
    assert labels[9:] == ["fold_tiles (32, 1)", "fold_tiles (32, 16)",     # the weights' folds
                          "sgd_update+sum_images", "image math"]
    assert labels[0].endswith("16->16")          # the longest compiles start first


def test_a_convolution_run_at_several_levels_is_one_job():
    """A U-Net runs the same convolution at each level (other image sizes, the same kernel):
    one job each distinct kernel, not one per level (the 48-wide U-Net: 48 jobs for 14)."""
    network = UNet((2, 2, 2))
    operations = [op for op in precompile.step_operations(network, SGD)
                  if op[0] in precompile.HEAVY]
    heavy = [job for job in precompile.jobs(network, SGD) if job[0][0] in precompile.HEAVY]
    assert len(heavy) < len(operations)
    assert {precompile._kernel_key(job[0]) for job in heavy} == \
        {precompile._kernel_key(op) for op in operations}
    assert len({precompile._kernel_key(job[0]) for job in heavy}) == len(heavy)
    labels = [precompile.label(job) for job in heavy]
    assert labels.count("conv2d_forward 2->2") == 1
    assert "conv2d_forward 2+2->2 upsampled" in labels    # the decoder, its two inputs named


def test_workers_take_each_job_once(tmp_path, monkeypatch):
    """Workers take the next unclaimed job when free: every job runs, once."""
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    marker = tmp_path / "kernels" / "ready-test.json"
    precompile.Compiling([precompile.HOST_JOB] * 3, marker, 2).wait()
    assert json.loads(marker.read_text())["jobs"] == ["image math"] * 3


def test_workers_fill_and_mark_the_cache(tmp_path, monkeypatch, capsys):
    """Spawned workers run the jobs; the marker is written after all succeeded, not after a
    failure (which only costs time: the run compiles at first launch)."""
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    marker = tmp_path / "kernels" / "ready-test.json"
    precompile.Compiling([precompile.HOST_JOB], marker, 1).wait()
    assert marker.exists()
    assert "compiled in" in capsys.readouterr().out
    failing = tmp_path / "kernels" / "ready-failing.json"
    precompile.Compiling([(("no_such_kernel", (), ()),)], failing, 1).wait()
    assert not failing.exists()
    assert "failed (exit status 1: AttributeError" in capsys.readouterr().out


def test_workers_left_running_are_killed(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    compiling = precompile.Compiling([precompile.HOST_JOB], tmp_path / "marker", 1)
    compiling.stop()                                 # as at exit, before wait()
    assert [w.returncode for w in compiling.workers] == [-signal.SIGKILL]


def test_an_unguarded_main_script_runs_once(tmp_path):
    """Workers do not re-import the parent's main script (multiprocessing's spawn would, and
    a script calling train.main() at top level would start a run in each worker)."""
    script = tmp_path / "script.py"
    script.write_text(
        "import pathlib\n"
        "from cryokern import precompile\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
        f"precompile.Compiling([precompile.HOST_JOB], pathlib.Path({str(tmp_path / 'm')!r}), 1)"
        ".wait()\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=120,
                   env=dict(os.environ, CRYOKERN_CACHE=str(tmp_path)))
    assert (tmp_path / "runs").read_text() == "x" and (tmp_path / "m").exists()


def test_a_source_written_by_another_process_is_not_replaced(tmp_path, monkeypatch):
    """A concurrent writer of the same source leaves the first file (its mtime: numba's key)."""
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path))
    text = codegen.Source()("x = 1").text()
    codegen.load_module("probe", text)
    path, = (tmp_path / "kernels").glob("probe_*.py")
    before = path.stat()
    codegen._write_once(path.parent, path, text)     # as a racing process would
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary left
