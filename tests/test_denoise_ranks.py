"""python -m cryokern.denoise on several ranks (mpiexec with mpi4py and MPICH from pip, or
denoise's own --gpus N; the CPU backend): every output, previews included, is the bytes one
process writes, for a set of files shared out whole and for one stack split over the ranks;
a bad image one rank reads stops all with one line, exit 2, nothing left behind."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import write_mrc
from cryokern import checkpoint
from cryokern.backends import get_backend
from cryokern.denoise import main, plan_outputs, run, shard
from cryokern.distributed import Single, block
from cryokern.inference import TiledDenoiser, load_model
from cryokern.model import Network, UNet, init_params
from test_distributed import MPI, MPIEXEC, ROOT, train

NETWORK = (1, 4, 4, 1)


def denoise(ranks, args, via):
    """`python -m cryokern.denoise args` on `ranks` ranks started by mpiexec or --gpus (which
    with 1 is one plain process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "cryokern.denoise"] + args
    if via == "mpiexec":
        command = [MPIEXEC, "-n", str(ranks)] + command
    else:
        command += ["--gpus", str(ranks)]
    return subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    net = Network(NETWORK)
    path = str(tmp_path_factory.mktemp("model") / "model.npz")
    checkpoint.save(path, init_params(net, 3), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    return path


@pytest.fixture(scope="module")
def unet_model_path(tmp_path_factory):
    """A U-Net of three levels with the residual: tiles keep to its pooling grid of 4."""
    net = UNet((2, 3, 4), residual=True)
    path = str(tmp_path_factory.mktemp("unet") / "model.npz")
    checkpoint.save(path, init_params(net, 4), {},
                    {"network": net.describe(), "normalize": "per-image"})
    return path


def make_inputs(directory, rng):
    """Files of unequal sizes (a 2-D image, a volume, stacks), one of them an int16 file."""
    directory.mkdir()
    return [write_mrc(directory / "a.mrcs", (rng.standard_normal((3, 21, 34)) * 5 + 40)
                      .astype(np.float32), voxel_size=1.7),
            write_mrc(directory / "b.mrc", rng.integers(-300, 300, (26, 19)).astype(np.int16)),
            write_mrc(directory / "c.mrc", rng.random((2, 15, 16)).astype(np.float32),
                      layout="volume"),
            write_mrc(directory / "d.mrcs", rng.random((2, 30, 31)).astype(np.float32)),
            write_mrc(directory / "e.mrcs", rng.random((1, 9, 12)).astype(np.float32))]


def outputs(directory):
    """{name: bytes} of every file in `directory`, hidden ones included."""
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("model, case, via, ranks", [
    ("model_path", "files", MPI, 2), ("model_path", "files", "gpus", 3),
    ("model_path", "stack", MPI, 3), ("model_path", "stack", "gpus", 2),
    ("unet_model_path", "stack", MPI, 2), ("unet_model_path", "stack", "gpus", 3)])
def test_ranks_write_the_bytes_of_one_process(tmp_path, rng, request, model, case, via, ranks):
    if case == "files":
        inputs = make_inputs(tmp_path / "in", rng)
    else:       # 7 images: split over the ranks in ranges of 4+3 or 3+3+1 (25 x 22: the
        # U-Net pads them to its grid of 4)
        inputs = [write_mrc(tmp_path / "stack.mrcs",
                            (rng.standard_normal((7, 25, 22)) * 3 + 9).astype(np.float32))]
    args = [request.getfixturevalue(model), *inputs, "--device", "cpu", "--tile", "10",
            "--preview", "png"]
    assert main(args + ["-o", str(tmp_path / "one")]) == 0
    done = denoise(ranks, args + ["-o", str(tmp_path / "many")], via)
    assert done.returncode == 0, done.stderr
    want = outputs(tmp_path / "one")
    assert len(want) == (5 + 9 if case == "files" else 1 + 7)     # MRC files and previews
    assert outputs(tmp_path / "many") == want
    assert done.stdout.count("done:") == 1      # rank 0 alone reports


@pytest.mark.parametrize("via", [MPI, "gpus"])
def test_bad_image_one_rank_reads_stops_all_with_one_line(tmp_path, rng, model_path, via):
    """Image 5 of a 6-image stack split over 2 ranks is rank 1's (images 3-5), a small file
    beside it rank 0's. Exit 2, one line naming the file and rank 1, and nothing in the
    output directory: the split file's temporary file is removed by rank 0, and rank 0's small
    file, not begun, never written."""
    data = rng.random((6, 16, 16)).astype(np.float32)
    data[5, 3, 3] = np.nan
    stack = write_mrc(tmp_path / "stack.mrcs", data)
    small = write_mrc(tmp_path / "small.mrc", rng.random((8, 8)).astype(np.float32))
    done = denoise(2, [model_path, stack, small, "-o", str(tmp_path / "out"),
                       "--device", "cpu"], via)
    assert done.returncode == 2, done.stderr
    ours = [line for line in done.stderr.splitlines() if line.strip()]
    assert ours == [f"cryokern.denoise: error: {stack}: image 5 has NaN or Inf pixels "
                    "[rank 1 of 2]"], done.stderr
    assert os.listdir(tmp_path / "out") == []


def test_a_rank_without_images(tmp_path, rng, model_path):
    """Three ranks for a 2-image stack: the third has nothing to do but keep in step."""
    stack = write_mrc(tmp_path / "s.mrcs", rng.random((2, 12, 13)).astype(np.float32))
    args = [model_path, stack, "--device", "cpu"]
    assert main(args + ["-o", str(tmp_path / "one")]) == 0
    done = denoise(3, args + ["-o", str(tmp_path / "many")], "gpus")
    assert done.returncode == 0, done.stderr
    assert outputs(tmp_path / "many") == outputs(tmp_path / "one")


class Stack:
    def __init__(self, count, shape):
        self.count, self.shape = count, shape

    def __len__(self):
        return self.count


def test_shard_splits_a_file_larger_than_a_share_and_deals_the_rest_largest_first():
    plan = [(Stack(n, s), None, None) for n, s in
            [(1, (10, 10)), (3, (10, 10)), (1, (20, 20)), (1, (10, 10)), (2, (10, 10))]]
    # pixels 100, 300, 400, 100, 200 of 1100: one rank does all, whole
    assert shard(plan, 1) == ([[(0, 0, 1), (1, 0, 3), (2, 0, 1), (3, 0, 1), (4, 0, 2)]], [])
    # two ranks: no file above 550; by size 2, 1, 4, 0, 3 (ties in command-line order)
    # each share in command-line order
    assert shard(plan, 2) == ([[(2, 0, 1), (3, 0, 1), (4, 0, 2)], [(0, 0, 1), (1, 0, 3)]], [])
    # four ranks: file 2 (400 > 275) holds one image: whole; file 1 (300 > 275) split
    shares, split = shard(plan, 4)
    assert split == [1]
    assert shares == [[(1, 0, 1), (2, 0, 1)], [(1, 1, 2), (4, 0, 2)], [(0, 0, 1), (1, 2, 3)],
                      [(3, 0, 1)]]
    stack = [(Stack(7, (8, 8)), None, None)]
    shares, split = shard(stack, 3)
    assert split == [0] and shares == [[(0, *block(7, 3, r))] for r in range(3)]


class ThreadRanks:
    """Ranks as threads of this process (allgather through a barrier), for `run` in-process."""

    def __init__(self, size):
        self.size, self._slots = size, [None] * size
        self._barrier = threading.Barrier(size)

    def rank(self, rank):
        ranks = self

        class Comm(Single):
            def allgather(self, obj):
                ranks._slots[rank] = obj
                ranks._barrier.wait()
                got = list(ranks._slots)
                ranks._barrier.wait()
                return got
        comm = Comm()
        comm.rank, comm.size = rank, self.size
        return comm


def test_rank_0_counts_every_rank_s_images(tmp_path, rng, model_path):
    """One progress bar for the whole job: rank 0's counts all 9 images of 3 ranks, image by
    image; the others get none."""
    inputs = make_inputs(tmp_path / "in", rng)
    (tmp_path / "out").mkdir()
    ranks = ThreadRanks(3)
    counts = [[] for _ in range(3)]

    class Bar:
        def __init__(self, rank):
            self.rank = rank

        def update(self, n):
            counts[self.rank].append(n)

    def rank(r):
        plan = plan_outputs(inputs, tmp_path / "out", False)
        denoiser = TiledDenoiser(load_model(model_path), get_backend("reference"))
        run(ranks.rank(r), plan, denoiser, np.float32, None, Bar(r) if r == 0 else None)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts[0]) == 9 and counts[1] == counts[2] == []
    shares, _ = shard(plan_outputs(inputs, tmp_path / "elsewhere", False), 3)
    assert len(counts[0]) == 1 + max(sum(stop - first for _, first, stop in share)
                                     for share in shares)      # in step, image by image
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in inputs)


def test_a_killed_rank_stops_all_and_leaves_no_temporary_file(tmp_path, rng, model_path):
    """Rank 1 of 2 SIGKILLed at its second image of a split stack: the launcher ends rank 0
    (SIGTERM), which removes the split file's temporary file on its way out."""
    stack = write_mrc(tmp_path / "stack.mrcs", rng.random((6, 16, 16)).astype(np.float32))
    started = time.monotonic()
    done = train(2, ["1", "1", model_path, stack, "-o", str(tmp_path / "out"), "--device",
                     "cpu"], "gpus", module="denoise_fault", timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - started < 60
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("model", ["model_path", "unet_model_path"])
def test_two_gpus_write_the_bytes_of_one_gpu(tmp_path, rng, request, model):
    """--gpus 2 on a node with two GPUs: a set of files and a split stack, the bytes of one,
    with the chain and with a U-Net."""
    model_path = request.getfixturevalue(model)
    inputs = make_inputs(tmp_path / "in", rng) + [write_mrc(
        tmp_path / "in" / "big.mrcs", rng.standard_normal((5, 300, 257)).astype(np.float32))]
    args = [model_path, *inputs, "--device", "gpu", "--tile", "100"]
    for ranks in (1, 2):
        done = denoise(ranks, args + ["-o", str(tmp_path / f"gpus{ranks}")], "gpus")
        assert done.returncode == 0, done.stderr
    assert outputs(tmp_path / "gpus2") == outputs(tmp_path / "gpus1")
