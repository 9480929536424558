"""python -m cryokern.evaluate: each metric against independent float64 math, the report's
per-image and mean scores, the panel, and clear errors."""
import json
import math

import numpy as np
import pytest

from conftest import write_mrc
from cryokern import checkpoint
from cryokern.evaluate import main
from cryokern.metrics import fitted_metrics, gaussian_blur, image_metrics, mean_metrics
from cryokern.model import Network, init_params
from float64_math import ssim64


def test_metrics_match_their_definitions(rng):
    clean = rng.random((40, 50)).astype(np.float32)
    image = (clean + 0.1 * rng.standard_normal(clean.shape)).astype(np.float32)
    m = image_metrics(image, clean, data_range=2.0)
    d = image.astype(np.float64) - clean
    assert m["mse"] == pytest.approx(np.mean(d ** 2), rel=1e-12)
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean(d ** 2)), rel=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(d)), rel=1e-12)
    assert m["psnr"] == pytest.approx(10 * math.log10(4.0 / np.mean(d ** 2)), rel=1e-12)
    assert m["pearson"] == pytest.approx(np.corrcoef(image.ravel(), clean.ravel())[0, 1], rel=1e-10)
    assert m["ssim"] == pytest.approx(ssim64(image, clean, 2.0), rel=1e-9)


def test_gaussian_blur_equals_scipys_mirrored_gaussian(rng):
    from scipy.ndimage import gaussian_filter      # scipy comes with scikit-image
    x = rng.random((40, 50))
    for sigma in (1.5, 20.0):
        assert np.abs(gaussian_blur(x, sigma) -
                      gaussian_filter(x, sigma, mode="reflect", truncate=8)).max() < 2e-5


def test_fitted_scores_ignore_units_and_offset_and_match_their_definitions(rng):
    """After the least-squares fit, a*x + b scores as x; the fitted MSE is var(t) (1 - r^2)."""
    truth = rng.random((40, 50))
    image = truth + 0.5 * rng.standard_normal(truth.shape)
    m = fitted_metrics(image, truth)
    assert fitted_metrics(3.0 * image - 7.0, truth) == pytest.approx(m, rel=1e-9)
    r = np.corrcoef(image.ravel(), truth.ravel())[0, 1]
    mse = truth.var() * (1 - r * r)
    rng_t = truth.max() - truth.min()
    assert m["pearson"] == pytest.approx(r, rel=1e-10)
    assert m["psnr_fit"] == pytest.approx(10 * math.log10(rng_t ** 2 / mse), rel=1e-9)
    fitted = truth.mean() + r * truth.std() / image.std() * (image - image.mean())
    assert m["ssim_fit"] == pytest.approx(ssim64(fitted, truth, rng_t), rel=1e-9)


def test_highpassed_r_looks_past_slow_variation(rng):
    """A slow wave (period 600 px, 7x the detail's spread) ruins r but not the high-passed r."""
    truth = rng.random((200, 200))
    yy, xx = np.mgrid[:200, :200]
    wave = 2.0 * np.cos(2 * np.pi * (yy + 0.5 * xx) / 600)
    m = fitted_metrics(truth + wave, truth, ssim=False)
    assert m["pearson"] < 0.3 and m["pearson_highpass"] > 0.95 and m["ssim_fit"] is None


def test_metrics_of_an_exact_match_and_of_a_constant_image(rng):
    clean = rng.random((20, 20)).astype(np.float32)
    m = image_metrics(clean, clean, 1.0)
    assert m["mse"] == 0 and m["psnr"] is None and m["ssim"] == pytest.approx(1.0)
    assert m["pearson"] == pytest.approx(1.0)
    assert image_metrics(np.zeros_like(clean), clean, 1.0)["pearson"] is None
    assert mean_metrics([m, {**m, "mse": 2.0, "psnr": 10.0}])["psnr"] == 10.0


@pytest.fixture
def files(tmp_path, rng):
    net = Network()
    model = str(tmp_path / "m.npz")
    checkpoint.save(model, init_params(net, 4), {},
                    {"network": {"channels": list(net.channels)}, "normalize": "per-image"})
    clean = rng.random((3, 24, 30)).astype(np.float32)
    noisy = (clean + 0.3 * rng.standard_normal(clean.shape)).astype(np.float32)
    return model, write_mrc(tmp_path / "n.mrcs", noisy), write_mrc(tmp_path / "c.mrcs", clean)


def test_report_has_per_image_and_mean_scores_and_a_panel(tmp_path, files, capsys):
    model, noisy, clean = files
    report, panel = tmp_path / "r.json", tmp_path / "p.png"
    assert main([model, "--noisy", noisy, "--clean", clean, "--json", str(report),
                 "--panel", str(panel), "--panel-images", "2", "--device", "cpu"]) == 0
    r = json.loads(report.read_text())
    assert len(r["images"]) == 3 and r["ssim"]["sigma"] == 1.5
    assert r["data_range"].startswith("per image")
    assert r["highpass_sigma_px"] == 20.0
    for kind in ("denoised", "noisy"):
        for name in ("mse", "psnr", "ssim", "pearson", "psnr_fit", "ssim_fit",
                     "pearson_highpass"):
            assert r["mean"][kind][name] == pytest.approx(
                np.mean([i[kind][name] for i in r["images"]]))
    first = r["images"][0]
    assert first["image"] == 0 and first["noisy_file"] == noisy
    assert panel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "mean" in out and "pearson_highpass" in out and "affine fit" in out


def test_a_fixed_data_range_is_used_and_stated(tmp_path, files, capsys):
    model, noisy, clean = files
    assert main([model, "--noisy", noisy, "--clean", clean, "--data-range", "2",
                 "--json", "-", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["data_range"] == 2.0 and all(i["data_range"] == 2.0 for i in r["images"])
    mse = r["images"][1]["noisy"]["mse"]
    assert r["images"][1]["noisy"]["psnr"] == pytest.approx(10 * math.log10(4 / mse))


def test_mismatched_pairs_exit_2_naming_the_files(tmp_path, files, capsys):
    model, noisy, clean = files
    other = write_mrc(tmp_path / "short.mrcs", np.zeros((2, 24, 30), np.float32))
    assert main([model, "--noisy", noisy, "--clean", other, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cryokern.evaluate: error: {noisy}: 3 images") and other in err


def test_images_too_small_for_the_ssim_window_exit_2(tmp_path, files, capsys):
    model = files[0]
    tiny = write_mrc(tmp_path / "tiny.mrcs", np.zeros((2, 10, 30), np.float32))
    assert main([model, "--noisy", tiny, "--clean", tiny, "--device", "cpu"]) == 2
    assert "images are 10x30; SSIM's window needs at least 11x11" in capsys.readouterr().err
