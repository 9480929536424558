"""Data-parallel training on the CPU backend, ranks started by mpiexec (mpi4py and MPICH from
pip, the test extra) or by train's own --gpus N (no MPI): N ranks end with the checkpoint one
process ends with, bit for bit; faults stop every rank."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import mrcfile
import numpy as np
import pytest

from cryokern.data import PairedImages, Subset, epoch_batches
from cryokern.distributed import block, wait_until_read
from test_train import data_args, make_pair, npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
except ImportError:
    MPIEXEC = None
MPI = pytest.param("mpiexec", marks=pytest.mark.skipif(
    MPIEXEC is None, reason="no mpi4py and mpiexec (pip install mpi4py mpich)"))
FAULT = "rank_fault"        # tests/rank_fault.py, as a module
# what --gpus N does, for a module other than cryokern.train
LAUNCH = "import sys; from cryokern import distributed; " \
         "sys.exit(distributed.launch(sys.argv[1], sys.argv[3:], int(sys.argv[2])))"

# 11 images, 2 held out: batches of 4, 4 and 1 (on 3 ranks, 2 of them get no image of the last
# batch, and one no validation image); Adam, crops, a checkpoint every step
ARGS = ["--device", "cpu", "--channels", "1,4,4,1", "--batch-size", "4", "--val-fraction",
        "0.2", "--optimizer", "adam", "--crop", "8", "--save-every", "1"]


def train(ranks, args, via="mpiexec", module="cryokern.train", timeout=120):
    """`python -m module args` on `ranks` ranks started by mpiexec or by --gpus ('gpus'), or
    as one plain process; the finished process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", module] + args
    if ranks > 1 and via == "mpiexec":
        command = [MPIEXEC, "-n", str(ranks)] + command
    elif ranks > 1 and module == "cryokern.train":
        command = command[:3] + ["--gpus", str(ranks)] + args
    elif ranks > 1:
        command = [sys.executable, "-c", LAUNCH, module, str(ranks)] + args
    return subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)


def checkpoint(out):
    """last.npz's arrays, and its meta without the options (which hold --out)."""
    arrays = npz(os.path.join(out, "last.npz"))
    meta = json.loads(str(arrays.pop("meta")))
    meta.pop("options")
    return arrays, meta


def assert_same_checkpoint(out, want):
    got_arrays, got_meta = checkpoint(out)
    want_arrays, want_meta = want
    assert sorted(got_arrays) == sorted(want_arrays)
    for k, v in want_arrays.items():
        assert got_arrays[k].tobytes() == v.tobytes(), k
    assert got_meta == want_meta


# the U-Net (three levels, the residual, Adam) on 20 x 30 images, padded to 20 x 32
UNET_ARGS = ["--device", "cpu", "--arch", "unet", "--unet-widths", "2,3,4", "--residual",
             "--batch-size", "4", "--val-fraction", "0.2", "--optimizer", "adam"]


def one_process_run(tmp_path_factory, name, args, shape):
    """11 image pairs of `shape` trained for two epochs by one process: (pair, checkpoint)."""
    tmp = tmp_path_factory.mktemp(name)
    pair = make_pair(tmp, n=11, shape=shape)
    out = str(tmp / "run")
    done = train(1, data_args(pair) + args + ["--epochs", "2", "--out", out])
    assert done.returncode == 0, done.stderr
    return pair, checkpoint(out)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return one_process_run(tmp_path_factory, "one_rank", ARGS, (12, 12))


@pytest.fixture(scope="module")
def one_rank_unet(tmp_path_factory):
    return one_process_run(tmp_path_factory, "one_rank_unet", UNET_ARGS, (20, 30))


NETWORKS = {"chain": ("one_rank", ARGS), "unet": ("one_rank_unet", UNET_ARGS)}


@pytest.mark.parametrize("net, via, ranks", [("chain", MPI, 2), ("chain", MPI, 3),
                                             ("chain", "gpus", 3), ("unet", MPI, 2),
                                             ("unet", "gpus", 3)])
def test_ranks_end_with_the_checkpoint_of_one_process(tmp_path, request, net, via, ranks):
    fixture, args = NETWORKS[net]
    pair, want = request.getfixturevalue(fixture)
    out = str(tmp_path / "run")
    done = train(ranks, data_args(pair) + args + ["--epochs", "2", "--out", out], via)
    assert done.returncode == 0, done.stderr
    assert_same_checkpoint(out, want)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["ranks"] for r in records] == [ranks, ranks]
    assert done.stdout.count("done: checkpoints") == 1      # rank 0 alone reports


@pytest.mark.parametrize("via", [MPI, "gpus"])
def test_killed_rank_stops_all_and_a_resume_on_other_ranks_ends_identical(tmp_path, one_rank,
                                                                         via):
    """Rank 1 of 2 SIGKILLed in the second epoch: every rank ends, non-zero, in seconds; the
    last checkpoint is whole, and resuming it on 3 ranks ends as the one-process run does."""
    pair, want = one_rank
    out = str(tmp_path / "run")
    started = time.monotonic()
    done = train(2, ["1", "4", "kill"] + data_args(pair) + ARGS + ["--epochs", "2", "--out", out],
                 via, module=FAULT, timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - started < 60
    arrays, meta = checkpoint(out)
    assert meta["step"] in (2, 3, 4)
    resumed = train(3, ["--resume", "--out", out], via)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_checkpoint(out, want)


@pytest.mark.parametrize("via", [MPI, "gpus"])
def test_a_raising_rank_stops_all_with_one_line_naming_it(tmp_path, one_rank, via):
    pair, _ = one_rank
    out = str(tmp_path / "run")
    done = train(3, ["2", "1", "raise"] + data_args(pair) + ARGS + ["--epochs", "1", "--out", out],
                 via, module=FAULT, timeout=60)
    assert done.returncode == 1
    ours = [line for line in done.stderr.splitlines() if line.startswith("cryokern.train")]
    assert ours == ["cryokern.train: failed: RuntimeError: injected fault before step 2 "
                    "[rank 2 of 3]"]


@pytest.mark.parametrize("via", [MPI, "gpus"])
def test_bad_image_read_by_one_rank_exits_2_with_one_line(tmp_path, via):
    """An image of NaNs that only rank 1 reads (in its block of the first batch)."""
    noisy, clean = make_pair(tmp_path, n=8)
    subset = Subset(PairedImages([(noisy, clean)]), np.arange(8))
    first = epoch_batches(subset, 4, 0, 0)[0]
    bad = int(first.indices[block(4, 2, 1)[0]])
    with mrcfile.open(noisy, mode="r+") as mrc:
        mrc.data[bad] = np.nan
    done = train(2, ["--noisy", noisy, "--clean", clean, "--device", "cpu", "--channels",
                     "1,4,4,1", "--val-fraction", "0", "--epochs", "1",
                     "--out", str(tmp_path / "run")], via, timeout=60)
    assert done.returncode == 2
    ours = [line for line in done.stderr.splitlines() if line.startswith("cryokern.train")]
    assert len(ours) == 1 and noisy in ours[0] and ours[0].endswith("[rank 1 of 2]"), ours
    assert not os.path.exists(tmp_path / "run" / "last.npz")


@pytest.mark.parametrize("via", [MPI, "gpus"])
def test_bad_input_every_rank_sees_is_reported_once(tmp_path, via):
    done = train(2, ["--noisy", str(tmp_path / "missing.mrcs"), "--clean", "x.mrcs",
                     "--device", "cpu", "--out", str(tmp_path / "run")], via, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "missing.mrcs" in done.stderr


@pytest.mark.gpu
@pytest.mark.multigpu
def test_two_gpus_end_with_the_checkpoint_of_one_gpu(tmp_path):
    """--gpus 2 on a node with two GPUs (NCCL through CuPy): train's default network (the
    48-wide U-Net), 11 images of 37 x 70, batches of 4, 4 and 1 (rank 1 has no image of the
    last), the bits of one GPU."""
    pytest.importorskip("cupy")
    pair = make_pair(tmp_path, n=11, shape=(37, 70))
    args = data_args(pair) + ["--device", "gpu", "--batch-size", "4", "--val-fraction", "0.2",
                              "--epochs", "2"]
    outs = [str(tmp_path / f"gpus{n}") for n in (1, 2)]
    for ranks, out in zip((1, 2), outs):
        done = train(ranks, args + ["--out", out], "gpus", timeout=300)
        assert done.returncode == 0, done.stderr
    assert_same_checkpoint(outs[1], checkpoint(outs[0]))


def test_more_gpu_ranks_than_gpus_is_refused_once(tmp_path):
    """Two GPU ranks on a node with one GPU (numba's simulator has one): exit 2, one line,
    before any rank touches NCCL, nothing written."""
    from numba import cuda
    if len(cuda.gpus) >= 2:
        pytest.skip("this node has two GPUs")
    pair = make_pair(tmp_path, n=4)
    done = train(2, data_args(pair) + ["--device", "gpu", "--out", str(tmp_path / "run")],
                 "gpus", timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cryokern.train: error: 2 ranks on ") and \
        lines[0].endswith("share a GPU (1 visible to each): each rank needs a GPU of its own"), \
        done.stderr
    assert not os.path.exists(tmp_path / "run")


def test_blocks_put_every_image_at_its_own_row():
    """The gathered buffer has N blocks of ceil(B/N) rows; rank r's images start at row
    r * ceil(B/N). Images 0..B-1 must land in rows 0..B-1 for every B and N, which is why
    the fold over the first B rows is the one process's."""
    for images in range(1, 10):
        for size in range(1, 6):
            rows = []
            for rank in range(size):
                first, stop = block(images, size, rank)
                per = -(-images // size)
                rows += [rank * per + k for k in range(stop - first)]
                assert first <= stop
            assert rows == list(range(images)), (images, size)


def test_an_abort_waits_until_the_launcher_has_read_the_last_line():
    """A pipe's reader that takes 0.3 s: wait_until_read returns once it has read all."""
    reader, writer = os.pipe()
    os.write(writer, b"cryokern.train: failed: ... [rank 1 of 2]\n")
    took = []
    threading.Thread(target=lambda: (time.sleep(0.3), took.append(os.read(reader, 100)))).start()
    wait_until_read((writer,), limit_s=10)
    assert took and took[0].endswith(b"[rank 1 of 2]\n")
    os.close(reader), os.close(writer)


def test_an_abort_waits_no_longer_than_its_limit_for_a_reader():
    reader, writer = os.pipe()
    os.write(writer, b"nobody reads this\n")
    started = time.monotonic()
    wait_until_read((writer, 2), limit_s=0.2)     # and a stderr that may be no pipe
    assert 0.2 <= time.monotonic() - started < 2
    os.close(reader), os.close(writer)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_recorded_steps_hold_the_nccl_all_gather(optimizer):
    """A GPU rank's steps and validation losses replay CUDA graphs that hold NCCL's all-gather
    (stream capture of the collective), on one GPU: a communicator of one rank through NCCL,
    the bits of a step without one. (SGD's update is recorded too, Adam's is not.)"""
    pytest.importorskip("cupy")
    from numba import cuda

    from cryokern.backends import get_backend
    from cryokern.distributed import Nccl, Single
    from cryokern.model import Network, init_params
    from cryokern.step import OptimizerConfig, TrainStep
    backend = get_backend("gpu")
    net = Network((1, 4, 4, 1))
    rng = np.random.default_rng(0)
    batches = [tuple(cuda.to_device(rng.standard_normal((3, 1, 19, 33)).astype(np.float32))
                     for _ in "xy") for _ in range(2)]
    runs = []
    for comm in (None, Nccl(Single(), 0)):
        step = TrainStep(backend, net, init_params(net, 0), OptimizerConfig(optimizer, 0.01),
                         comm=comm)
        losses = [step(*batches[k % 2])[0] for k in range(6)]     # eager, recorded, replayed
        losses += [step.queue_loss(*batches[0], record=True)[0].result() for _ in range(3)]
        assert len(step._recorder._graphs) == 3      # two batches' steps, one loss
        runs.append(([np.float64(loss).tobytes() for loss in losses],
                     {k: v.tobytes() for k, v in step.host_params().items()}))
    assert runs[1] == runs[0]
