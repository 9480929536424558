"""python -m cryokern.evaluate MODEL --noisy A... --clean B...: how well a checkpoint denoises.

Each noisy image is denoised as `cryokern.denoise` does it and compared with its clean image,
beside the noisy image's own scores (the baseline): MSE, RMSE, MAE, PSNR, SSIM and Pearson r per
image and their means over images, in the images' own units, and the ground-truth scores that
bench/quality.py reports (cryokern.metrics.fitted_metrics: PSNR and SSIM after a least-squares
affine fit to the clean image, Pearson r of high-passed images). Prints the tables, writes JSON
(--json) and a PNG panel of a few images (--panel, needs matplotlib).
Exit status: 0 done, 2 bad input, 130 interrupted.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import DEVICE_HELP, DEVICES, get_backend
from .data import PairedImages
from .inference import DEFAULT_TILE, TiledDenoiser, load_model
from .metrics import (FIT_NAMES, HIGHPASS_SIGMA, NAMES, SSIM_MIN_SIZE, image_metrics,
                      mean_metrics, ssim_description, structural_similarity)
from .mrcstack import DataError
from .options import add_files, finite, refuse

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cryokern.evaluate", allow_abbrev=False,
        description="Score a cryokern checkpoint on noisy/clean MRC pairs.")
    p.add_argument("model", metavar="MODEL", help="checkpoint (.npz) written by cryokern.train")
    add_files(p, "--noisy", required=True,
              help="noisy MRC files (several after one flag and repeated flags both add)")
    add_files(p, "--clean", required=True,
              help="clean references, paired in order with --noisy (same counts, shapes)")
    p.add_argument("--data-range", type=float, default=None, metavar="R",
                   help="PSNR and SSIM data range (default: each clean image's max - min)")
    p.add_argument("--json", metavar="FILE", help="write the scores as JSON ('-': stdout)")
    p.add_argument("--panel", metavar="PNG",
                   help="write a noisy | denoised | clean panel of the first images")
    p.add_argument("--panel-images", type=int, default=3, metavar="N",
                   help="images in the panel (default 3)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, metavar="SIZE",
                   help="denoise in tiles of about SIZE x SIZE pixels (0: whole images; "
                        "default: as denoise's, by the device's free memory); the scores do "
                        "not depend on it")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    return p


def panel_library():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--panel needs matplotlib: pip install 'cryokern[evaluate]'") from None
    return plt


def write_panel(path, rows):
    """rows: (title, noisy, denoised, clean); one display range per row, from the clean image's
    0.5 and 99.5 percentiles, so the three look alike where they agree."""
    plt = panel_library()
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4 * len(rows)), squeeze=False)
    for ax_row, (title, *images) in zip(axes, rows):
        lo, hi = np.percentile(images[2], [0.5, 99.5])
        for ax, image, name in zip(ax_row, images, ("noisy", "denoised", "clean")):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{title}: {name}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def evaluate(opts):
    structural_similarity()     # fail before any work if SSIM cannot be computed
    if opts.panel:
        panel_library()
    if len(opts.noisy) != len(opts.clean):
        raise DataError(f"--noisy names {len(opts.noisy)} files but --clean "
                        f"{len(opts.clean)}: they pair in order")
    refuse([(opts.data_range is not None
             and not (finite(opts.data_range) and opts.data_range > 0),
             f"--data-range {opts.data_range}: must be positive and finite"),
            (opts.tile is not None and opts.tile < 0,
             f"--tile {opts.tile}: must be at least 1 (or 0: whole images)"),
            (opts.panel and opts.panel_images < 1,
             f"--panel-images {opts.panel_images}: must be at least 1")])
    model = load_model(opts.model)
    images = PairedImages(list(zip(opts.noisy, opts.clean)))
    for noisy, _ in images.pairs:
        if min(noisy.shape) < SSIM_MIN_SIZE:
            raise DataError(f"{noisy.path}: images are {noisy.shape[0]}x{noisy.shape[1]}; SSIM's "
                            f"window needs at least {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE}")
    backend = get_backend(opts.device)
    denoiser = TiledDenoiser(model, backend, opts.tile)
    records, panel = [], []
    start = time.perf_counter()
    for index in tqdm(range(len(images)), unit="img", disable=None):
        (noisy_stack, clean_stack), local = images.locate(index)
        noisy = noisy_stack.read(local, np.empty(noisy_stack.shape, np.float32))
        clean = clean_stack.read(local, np.empty(clean_stack.shape, np.float32))
        denoised = denoiser.denoise(noisy)
        data_range = opts.data_range or float(clean.max()) - float(clean.min())
        records.append({"noisy_file": noisy_stack.path, "clean_file": clean_stack.path,
                        "image": local, "data_range": data_range,
                        "denoised": image_metrics(denoised, clean, data_range),
                        "noisy": image_metrics(noisy, clean, data_range)})
        if len(panel) < opts.panel_images and opts.panel:
            panel.append((f"{Path(noisy_stack.path).name}:{local}", noisy, denoised, clean))
    if opts.panel:
        write_panel(opts.panel, panel)
    return {"model": model.path, "network": model.network.describe(),
            "normalize": model.normalize, "backend": backend.name, "tile": opts.tile,
            "images": records, "seconds": time.perf_counter() - start,
            "data_range": opts.data_range if opts.data_range is not None
            else "per image: the clean image's max - min",
            "ssim": ssim_description(),
            "fit": "least-squares affine fit of each image to its clean image before psnr_fit "
                   "and ssim_fit (cryokern.metrics)",
            "highpass_sigma_px": HIGHPASS_SIGMA,
            "mean": {"denoised": mean_metrics([r["denoised"] for r in records]),
                     "noisy": mean_metrics([r["noisy"] for r in records])}}


def print_table(report, file=None):
    rows = [(f"{Path(r['noisy_file']).name}:{r['image']}", r["noisy"], r["denoised"])
            for r in report["images"]]
    rows.append(("mean", report["mean"]["noisy"], report["mean"]["denoised"]))
    for title, columns in (
            ("each score: noisy -> denoised, against the clean image",
             [n for n in NAMES if n not in FIT_NAMES or n == "pearson"]),
            ("after a least-squares affine fit to the clean image; r of images high-passed "
             f"(minus a Gaussian blur of sigma {report['highpass_sigma_px']:g} px)",
             [n for n in FIT_NAMES if n != "pearson"])):
        columns = [n for n in columns if n != "rmse"]
        print(title, file=file)
        print(f"{'image':<28}" + "".join(f"{n:>22}" for n in columns), file=file)
        for name, before, after in rows:
            print(f"{name[-28:]:<28}" + "".join(f"{fmt(before[n]) + ' -> ' + fmt(after[n]):>22}"
                                                for n in columns), file=file)


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")
    opts = build_parser().parse_args(argv)
    try:
        report = evaluate(opts)
    except (DataError, ImportError) as e:
        print(f"cryokern.evaluate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cryokern.evaluate: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    text = json.dumps(report, indent=1, allow_nan=False)
    if opts.json == "-":
        print(text)
    else:
        print_table(report)
        if opts.json:
            Path(opts.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
