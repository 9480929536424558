"""How close an image is to its clean reference: MSE, RMSE, MAE, PSNR, SSIM, Pearson r.

Everything in float64. PSNR is 10 log10(R^2 / MSE) with a stated data range R. SSIM is the
standard definition (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, population
covariances), computed by scikit-image rather than by hand.
"""
import math

import numpy as np

SSIM_SETTINGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False,
                 "K1": 0.01, "K2": 0.03}
NAMES = ("mse", "rmse", "mae", "psnr", "ssim", "pearson")
# scikit-image's Gaussian window: radius int(3.5 sigma + 0.5), so images need 11 x 11 pixels
SSIM_MIN_SIZE = 2 * int(3.5 * SSIM_SETTINGS["sigma"] + 0.5) + 1


def structural_similarity():
    """scikit-image's SSIM, or ImportError saying how to install it."""
    try:
        from skimage.metrics import structural_similarity as ssim
    except ImportError:
        raise ImportError("SSIM needs scikit-image: pip install 'cryokern[evaluate]' "
                          "(or pip install scikit-image)") from None
    return ssim


def ssim_description():
    import skimage
    return dict(SSIM_SETTINGS, definition="Wang et al. 2004",
                library=f"scikit-image {skimage.__version__}")


def image_metrics(image, reference, data_range):
    """{name: value} of a 2-D image against its reference; None where a value is undefined
    (PSNR of an exact match, Pearson r of a constant image)."""
    a = np.asarray(image, np.float64)
    b = np.asarray(reference, np.float64)
    diff = a - b
    mse = float(np.mean(diff * diff))
    psnr = 10 * math.log10(data_range * data_range / mse) if mse > 0 and data_range > 0 else None
    ac, bc = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(np.sum(ac * ac)) * float(np.sum(bc * bc)))
    pearson = float(np.sum(ac * bc)) / denominator if denominator > 0 else None
    ssim = float(structural_similarity()(b, a, data_range=data_range, **SSIM_SETTINGS))
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(diff))),
            "psnr": psnr, "ssim": ssim, "pearson": pearson}


def mean_metrics(records):
    """The mean of each metric over images, skipping undefined values (None if all are)."""
    means = {}
    for name in NAMES:
        values = [r[name] for r in records if r[name] is not None]
        means[name] = float(np.mean(values)) if values else None
    return means
