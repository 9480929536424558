"""Real-world MRC header variants, built with mrcfile: FEI1 and FEI2 extended headers, space
group 4 with symmetry records, a non-standard axis order (big-endian), mode 6 above 32767, a 2-D
file with all ten labels, an old (nversion 0) float16 volume. Each is read image by image as
mrcfile reads it, trains, and is denoised into a file that keeps its header."""
import os

import mrcfile
import numpy as np
import pytest
from mrcfile.dtypes import get_ext_header_dtype

from conftest import bits
from cryokern import checkpoint
from cryokern import train as T
from cryokern.backends import get_backend
from cryokern.denoise import main as denoise
from cryokern.inference import TiledDenoiser, load_model
from cryokern.model import Network, init_params
from cryokern.mrcstack import MrcStack

# the header fields a denoised file has of its own; every other field is the input's
OWN = {"mode", "dmin", "dmax", "dmean", "rms", "nlabl", "label", "map", "machst", "nversion"}
SYMMETRY = b"".join(op.ljust(80) for op in (b"X,Y,Z", b"-X,Y+1/2,-Z"))


def fei_records(kind, count):
    """FEI1/FEI2 per-image metadata records (little-endian, as EPU writes them)."""
    dtype = get_ext_header_dtype(kind, "<")
    records = np.zeros(count, dtype)
    records["Metadata size"] = dtype.itemsize
    records["Metadata version"] = 0 if kind == b"FEI1" else 2
    records["Microscope type"] = b"TITAN52336320"
    records["HT"] = 300000.0
    records["Dose"] = np.arange(count) + 1.5
    records["Pixel size X"] = 1.06e-10
    return records


def new(path, data, label, extended=None, exttyp=None, volume=False):
    """An open new MRC file (use as a context manager to change more of its header)."""
    mrc = mrcfile.new(str(path), overwrite=True)
    mrc.set_data(data)
    if data.ndim == 3:
        mrc.set_volume() if volume else mrc.set_image_stack()
    if extended is not None:
        mrc.set_extended_header(np.frombuffer(extended, "V1"))
        mrc.header.exttyp = exttyp
    mrc.add_label(label)
    return mrc


def build_variants(d):
    rng = np.random.default_rng(23)
    paths = {}
    # EPU micrographs: float32 with FEI1 records (and zero padding, as real files have)
    p = d / "fei1.mrcs"
    with new(p, rng.normal(5, 2, (3, 16, 16)).astype(np.float32), "EPU FEI1",
             fei_records(b"FEI1", 3).tobytes() + bytes(256), b"FEI1") as mrc:
        mrc.voxel_size = 1.06
    paths["fei1"] = p
    # a counting camera: uint16 (mode 6) above 32767, FEI2 records
    p = d / "fei2_uint16.mrcs"
    new(p, rng.integers(30000, 65536, (2, 12, 16)).astype(np.uint16), "EPU FEI2",
        fei_records(b"FEI2", 2).tobytes(), b"FEI2").close()
    paths["fei2_uint16"] = p
    # an EMDB map: space group 4 (P2_1) with two symmetry records, an origin and start indices
    p = d / "p21.mrc"
    with new(p, rng.random((4, 14, 16)).astype(np.float32), "EMDB map P21", SYMMETRY,
             b"CCP4", volume=True) as mrc:
        mrc.header.ispg = 4
        mrc.voxel_size = (1.1, 1.1, 1.1)
        mrc.header.origin = (10.5, -3.0, 7.25)
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = -8, -7, -2
    paths["p21"] = p
    # columns along y, rows along x; big-endian; anisotropic pixels
    p = d / "swapped_axes.mrcs"
    with new(p, rng.normal(0, 1, (3, 12, 20)).astype(">f4"), "axes 2 1 3") as mrc:
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 2, 1, 3
        mrc.voxel_size = (1.5, 1.25, 1.0)
    paths["swapped_axes"] = p
    # a 2-D int16 micrograph whose ten labels are all in use
    p = d / "image2d.mrc"
    with new(p, rng.integers(-3000, 3000, (18, 20)).astype(np.int16), "label 0") as mrc:
        for i in range(1, 9):          # and mrcfile's "Created by" label: ten
            mrc.add_label(f"label {i}")
    paths["image2d"] = p
    # an old float16 volume that declares no MRC2014 version
    p = d / "old_volume.mrc"
    with new(p, rng.random((3, 10, 12)).astype(np.float16), "old volume", volume=True) as mrc:
        mrc.header.nversion = 0
    paths["old_volume"] = p
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return build_variants(tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    net = Network((1, 3, 1))
    path = str(tmp_path_factory.mktemp("model") / "model.npz")
    checkpoint.save(path, init_params(net, 4), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    return path


@pytest.fixture(scope="module")
def denoised(variants, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("denoised")
    assert denoise([model_path, *variants.values(), "-o", str(out), "--tile", "5",
                    "--device", "cpu"]) == 0
    return {k: str(out / os.path.basename(p)) for k, p in variants.items()}


def images_as_mrcfile_reads_them(path):
    with mrcfile.open(path) as mrc:
        data = np.asarray(mrc.data, np.float32)
    return data.reshape((-1,) + data.shape[-2:])


def test_every_variant_is_read_as_mrcfile_reads_it(variants):
    for name, path in variants.items():
        stack = MrcStack(path)
        want = images_as_mrcfile_reads_them(path)
        got = np.array([stack.read(i, np.empty(stack.shape, np.float32))
                        for i in range(len(stack))])
        assert np.array_equal(bits(got), bits(want)), name
        with mrcfile.open(path, header_only=True) as mrc:
            assert stack.extended_header() == bytes(mrc.extended_header), name
            assert stack.axis_order == (int(mrc.header.mapc), int(mrc.header.mapr),
                                        int(mrc.header.maps))
    assert images_as_mrcfile_reads_them(variants["fei2_uint16"]).max() > 32767
    assert MrcStack(variants["image2d"]).layout == "image"
    assert MrcStack(variants["p21"]).layout == "volume"


def test_training_on_every_variant(variants, tmp_path):
    files = list(variants.values())
    out = tmp_path / "run"
    assert T.main(["--noisy", *files, "--clean", *files, "--crop", "8", "--epochs", "1",
                   "--batch-size", "4", "--channels", "1,2,1", "--val-fraction", "0",
                   "--device", "cpu", "--out", str(out)]) == 0
    config = T.json.loads((out / "config.json").read_text())
    counts = {d["noisy"]: d["images"] for d in config["data"]["train"]}
    assert counts == {p: len(MrcStack(p)) for p in files}
    record = T.json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(record["train_mse"])


def header_fields(header):
    return {name: header[name].tolist() for name in header.dtype.names}


def test_denoised_files_keep_the_header(variants, denoised):
    for name, src in variants.items():
        dst = denoised[name]
        assert mrcfile.validate(dst, print_file=open(os.devnull, "w")), name
        with mrcfile.open(src, header_only=True) as a, mrcfile.open(dst) as b:
            before, after = header_fields(a.header), header_fields(b.header)
            for field in set(before) - OWN:
                assert after[field] == before[field], (name, field)
            assert bytes(b.extended_header) == bytes(a.extended_header), name
            assert after["mode"] == 2 and after["nversion"] in (20140, 20141)
            labels = a.get_labels()
            if len(labels) == 10:          # full: the second goes, the first stays
                labels = labels[:1] + labels[2:]
            assert b.get_labels() == labels + ["cryokern denoise model.npz"], name
            data = b.data.reshape((-1,) + b.data.shape[-2:])
            assert (b.header.dmin, b.header.dmax) == (data.min(), data.max())
    with mrcfile.open(denoised["p21"], header_only=True) as mrc:   # the case, by name
        assert (int(mrc.header.ispg), bytes(mrc.extended_header)) == (4, SYMMETRY)
        assert mrc.header.exttyp == b"CCP4"
    with mrcfile.open(denoised["swapped_axes"], header_only=True) as mrc:
        assert (mrc.header.mapc, mrc.header.mapr, mrc.header.maps) == (2, 1, 3)
        assert mrc.voxel_size.item() == (1.5, 1.25, 1.0)


def test_fei_records_survive_denoising(variants, denoised):
    for name, kind in (("fei1", b"FEI1"), ("fei2_uint16", b"FEI2")):
        with mrcfile.open(variants[name], header_only=True) as a, \
                mrcfile.open(denoised[name], header_only=True) as b:
            assert b.header.exttyp == kind
            want, got = a.indexed_extended_header, b.indexed_extended_header
            assert got is not None and got.tobytes() == want.tobytes()
            assert list(got["Dose"]) == [1.5 + i for i in range(len(got))]


def test_denoised_data_follow_the_extended_header(variants, denoised, model_path):
    """The images of the output are where mrcfile looks for them (after nsymbt bytes) and
    equal the library's result for each input image."""
    denoiser = TiledDenoiser(load_model(model_path), get_backend("reference"), tile=0)
    for name, src in variants.items():
        stack = MrcStack(src)
        want = [denoiser.denoise(stack.read(i, np.empty(stack.shape, np.float32)))
                for i in range(len(stack))]
        assert np.array_equal(bits(images_as_mrcfile_reads_them(denoised[name])),
                              bits(np.array(want))), name
        with mrcfile.open(src, header_only=True) as mrc:
            extended = int(mrc.header.nsymbt)
        assert os.path.getsize(denoised[name]) == 1024 + extended + 4 * np.prod(
            (len(stack),) + stack.shape)
