"""Every command's file options take several files after one flag and repeated flags alike, with
nothing dropped; bad hyperparameters are refused up front with exit 2 and one line."""
import json
import os

import numpy as np
import pytest

from conftest import write_mrc
from cryokern import checkpoint
from cryokern import denoise, evaluate, prepare
from cryokern import train as T
from cryokern.model import Network, init_params


@pytest.fixture
def stacks(tmp_path, rng):
    """Three noisy/clean pairs of 2, 3 and 4 images of 16x16 (so a dropped file shows in the
    count)."""
    pairs = []
    for name, n in (("a", 2), ("b", 3), ("c", 4)):
        clean = rng.random((n, 16, 16)).astype(np.float32) + 0.5
        noisy = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
        pairs.append((write_mrc(tmp_path / f"{name}_noisy.mrcs", noisy),
                      write_mrc(tmp_path / f"{name}_clean.mrcs", clean)))
    return pairs


@pytest.fixture
def model_path(tmp_path):
    net = Network((1, 2, 1))
    path = str(tmp_path / "model.npz")
    checkpoint.save(path, init_params(net, 1), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    return path


def noisy_clean(stacks):
    return [n for n, _ in stacks], [c for _, c in stacks]


def spellings(flag, files):
    """The same files after one flag, each after its own flag, and split 1 + rest."""
    return [[flag, *files], [x for f in files for x in (flag, f)],
            [flag, files[0], flag, *files[1:]]]


def test_train_file_options_pair_in_command_line_order(stacks, tmp_path):
    """The k-th --noisy file pairs with the k-th --clean file, however the flags are spelled
    and interleaved; --val-* and --pairs lists likewise."""
    noisy, clean = noisy_clean(stacks)
    (tmp_path / "one.txt").write_text(f"{noisy[0]} {clean[0]}\n")
    (tmp_path / "two.txt").write_text(f"{noisy[1]} {clean[1]}\n{noisy[2]} {clean[2]}\n")
    for n_args in spellings("--noisy", noisy):
        for c_args in spellings("--clean", clean):
            opts = T.build_parser().parse_args(n_args + c_args + ["--val-noisy", noisy[2],
                                                "--val-noisy", noisy[0], "--val-clean",
                                                clean[2], clean[0]])
            train, val = T.data_pairs(opts)
            assert train == stacks and val == [stacks[2], stacks[0]]
    interleaved = ["--noisy", noisy[0], "--clean", clean[0], "--noisy", noisy[1], noisy[2],
                   "--clean", clean[1], "--clean", clean[2]]
    assert T.data_pairs(T.build_parser().parse_args(interleaved))[0] == stacks
    lists = T.build_parser().parse_args(["--pairs", str(tmp_path / "one.txt"), "--pairs",
                                         str(tmp_path / "two.txt")])
    assert T.data_pairs(lists)[0] == stacks
    # the options of a run saved when --pairs took one list (resumed runs read them)
    saved = T.build_parser().parse_args([])
    saved.pairs = str(tmp_path / "two.txt")
    assert T.data_pairs(saved)[0] == stacks[1:]
    saved.pairs, saved.noisy, saved.clean = None, noisy, clean
    assert T.data_pairs(saved)[0] == stacks


def test_train_uses_every_file_of_repeated_flags(stacks, tmp_path):
    noisy, clean = noisy_clean(stacks)
    out = tmp_path / "run"
    assert T.main(["--noisy", noisy[0], "--noisy", noisy[1], noisy[2], "--clean", *clean,
                   "--epochs", "1", "--channels", "1,2,1", "--device", "cpu",
                   "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert [(d["noisy"], d["clean"], d["images"]) for d in config["data"]["train"]] == \
        [(n, c, k) for (n, c), k in zip(stacks, (2, 3, 4))]
    # 9 images: a seeded tenth held out, the rest trained on
    assert len(config["data"]["val_indices"]) == 1


def test_train_refuses_unequal_file_counts(stacks, tmp_path, capsys):
    noisy, clean = noisy_clean(stacks)
    assert T.main(["--noisy", *noisy, "--clean", clean[0], "--clean", clean[1],
                   "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "--noisy names 3 files but --clean 2: they pair in order" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["clean", "noisy/clean", "even/odd"])
def test_prepare_uses_every_file_of_repeated_flags(stacks, tmp_path, source):
    noisy, clean = noisy_clean(stacks)
    first, second = {"clean": (None, "--clean"), "noisy/clean": ("--noisy", "--clean"),
                     "even/odd": ("--even", "--odd")}[source]
    results = []
    for k, spelling in enumerate(spellings(second, clean)):
        args = spelling + (spellings(first, noisy)[2 - k] if first else [])
        out = tmp_path / f"out{k}"
        assert prepare.main(args + ["-o", str(out), "--patch", "16", "--test-fraction", "0"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        side = "odd" if source == "even/odd" else "clean"
        results.append([(m[side], m["image"]) for m in manifest["micrographs"]])
    assert results[0] == [(c, i) for c, k in zip(clean, (2, 3, 4)) for i in range(k)]
    assert results[1] == results[0] and results[2] == results[0]


def test_evaluate_uses_every_file_of_repeated_flags(stacks, model_path):
    noisy, clean = noisy_clean(stacks)
    reports = []
    for n_args, c_args in zip(spellings("--noisy", noisy), reversed(spellings("--clean", clean))):
        opts = evaluate.build_parser().parse_args([model_path, *n_args, *c_args, "--device",
                                                   "cpu"])
        reports.append([(r["noisy_file"], r["clean_file"], r["image"])
                        for r in evaluate.evaluate(opts)["images"]])
    assert reports[0] == [(n, c, i) for (n, c), k in zip(stacks, (2, 3, 4)) for i in range(k)]
    assert reports[1] == reports[0] and reports[2] == reports[0]


def test_denoise_inputs_may_come_before_and_after_the_options(stacks, model_path, tmp_path):
    noisy, _ = noisy_clean(stacks)
    out = tmp_path / "out"
    assert denoise.main([model_path, noisy[0], "-o", str(out), noisy[1], "--device", "cpu",
                         noisy[2]]) == 0
    assert sorted(os.listdir(out)) == sorted(os.path.basename(n) for n in noisy)


# option, bad value, the words of the refusal
TRAIN_BAD = [("--lr", "0", "--lr 0.0: must be positive and finite"),
             ("--lr", "-1", "--lr -1.0: must be positive"), ("--lr", "nan", "--lr nan"),
             ("--lr", "inf", "--lr inf"), ("--momentum", "1", "--momentum 1.0: must be in [0, 1)"),
             ("--momentum", "-0.1", "--momentum -0.1"),
             ("--betas", "1 0.999", "--betas 1.0 0.999: each must be in [0, 1)"),
             ("--betas", "0.9 -0.5", "--betas 0.9 -0.5"), ("--betas", "0.9 nan", "--betas"),
             ("--eps", "0", "--eps 0.0: must be positive"), ("--eps", "-0.5", "--eps -0.5"),
             ("--weight-decay", "-0.1", "--weight-decay -0.1: must be finite and not negative"),
             ("--weight-decay", "nan", "--weight-decay nan"),
             ("--epochs", "0", "--epochs 0: must be at least 1"),
             ("--crop", "2", "--crop 2: must be at least 3 (or 0: whole images)"),
             ("--crop", "-4", "--crop -4")]
PREPARE_BAD = [("--patch", "2", "--patch 2: must be at least 3"),
               ("--stride", "0", "--stride 0: must be at least 1"),
               ("--dose", "0", "--dose 0.0: must be positive and finite"),
               ("--dose", "-2", "--dose -2.0"), ("--dose", "inf", "--dose inf"),
               ("--sigma", "-0.1", "--sigma -0.1: must be finite and not negative"),
               ("--sigma", "nan", "--sigma nan")]


def run_refused(command, args, words, capsys, out):
    assert command.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("option, value, words", TRAIN_BAD)
def test_train_refuses_bad_hyperparameters(stacks, tmp_path, capsys, option, value, words):
    out = tmp_path / "run"
    args = ["--noisy", stacks[0][0], "--clean", stacks[0][1], "--device", "cpu", "--out", str(out)]
    run_refused(T, args + [option, *value.split()], words, capsys, out)


@pytest.mark.parametrize("option, value, words", PREPARE_BAD)
def test_prepare_refuses_bad_parameters(stacks, tmp_path, capsys, option, value, words):
    out = tmp_path / "out"
    run_refused(prepare, ["--clean", stacks[0][1], "-o", str(out), option, value], words, capsys,
                out)


@pytest.mark.parametrize("command", [denoise, evaluate])
def test_denoise_and_evaluate_refuse_a_negative_tile(stacks, model_path, tmp_path, capsys,
                                                     command):
    out = tmp_path / "out"
    files = ["-o", str(out)] if command is denoise else \
        ["--noisy", stacks[0][0], "--clean", stacks[0][1], "--json", str(out)]
    run_refused(command, [model_path, stacks[0][0], *files, "--tile", "-1"]
                if command is denoise else [model_path, *files, "--tile", "-1"],
                "--tile -1: must be at least 1 (or 0: whole images)", capsys, out)


def test_boundary_values_are_accepted():
    opts = T.build_parser().parse_args(["--momentum", "0", "--betas", "0", "0", "--crop", "3",
                                        "--weight-decay", "0", "--epochs", "1", "--lr", "1e-30"])
    T.check_options(opts)
    opts = prepare.build_parser().parse_args(["-o", "x", "--patch", "3", "--stride", "1",
                                              "--sigma", "0", "--dose", "1e-6"])
    prepare.check_options(opts)
