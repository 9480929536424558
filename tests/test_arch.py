"""--arch: a U-Net trained from the command line, recorded in its checkpoints, rebuilt by
denoise, evaluate and --resume; the chain stays the default and old checkpoints load."""
import json
import os

import mrcfile
import numpy as np
import pytest

from conftest import bits
from test_train import data_args, interrupt_at, make_pair, metrics, npz
from cryokern import checkpoint
from cryokern import denoise as D
from cryokern import evaluate as E
from cryokern import train as T
from cryokern.backends import get_backend
from cryokern.inference import TiledDenoiser, load_model
from cryokern.model import Network, UNet, init_params
from cryokern.mrcstack import MrcStack

# two poolings (widths per level, the bottom's last) on 24 x 40 images
UNET = ["--arch", "unet", "--unet-widths", "4,6,8", "--residual", "--epochs", "2",
        "--batch-size", "2", "--val-fraction", "0.2", "--optimizer", "adam", "--save-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unet")
    pair = make_pair(tmp, n=5, shape=(24, 40))
    out = str(tmp / "cpu")
    assert T.main(data_args(pair) + UNET + ["--device", "cpu", "--out", out]) == 0
    return pair, out


def test_the_checkpoint_records_the_unet_and_loads_as_one(trained):
    _, out = trained
    meta = json.loads(str(npz(os.path.join(out, "last.npz"))["meta"]))
    assert meta["network"] == {"kind": "unet", "widths": [4, 6, 8], "in_channels": 1,
                               "out_channels": 1, "residual": True,
                               "leaky_slope": pytest.approx(0.1)}
    model = load_model(os.path.join(out, "best.npz"))
    assert model.network == UNet((4, 6, 8), residual=True)
    assert json.loads(open(os.path.join(out, "config.json")).read())["network"]["kind"] == "unet"


def test_cpu_equals_reference_in_every_checkpoint_array(trained, tmp_path):
    pair, out = trained
    ref = str(tmp_path / "ref")
    assert T.main(data_args(pair) + UNET + ["--device", "reference", "--out", ref]) == 0
    want, got = npz(os.path.join(out, "last.npz")), npz(os.path.join(ref, "last.npz"))
    assert set(want) == set(got) and any(k.startswith("optimizer.") for k in want)
    for k in want:
        if k != "meta":
            assert np.array_equal(bits(got[k]), bits(want[k])), k


def test_interrupted_and_resumed_unet_run_is_bit_identical(trained, tmp_path, monkeypatch):
    pair, whole = trained
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        assert T.main(data_args(pair) + UNET + ["--device", "cpu", "--out", out]) == 130
    assert T.main(["--resume", "--out", out]) == 0
    want, got = npz(os.path.join(whole, "last.npz")), npz(os.path.join(out, "last.npz"))
    for k in want:
        if k != "meta":
            assert np.array_equal(bits(got[k]), bits(want[k])), k
    assert [r["train_mse"] for r in metrics(out)] == [r["train_mse"] for r in metrics(whole)]
    assert json.loads(str(got["meta"]))["network"]["kind"] == "unet"


def test_denoise_and_evaluate_load_the_unet(trained, tmp_path):
    (noisy, clean), out = trained
    model = os.path.join(out, "best.npz")
    target = tmp_path / "den"
    assert D.main([model, noisy, "-o", str(target), "--tile", "8", "--device", "cpu"]) == 0
    denoiser = TiledDenoiser(load_model(model), get_backend("reference"), tile=0)
    stack = MrcStack(noisy)
    want = np.array([denoiser.denoise(stack.read(i, np.empty(stack.shape, np.float32)))
                     for i in range(len(stack))])
    with mrcfile.open(str(target / os.path.basename(noisy))) as mrc:
        assert np.array_equal(bits(mrc.data.reshape(want.shape)), bits(want))
    report = tmp_path / "r.json"
    assert E.main([model, "--noisy", noisy, "--clean", clean, "--json", str(report),
                   "--device", "cpu"]) == 0
    assert json.loads(report.read_text())["network"]["widths"] == [4, 6, 8]


@pytest.mark.parametrize("args, network, optimizer, epochs", [
    ([], (16, 16, 16), "adam", 20),                       # the built-in simulated set
    (["--noisy", "a.mrc", "--clean", "b.mrc"], (48,) * 6, "adam", 5),
    (["--pairs", "list.txt", "--unet-widths", "8,8"], (8, 8), "adam", 5),
    (["--channels", "1,4,1", "--epochs", "3"], (1, 4, 1), "sgd", 3),
    (["--arch", "chain", "--optimizer", "adam"], (1, 16, 16, 1), "adam", 20)])
def test_defaults_follow_the_data_and_the_architecture(args, network, optimizer, epochs):
    """The U-Net by default (a small one on the demo's data), the chain where --channels is
    given; each architecture's own optimizer; the demo trains longer."""
    opts = T.build_parser().parse_args(args)
    net = T.check_options(opts)
    assert (net.widths if isinstance(net, UNet) else net.channels) == network
    assert (opts.optimizer, opts.epochs) == (optimizer, epochs)
    assert opts.lr == T.DEFAULT_LR[optimizer]


@pytest.mark.parametrize("args, message", [
    (["--arch", "unet", "--channels", "1,4,1"], "--channels shapes the chain"),
    (["--arch", "chain", "--residual"], "--residual shapes the U-Net; give --arch unet"),
    (["--channels", "1,4,1", "--leaky-slope", "0.2"], "--leaky-slope shapes the U-Net"),
    (["--arch", "unet", "--unet-widths", "8"], "--unet-widths '8': give at least two")])
def test_mixed_or_bad_architecture_options_exit_2_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert T.main(args + ["--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_a_checkpoint_from_before_the_unet_loads_as_a_chain(tmp_path):
    net = Network((1, 3, 1))
    path = str(tmp_path / "old.npz")
    checkpoint.save(path, init_params(net, 0), {},
                    {"network": {"channels": [1, 3, 1]}, "normalize": "per-image"})
    assert load_model(path).network == net


def test_resume_keeps_the_architecture(trained, tmp_path, capsys):
    _, whole = trained
    out = tmp_path / "run"
    os.makedirs(out)
    for name in ("last.npz", "config.json"):
        (out / name).write_bytes(open(os.path.join(whole, name), "rb").read())
    assert T.main(["--resume", "--out", str(out), "--arch", "chain"]) == 2
    assert "--arch chain differs" in capsys.readouterr().err
    assert T.main(["--resume", "--out", str(out), "--unet-widths", "4,6"]) == 2
    assert "--unet-widths 4,6 differs" in capsys.readouterr().err


def test_the_gpu_kernels_of_either_network_are_precompiled(monkeypatch):
    """train starts compiling the network's kernels, chain or U-Net, while the data open."""
    started = []
    monkeypatch.setattr(T, "gpu_available", lambda: True)
    monkeypatch.setattr(T.precompile, "start", lambda network, opt: started.append(network))
    opts = T.resolve_defaults(T.build_parser().parse_args(["--device", "gpu"]))
    T.start_compiling(opts, UNet((4, 6)))
    T.start_compiling(opts, Network((1, 4, 1)))
    assert started == [UNet((4, 6)), Network((1, 4, 1))]


def test_a_run_from_before_the_unet_resumes_as_a_chain(tmp_path):
    """Its checkpoint's meta holds network.channels alone and options without --arch."""
    out = tmp_path / "run"
    pair = make_pair(tmp_path)
    chain = ["--device", "cpu", "--channels", "1,4,1", "--out", str(out)]
    assert T.main(data_args(pair) + chain + ["--epochs", "1"]) == 0
    params, state, meta = checkpoint.load(out / "last.npz")
    meta["network"] = {"channels": [1, 4, 1]}
    for name in ("arch",) + T.UNET_OPTIONS:
        del meta["options"][name]
    checkpoint.save(out / "last.npz", params, state, meta)
    assert T.main(["--resume", "--out", str(out), "--epochs", "2"]) == 0
    assert json.loads(str(npz(out / "last.npz")["meta"]))["network"] == \
        {"kind": "chain", "channels": [1, 4, 1]}
    assert len(metrics(out)) == 2
