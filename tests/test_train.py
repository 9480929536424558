"""python -m cryokern.train on the CPU backend: loss accounting, checkpoints, resume, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest

from conftest import bits
from cryokern import reference as R
from cryokern import synthetic
from cryokern import train as T
from cryokern.backends import Ready, get_backend
from cryokern.data import PairedImages, Subset, epoch_batches
from cryokern.metrics import fitted_metrics
from cryokern.mrcstack import MrcStack
from cryokern.model import Network, forward, init_params
from cryokern.step import TrainStep

TINY = ["--device", "cpu", "--channels", "1,4,4,1"]


def write(path, data):
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.asarray(data))
    return str(path)


def make_pair(tmp_path, n=10, shape=(12, 12), noise=None, seed=0, name="a"):
    """n clean blob images and noisy copies; `noise` gives each image's noise sigma."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    clean = np.stack([np.exp(-((yy - rng.uniform(2, shape[0] - 2)) ** 2 +
                               (xx - rng.uniform(2, shape[1] - 2)) ** 2) / 8.0)
                      for _ in range(n)]).astype(np.float32)
    sigma = np.full(n, 0.2) if noise is None else np.asarray(noise)
    noisy = (clean + sigma[:, None, None] * rng.standard_normal(clean.shape)).astype(np.float32)
    return write(tmp_path / f"{name}_noisy.mrcs", noisy), write(tmp_path / f"{name}_clean.mrcs", clean)


def data_args(pair):
    return ["--noisy", pair[0], "--clean", pair[1]]


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_epoch_mse_is_exact_over_a_ragged_last_batch(tmp_path):
    """The Fortran trainer's bug: 10 images of very different noise in batches of 4 (4, 4, 2).
    With a learning rate too small to change any weight's bits (a rate of 0 is refused) the
    reported MSE must equal the MSE over all pixels, not a mean of batch means."""
    noise = np.geomspace(0.01, 10.0, 10)
    pair = make_pair(tmp_path, noise=noise)
    out = str(tmp_path / "run")
    args = data_args(pair) + ["--out", out, "--lr", "1e-30", "--batch-size", "4", "--epochs", "1",
                              "--val-fraction", "0", "--normalize", "none", "--device", "cpu",
                              "--arch", "chain"]
    assert T.main(args) == 0
    reported = metrics(out)[0]["train_mse"]

    with mrcfile.open(pair[0]) as a, mrcfile.open(pair[1]) as b:
        noisy, clean = a.data[:, None].copy(), b.data[:, None].copy()
    net = Network()
    params = init_params(net, 0)
    trained = npz(os.path.join(out, "last.npz"))
    assert all(np.array_equal(bits(trained[k]), bits(v)) for k, v in params.items())
    pred = forward(get_backend("reference"), net, params, noisy)
    sse, count = R.mse_loss(pred, clean)        # all 10 images in one pass, same arithmetic
    direct = sse / count
    assert abs(reported - direct) <= 1e-9 * direct
    err = (pred.astype(np.float64) - clean) ** 2  # independent float64 math: float32 squares
    assert abs(err.mean() - direct) <= 1e-6 * direct

    order = np.concatenate([s.indices for s in epoch_batches(
        Subset(PairedImages([pair]), np.arange(10)), 4, 0, 0)])
    batch_means = [err[order[s:s + 4]].mean() for s in (0, 4, 8)]
    assert abs(np.mean(batch_means) - direct) > 0.1 * direct


def test_default_data_is_the_simulated_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path / "cache"))
    opts = T.build_parser().parse_args([])
    train, val = T.data_pairs(opts)
    stacks = [MrcStack(p) for p in train[0] + val[0]]
    assert [len(s) for s in stacks] == [synthetic.TRAIN] * 2 + [synthetic.VAL] * 2
    assert len(MrcStack(str(synthetic.dataset()["val_truth"]))) == synthetic.VAL
    first = stacks[0].read(0, np.empty(stacks[0].shape, np.float32)).copy()
    for f in tmp_path.glob("cache/*/*"):
        f.unlink()
    T.data_pairs(opts)   # regenerated: the same bits
    assert np.array_equal(MrcStack(train[0][0]).read(0, np.empty_like(first)), first)


def test_demo_scores_the_network_against_the_ground_truth(tmp_path, monkeypatch, capsys):
    """With no data options, train ends by scoring the validation images against their truth:
    the noisy input's scores equal fitted_metrics' on the files."""
    monkeypatch.setenv("CRYOKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "SIZE", 16)
    monkeypatch.setattr(synthetic, "TRAIN", 4)
    monkeypatch.setattr(synthetic, "VAL", 2)
    assert T.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    lines = {line.split("Pearson")[0].strip(): line for line in out.splitlines()
             if "Pearson r" in line}
    assert set(lines) == {"noisy input", "before training", "after training"}
    files = synthetic.dataset()
    with mrcfile.open(files["val"][0]) as a, mrcfile.open(files["val_truth"]) as b:
        r = np.mean([fitted_metrics(x, t, ssim=False)["pearson"] for x, t in zip(a.data, b.data)])
    assert f"Pearson r {r:.3f}" in lines["noisy input"]


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    assert T.main(data_args(make_pair(tmp_path)) + TINY + ["--out", str(out), "--epochs", "2"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "epoch_0001.npz", "epoch_0002.npz", "best.npz",
            "last.npz"} <= names
    records = metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"epoch", "train_mse", "val_mse", "images_per_s", "train_psnr"} <= set(records[0])
    assert json.loads((out / "config.json").read_text())["channels"] == "1,4,4,1"


def test_checkpoint_reproduces_the_trained_model_with_numpy_load_alone(tmp_path):
    """Layout: OIHW arrays under the model's names; loaded by numpy.load into the reference,
    they give the trained model's outputs bit for bit (channels 1,3,5,1: no square to hide a
    transposition)."""
    opts = T.build_parser().parse_args(data_args(make_pair(tmp_path)) + [
        "--device", "cpu", "--channels", "1,3,5,1", "--epochs", "2", "--out", str(tmp_path / "r")])
    run = T.start(opts, set())
    run.run()
    saved = npz(tmp_path / "r" / "last.npz")
    assert saved["layers.1.weight"].shape == (5, 3, 3, 3)
    assert json.loads(str(saved["meta"]))["layout"]["weight"] == "OIHW"
    x = np.random.default_rng(5).standard_normal((2, 1, 9, 11)).astype(np.float32)
    be = get_backend("reference")
    want = forward(be, run.network, run.step.host_params(), x)
    got = forward(be, Network((1, 3, 5, 1)), {k: v for k, v in saved.items() if k != "meta"}, x)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def interrupt_at(monkeypatch, step):
    """Make the training step raise KeyboardInterrupt (as Ctrl-C would) before step `step`+1."""
    original = TrainStep.launch

    def launch(self, x, target, images=None):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self, x, target, images)
    monkeypatch.setattr(TrainStep, "launch", launch)


RESUME_ARGS = TINY + ["--epochs", "3", "--batch-size", "3", "--val-fraction", "0.2",
                      "--optimizer", "adam", "--crop", "8", "--save-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    pair = make_pair(tmp)
    out = str(tmp / "run")
    assert T.main(data_args(pair) + RESUME_ARGS + ["--out", out]) == 0
    return pair, npz(os.path.join(out, "last.npz")), metrics(out)


def assert_same_run(out, uninterrupted):
    _, want, want_metrics = uninterrupted
    got = npz(os.path.join(out, "last.npz"))
    for k in want:
        if k != "meta":
            assert np.array_equal(got[k].view(np.uint32), want[k].view(np.uint32)), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "peak_rss_mib")}
                        for r in rs]
    assert strip(metrics(out)) == strip(want_metrics)


@pytest.mark.parametrize("stop", [1, 3, 4, 8])   # 3 steps an epoch: 3 is an epoch's end
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, uninterrupted, stop):
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        assert T.main(data_args(uninterrupted[0]) + RESUME_ARGS + ["--out", out]) == 130
    assert T.main(["--resume", "--out", out]) == 0
    assert_same_run(out, uninterrupted)


def test_sigkilled_run_resumes_bit_identical(tmp_path, uninterrupted):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "cryokern.train"] + data_args(uninterrupted[0]) + \
        RESUME_ARGS + ["--out", out, "--epochs", "400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = os.path.join(out, "last.npz"), time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(last) and json.loads(str(npz(last)["meta"]))["step"] >= 5:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    # finish the 3 epochs of the uninterrupted run from wherever the kill left it; where a
    # loaded machine let the run pass them before the kill, one more epoch than it reached,
    # against an uninterrupted run of as many
    meta = json.loads(str(npz(last)["meta"]))
    assert meta["step"] >= 5
    epochs = max(3, meta["position"]["epoch"] + 1)
    assert T.main(["--resume", "--out", out, "--epochs", str(epochs)]) == 0
    if epochs > 3:
        longer = str(tmp_path / "uninterrupted")
        assert T.main(data_args(uninterrupted[0]) + RESUME_ARGS +
                      ["--out", longer, "--epochs", str(epochs)]) == 0
        uninterrupted = (None, npz(os.path.join(longer, "last.npz")), metrics(longer))
    assert_same_run(out, uninterrupted)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    original = TrainStep.launch

    def launch(self, x, target, images=None):
        pending, count = original(self, x, target, images)
        return (Ready(float("nan")) if self.step == 4 else pending), count
    monkeypatch.setattr(TrainStep, "launch", launch)
    out = tmp_path / "run"
    rc = T.main(data_args(make_pair(tmp_path)) + TINY + ["--out", str(out), "--save-every", "1",
                                                         "--batch-size", "3"])
    assert rc == 3 and "loss became nan" in capsys.readouterr().err
    meta = json.loads(str(npz(out / "last.npz")["meta"]))
    assert meta["step"] == 3


def test_resume_refuses_a_changed_option(tmp_path, capsys):
    out = str(tmp_path / "run")
    pair = make_pair(tmp_path)
    assert T.main(data_args(pair) + TINY + ["--out", out, "--epochs", "1"]) == 0
    assert T.main(["--resume", "--out", out, "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs" in capsys.readouterr().err
    assert T.main(["--resume", "--out", out, "--epochs", "2", "--pass-pixels", "144"]) == 0
    assert len(metrics(out)) == 2


def test_pairs_list(tmp_path):
    a, b = make_pair(tmp_path, n=3, name="a"), make_pair(tmp_path, n=4, name="b", seed=1)
    (tmp_path / "pairs.txt").write_text(f"# noisy clean\n{os.path.basename(a[0])} "
                                        f"{os.path.basename(a[1])}\n{b[0]}  {b[1]}\n")
    opts = T.build_parser().parse_args(["--pairs", str(tmp_path / "pairs.txt"),
                                        "--val-fraction", "0.3"])
    train, val, _ = T.open_data(opts)
    assert (len(train), len(val)) == (5, 2)


def bad_mrc(tmp_path):
    p = tmp_path / "bad.mrc"
    p.write_bytes(b"not an mrc file" * 100)
    return str(p)


def truncated(tmp_path):
    p = write(tmp_path / "trunc.mrcs", np.zeros((10, 12, 12), np.float32))
    with open(p, "r+b") as f:
        f.truncate(2000)
    return p


def with_nan(tmp_path):
    data = np.zeros((10, 12, 12), np.float32)
    data[7, 3, 3] = np.nan
    return write(tmp_path / "nan.mrcs", data)


BAD_NOISY = {  # a replacement noisy file, and what the message must say
    "missing": (lambda t: str(t / "missing.mrcs"), "no such file"),
    "not mrc": (bad_mrc, "not a valid MRC file"),
    "truncated": (truncated, "truncated"),
    "mode": (lambda t: write(t / "cplx.mrcs", np.zeros((10, 12, 12), np.complex64)), "mode 4"),
    "length": (lambda t: write(t / "short.mrcs", np.zeros((9, 12, 12), np.float32)), "9 images"),
    "shape": (lambda t: write(t / "wide.mrcs", np.zeros((10, 12, 13), np.float32)), "12x12"),
    "nan": (with_nan, "image 7 has NaN or Inf"),
}


@pytest.mark.parametrize("case", BAD_NOISY)
def test_bad_input_exits_2_with_one_line_naming_the_file(tmp_path, capsys, case):
    make_file, words = BAD_NOISY[case]
    noisy = make_file(tmp_path)
    clean = make_pair(tmp_path)[1]
    out = tmp_path / "run"
    rc = T.main(["--noisy", noisy, "--clean", clean, "--out", str(out)] + TINY)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert words in err and (os.path.basename(noisy) in err or os.path.basename(clean) in err)
    if case != "nan":     # found before anything is written
        assert not out.exists()


def test_pass_pixels_must_be_positive(tmp_path, capsys):
    rc = T.main(data_args(make_pair(tmp_path)) + TINY + ["--pass-pixels", "0", "--out",
                                                         str(tmp_path / "r")])
    assert rc == 2 and "--pass-pixels must be at least 1" in capsys.readouterr().err


def test_loader_threads_must_not_be_negative(tmp_path, capsys):
    rc = T.main(data_args(make_pair(tmp_path)) + TINY + ["--loader-threads", "-1", "--out",
                                                         str(tmp_path / "r")])
    assert rc == 2 and "--loader-threads must be positive" in capsys.readouterr().err


def test_loader_threads_do_not_change_the_bits(tmp_path):
    runs = []
    for threads in ("1", "3"):
        out = tmp_path / threads
        assert T.main(data_args(make_pair(tmp_path)) + TINY + ["--loader-threads", threads,
                                                               "--out", str(out)]) == 0
        runs.append(np.load(out / "last.npz"))
    arrays = [k for k in runs[0].files if k != "meta"]       # meta holds the options
    assert arrays and all(np.array_equal(runs[0][k], runs[1][k]) for k in arrays)


def test_loader_workers_do_not_change_the_bits(tmp_path):
    """0 (threads of the training process), 1 and 3 worker processes: the same checkpoint."""
    runs = []
    pair = make_pair(tmp_path)
    for workers in ("0", "1", "3"):
        out = tmp_path / workers
        assert T.main(data_args(pair) + TINY + ["--crop", "9", "--loader-workers", workers,
                                                "--out", str(out)]) == 0
        runs.append(np.load(out / "last.npz"))
    arrays = [k for k in runs[0].files if k != "meta"]       # meta holds the options
    assert arrays and all(r[k].tobytes() == runs[0][k].tobytes()
                          for r in runs[1:] for k in arrays)


def test_crop_larger_than_images(tmp_path, capsys):
    rc = T.main(data_args(make_pair(tmp_path)) + TINY + ["--crop", "13", "--out", str(tmp_path / "r")])
    assert rc == 2 and "crop 13 is larger than the 12x12 images" in capsys.readouterr().err


def test_out_holding_an_earlier_run_is_not_written_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("earlier")
    rc = T.main(data_args(make_pair(tmp_path)) + TINY + ["--out", str(out)])
    assert rc == 2 and "holds an earlier run" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "earlier"
    assert T.main(data_args(make_pair(tmp_path)) + TINY + ["--out", str(out), "--force",
                                                          "--epochs", "1"]) == 0


def assert_gpu_run_equals_cpu_run(tmp_path, args):
    """The run on the kernel backend and on the NumPy reference (the oracle): identical
    checkpoints and metrics (all but the timings)."""
    for device in ("gpu", "reference"):
        assert T.main(args + ["--device", device, "--out", str(tmp_path / device)]) == 0
    gpu, cpu = npz(tmp_path / "gpu" / "last.npz"), npz(tmp_path / "reference" / "last.npz")
    for k in gpu:
        if k != "meta":
            assert np.array_equal(gpu[k].view(np.uint32), cpu[k].view(np.uint32)), k
    timing = ("images_per_s", "peak_rss_mib")
    assert [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "gpu")] \
        == [{k: v for k, v in r.items() if k not in timing} for r in metrics(tmp_path / "reference")]


def test_kernel_backend_run_equals_reference_run(tmp_path):
    """The driver's pipelining on the kernel backend (uploads on their own stream, each loss
    read one step late; in the simulator where there is no GPU) changes no bit."""
    pair = make_pair(tmp_path, n=3, shape=(5, 9))
    assert_gpu_run_equals_cpu_run(tmp_path, data_args(pair) + [
        "--epochs", "1", "--batch-size", "1", "--channels", "1,2,2,1", "--val-fraction", "0.34"])


@pytest.mark.gpu
def test_gpu_run_equals_cpu_run(tmp_path):
    """A larger run on the GPU (CUDA graphs replayed, Adam) and on the reference."""
    pair = make_pair(tmp_path, shape=(37, 70))
    assert_gpu_run_equals_cpu_run(tmp_path, data_args(pair) + [
        "--epochs", "2", "--batch-size", "3", "--optimizer", "adam"])
