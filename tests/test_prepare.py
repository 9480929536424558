"""python -m cryokern.prepare: patches where the manifest says, seeded noise with the stated
statistics, a split by micrograph, Noise2Noise pairs, and outputs that train reads."""
import json
import os

import mrcfile
import numpy as np
import pytest

from conftest import write_mrc
from cryokern import train
from cryokern.prepare import main, patch_starts


def read(path):
    with mrcfile.open(path) as mrc:
        return mrc.data.copy()


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("length, patch, stride, starts", [
    (70, 32, 16, [0, 16, 32, 38]), (64, 32, 16, [0, 16, 32]), (40, 16, 30, [0, 24]),
    (16, 16, 8, [0])])
def test_patch_starts_cover_the_micrograph(length, patch, stride, starts):
    assert patch_starts(length, patch, stride) == starts


@pytest.fixture
def pairs(tmp_path, rng):
    noisy = rng.standard_normal((3, 40, 50)).astype(np.float32)
    clean = rng.random((3, 40, 50)).astype(np.float32)
    one = rng.random((45, 37)).astype(np.float32)
    return {"noisy": [write_mrc(tmp_path / "n.mrcs", noisy, voxel_size=1.3),
                      write_mrc(tmp_path / "n1.mrc", one * 2)],
            "clean": [write_mrc(tmp_path / "c.mrcs", clean, voxel_size=1.3),
                      write_mrc(tmp_path / "c1.mrc", one)],
            "data": [(noisy[i], clean[i]) for i in range(3)] + [(one * 2, one)]}


def test_patches_are_where_the_manifest_says_and_the_split_is_by_micrograph(tmp_path, pairs):
    out = tmp_path / "out"
    assert main(["--noisy", *pairs["noisy"], "--clean", *pairs["clean"], "-o", str(out),
                 "--patch", "16", "--stride", "10", "--test-fraction", "0.5", "--seed", "3"]) == 0
    m = manifest(out)
    assert m["source"] == "noisy/clean" and m["noise"] is None
    splits = {d["id"]: d["split"] for d in m["micrographs"]}
    assert sorted(splits.values()) == ["test", "test", "train", "train"]
    for split in ("train", "test"):
        noisy, clean = read(out / f"{split}_noisy.mrcs"), read(out / f"{split}_clean.mrcs")
        rows = m["patches"][split]
        assert len(rows) == len(noisy) == len(clean) == m["splits"][split]["patches"]
        for k, (micrograph, y, x, swapped) in enumerate(rows):
            assert splits[micrograph] == split and not swapped
            a, b = pairs["data"][micrograph]
            assert np.array_equal(noisy[k], a[y:y + 16, x:x + 16])
            assert np.array_equal(clean[k], b[y:y + 16, x:x + 16])
    assert m["micrographs"][3]["patches"] == len(patch_starts(45, 16, 10)) * len(patch_starts(37, 16, 10))
    assert mrcfile.validate(out / "train_noisy.mrcs", print_file=open(os.devnull, "w"))
    with mrcfile.open(out / "train_noisy.mrcs") as mrc:
        assert mrc.voxel_size.x == pytest.approx(1.3)


def synthetic(tmp_path, clean_path, name, *extra):
    out = tmp_path / name
    assert main(["--clean", clean_path, "-o", str(out), "--patch", "64", "--stride", "64",
                 "--test-fraction", "0", *extra]) == 0
    return read(out / "train_noisy.mrcs"), read(out / "train_clean.mrcs")


def test_poisson_gaussian_noise_is_seeded_and_has_the_stated_statistics(tmp_path):
    level, dose, sigma = 0.5, 10.0, 0.05
    clean = write_mrc(tmp_path / "flat.mrcs", np.full((2, 128, 128), level, np.float32))
    noisy, kept = synthetic(tmp_path, clean, "a", "--dose", str(dose), "--sigma", str(sigma))
    assert (kept == level).all()
    again, _ = synthetic(tmp_path, clean, "b", "--dose", str(dose), "--sigma", str(sigma))
    other, _ = synthetic(tmp_path, clean, "c", "--dose", str(dose), "--sigma", str(sigma),
                         "--seed", "1")
    assert np.array_equal(noisy, again) and not np.array_equal(noisy, other)
    # 32768 pixels: the mean and variance are within a few percent of level and
    # level / dose + sigma^2
    assert abs(noisy.mean() - level) < 0.01
    assert noisy.var() == pytest.approx(level / dose + sigma ** 2, rel=0.05)
    assert manifest(tmp_path / "a")["noise"]["formula"].startswith("noisy = Poisson(dose * clean)")


def test_gaussian_noise_has_the_stated_sigma(tmp_path):
    clean = write_mrc(tmp_path / "flat.mrcs", np.full((2, 128, 128), -3.0, np.float32))
    noisy, _ = synthetic(tmp_path, clean, "g", "--noise", "gaussian", "--sigma", "0.2")
    assert abs(noisy.mean() + 3) < 0.01 and noisy.std() == pytest.approx(0.2, rel=0.03)


def test_poisson_noise_refuses_negative_intensities(tmp_path, capsys):
    clean = write_mrc(tmp_path / "neg.mrc", np.full((32, 32), -1.0, np.float32))
    assert main(["--clean", clean, "-o", str(tmp_path / "o"), "--patch", "16"]) == 2
    err = capsys.readouterr().err
    assert f"{clean}: image 0 has negative pixels" in err and "--noise gaussian" in err
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_even_odd_pairs_for_noise2noise(tmp_path, rng):
    even = rng.standard_normal((2, 24, 24)).astype(np.float32)
    odd = rng.standard_normal((2, 24, 24)).astype(np.float32)
    args = ["--even", write_mrc(tmp_path / "e.mrcs", even), "--odd",
            write_mrc(tmp_path / "o.mrcs", odd), "--patch", "24", "--test-fraction", "0"]
    assert main(args + ["-o", str(tmp_path / "one")]) == 0
    assert np.array_equal(read(tmp_path / "one" / "train_noisy.mrcs"), even)
    assert np.array_equal(read(tmp_path / "one" / "train_clean.mrcs"), odd)
    assert main(args + ["-o", str(tmp_path / "both"), "--both-directions"]) == 0
    noisy = read(tmp_path / "both" / "train_noisy.mrcs")
    assert np.array_equal(noisy, np.stack([even[0], odd[0], even[1], odd[1]]))
    assert [r[3] for r in manifest(tmp_path / "both")["patches"]["train"]] == [False, True] * 2


@pytest.mark.parametrize("args, message", [
    (["--clean", "{small}", "--patch", "64"], "{small}: images are 32x32, smaller than --patch 64"),
    (["--noisy", "{small}", "--clean", "{small}", "{small}"], "--noisy names 1 files but --clean 2"),
    (["--clean", "{small}", "--both-directions"], "--both-directions is for --even/--odd"),
    (["--noisy", "{small}", "--clean", "{small}", "--sigma", "0.1"],
     "--sigma: synthetic noise is added to --clean micrographs given alone"),
    ([], "no micrographs given")])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    small = write_mrc(tmp_path / "small.mrc", np.ones((32, 32), np.float32))
    args = [a.format(small=small) for a in args]
    assert main(args + ["-o", str(tmp_path / "o"), "--patch", "16"] if "--patch" not in args
                else args + ["-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(small=small) in err and "\n" not in err


def test_outputs_are_not_written_over_and_inputs_never(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    src = write_mrc(out / "train_clean.mrcs", np.ones((2, 32, 32), np.float32))
    before = open(src, "rb").read()
    assert main(["--clean", src, "-o", str(out), "--patch", "16", "--force"]) == 2
    assert "train_clean.mrcs: is an input" in capsys.readouterr().err
    assert open(src, "rb").read() == before and os.listdir(out) == ["train_clean.mrcs"]


def test_prepared_pairs_train(tmp_path, rng):
    clean = write_mrc(tmp_path / "m.mrcs", rng.random((3, 40, 40)).astype(np.float32) + 0.5)
    out = tmp_path / "pairs"
    assert main(["--clean", clean, "-o", str(out), "--patch", "16", "--test-fraction", "0.34"]) == 0
    run = tmp_path / "run"
    assert train.main(["--noisy", str(out / "train_noisy.mrcs"), "--clean",
                       str(out / "train_clean.mrcs"), "--val-noisy", str(out / "test_noisy.mrcs"),
                       "--val-clean", str(out / "test_clean.mrcs"), "--epochs", "1",
                       "--device", "cpu", "--out", str(run)]) == 0
    assert (run / "best.npz").exists()


def test_patches_keep_voxel_size_and_axis_order_and_have_no_extended_header(tmp_path, capsys):
    from test_headers import build_variants
    variants = build_variants(tmp_path)
    out = tmp_path / "out"
    assert main(["--clean", variants["fei1"], "-o", str(out), "--patch", "8", "--noise",
                 "gaussian", "--test-fraction", "0.34"]) == 0
    m = manifest(out)
    assert m["header"]["extended_header"] is None and "no extended header" in m["header"]["note"]
    assert m["micrographs"][0]["source_header"]["exttyp"] == "FEI1"
    assert m["micrographs"][0]["source_header"]["extended_header_bytes"] == 3 * 768 + 256
    for name in ("train_noisy", "train_clean", "test_noisy", "test_clean"):
        assert mrcfile.validate(out / f"{name}.mrcs", print_file=open(os.devnull, "w"))
        with mrcfile.open(out / f"{name}.mrcs", header_only=True) as mrc:
            assert (mrc.header.nsymbt, mrc.header.ispg) == (0, 0)
            assert mrc.voxel_size.x == pytest.approx(1.06)
    assert main(["--clean", variants["swapped_axes"], "-o", str(tmp_path / "axes"), "--patch",
                 "8", "--noise", "gaussian"]) == 0
    with mrcfile.open(tmp_path / "axes" / "train_clean.mrcs", header_only=True) as mrc:
        assert (mrc.header.mapc, mrc.header.mapr, mrc.header.maps) == (2, 1, 3)
    assert manifest(tmp_path / "axes")["header"]["kept"]["axis_order"] == [2, 1, 3]
    capsys.readouterr()
    assert main(["--clean", variants["fei1"], variants["swapped_axes"], "-o",
                 str(tmp_path / "mixed"), "--patch", "8", "--noise", "gaussian"]) == 2
    err = capsys.readouterr().err
    assert "swapped_axes.mrcs: axis order (mapc, mapr, maps) (2, 1, 3) differs" in err
