"""How close an image is to its clean reference: MSE, RMSE, MAE, PSNR, SSIM, Pearson r, and
the ground-truth scores of a denoiser (after an affine fit; high-passed r).

Everything in float64. PSNR is 10 log10(R^2 / MSE) with a stated data range R. SSIM is the
standard definition (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03, population
covariances), computed by scikit-image rather than by hand.

Ground-truth scores (`fitted_metrics`; shared by `evaluate`, the demo and bench/quality.py):
a denoiser's output is in its own units and offset (a Noise2Noise network, a filter, Topaz's
normalized output), so each output x is first mapped by the least-squares affine fit
a x + b to the truth t (a = cov(x, t) / var(x), b = mean(t) - a mean(x)), the same fit for
every method; then PSNR (R: the truth's max - min) and SSIM of the fitted image, Pearson r
(unchanged by the fit), and r of the high-passed images: each minus its Gaussian blur of
sigma HIGHPASS_SIGMA = 20 px, which removes the ice's slow variation (hundreds of pixels at
1 A/px) and keeps particle-scale and finer structure.
"""
import math

import numpy as np

SSIM_SETTINGS = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False,
                 "K1": 0.01, "K2": 0.03}
NAMES = ("mse", "rmse", "mae", "psnr", "ssim", "pearson", "psnr_fit", "ssim_fit",
         "pearson_highpass")
FIT_NAMES = ("pearson", "psnr_fit", "ssim_fit", "pearson_highpass")
HIGHPASS_SIGMA = 20.0
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


def pearson(a, b):
    """Pearson r of two float64 arrays; None if either is constant."""
    ac, bc = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(np.sum(ac * ac)) * float(np.sum(bc * bc)))
    return float(np.sum(ac * bc)) / denominator if denominator > 0 else None


def psnr(mse, data_range):
    return 10 * math.log10(data_range * data_range / mse) if mse > 0 and data_range > 0 else None


def gaussian_blur(image, sigma):
    """A 2-D image convolved with a Gaussian of `sigma` pixels: mirrored at its edges by
    4 sigma, multiplied in Fourier space by exp(-2 pi^2 sigma^2 k^2) (k in cycles/pixel)."""
    image = np.asarray(image, np.float64)
    pad = int(math.ceil(4 * sigma))
    padded = np.pad(image, pad, mode="symmetric")
    ky = np.fft.fftfreq(padded.shape[0])[:, None]
    kx = np.fft.rfftfreq(padded.shape[1])[None, :]
    transfer = np.exp(-2 * math.pi ** 2 * sigma * sigma * (ky * ky + kx * kx))
    blurred = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded.shape)
    return blurred[pad:pad + image.shape[0], pad:pad + image.shape[1]]


def highpass(image, sigma=HIGHPASS_SIGMA):
    image = np.asarray(image, np.float64)
    return image - gaussian_blur(image, sigma)


def affine_fit(image, truth):
    """a image + b with (a, b) the least-squares fit to `truth` (a = 0 for a constant image)."""
    x, t = np.asarray(image, np.float64), np.asarray(truth, np.float64)
    xc = x - x.mean()
    variance = float(np.sum(xc * xc))
    a = float(np.sum(xc * (t - t.mean()))) / variance if variance > 0 else 0.0
    return a * xc + t.mean()


def fitted_metrics(image, truth, data_range=None, ssim=True):
    """The ground-truth scores of a denoised image (module docstring): pearson, psnr_fit,
    ssim_fit (None unless `ssim`), pearson_highpass. data_range: the truth's max - min
    unless given."""
    t = np.asarray(truth, np.float64)
    fitted = affine_fit(image, t)
    data_range = float(t.max() - t.min()) if data_range is None else data_range
    diff = fitted - t
    return {"pearson": pearson(np.asarray(image, np.float64), t),
            "psnr_fit": psnr(float(np.mean(diff * diff)), data_range),
            "ssim_fit": float(structural_similarity()(t, fitted, data_range=data_range,
                                                      **SSIM_SETTINGS)) if ssim else None,
            "pearson_highpass": pearson(highpass(image), highpass(t))}


def image_metrics(image, reference, data_range):
    """{name: value} of a 2-D image against its reference, in its own units and after the
    affine fit (fitted_metrics); None where a value is undefined (PSNR of an exact match,
    Pearson r of a constant image)."""
    a = np.asarray(image, np.float64)
    b = np.asarray(reference, np.float64)
    diff = a - b
    mse = float(np.mean(diff * diff))
    ssim = float(structural_similarity()(b, a, data_range=data_range, **SSIM_SETTINGS))
    return dict({"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(diff))),
                 "psnr": psnr(mse, data_range), "ssim": ssim},
                **fitted_metrics(a, b, data_range))


def mean_metrics(records, names=NAMES):
    """The mean of each metric over images, skipping undefined values (None if all are)."""
    means = {}
    for name in names:
        values = [r[name] for r in records if r[name] is not None]
        means[name] = float(np.mean(values)) if values else None
    return means
