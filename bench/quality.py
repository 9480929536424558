"""Does the denoiser denoise? cryokern's networks beside a Gaussian filter and Topaz-Denoise, on
simulated micrographs with a true ground truth, each network trained for the same wall-clock
budget on one GPU.

Data: cryokern.simulate micrographs (--size² pixels of --pixel-size Å, 40 e-/Å²): --train of
them as Noise2Noise pairs (even -> odd half, and odd -> even), --test held out. Each method
denoises a test micrograph's even half and is scored against its ground truth (expected counts
of the half) by cryokern.metrics.fitted_metrics: Pearson r, PSNR and SSIM after a least-squares
affine fit of the output to the truth (the same fit for every method), and r of the images
high-passed by a 20 px Gaussian (particle-scale structure, not the ice). Means over the test
micrographs.

Methods:
- noisy: the even half itself.
- gaussian: the best Gaussian blur, its sigma chosen on the test set by mean r (an optimistic
  baseline: it is tuned on the answers).
- cryokern NET (--nets: chains like 1,16,16,1, U-Nets like unet:16,24,32,48,64[+residual] or
  n2n[+residual], the Noise2Noise paper's U-Net; bench/nets.py): trained through
  cryokern.train's own loop (train.Run: its loader, TrainStep,
  per-image normalization, train's options for the architecture, train's default optimizer or
  --optimizer's with its default learning rate) on whole micrographs, whole epochs until the
  budget is spent. The kernels are compiled first (on a GPU in background processes, each
  network's in parallel workers of cryokern.precompile, while the baselines and Topaz run, or
  before them with --compile-first; then one throwaway epoch in this process), outside the
  budget.
- topaz scratch: Topaz-Denoise's U-Net (UDenoiseNet(base_width=11, top_width=5), the
  architecture of its packaged 'unet') from a fresh PyTorch initialization, trained by topaz's
  own topaz.denoising.models.train_model with topaz's command-line defaults (Adagrad, lr 1e-3,
  L2, batch 4, crop 800, 10 % of the pairs held out for its validation, 16 loader workers,
  random flips, rotations and swaps of the pair), stopped at the budget (checked before each
  forward pass). One throwaway forward/backward warms PyTorch up outside the budget.
- topaz pretrained: topaz's packaged unet_L2_v0.2.2.sav, loaded with torch.load (its own
  loader needs pkg_resources).
Topaz's methods run when torch and topaz import (e.g. PYTHONPATH with a trimmed topaz-em);
they run on the GPU and are skipped otherwise.

Writes OUT/quality.json (settings, device, date, per-image and mean scores, training steps and
seconds), OUT/quality.png (noisy | each method | truth, a crop of the first test micrograph; each
output affinely fitted to the truth and shown on the truth's range, the noisy half on its own)
and prints a table.
Usage: python bench/quality.py [--budget-s 60] [--nets unet:48,48,48,48,48,48 1,16,16,1]
       [--optimizer adam] [--compile-first] [--out DIR]
"""
import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mrcfile
import numpy as np

from cryokern import train as T
from cryokern.backends import DEVICE_HELP, DEVICES, get_backend
from cryokern.data import PairedImages, Subset
from cryokern.inference import Model, TiledDenoiser
from cryokern.metrics import (FIT_NAMES, HIGHPASS_SIGMA, affine_fit, fitted_metrics, gaussian_blur,
                              mean_metrics, pearson)
from cryokern.simulate import Simulator
from nets import SPEC_HELP, parse_net

GAUSSIAN_SIGMAS = (0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16)
TOPAZ_DEFAULTS = {"loss_fn": "L2", "optim": "adagrad", "lr": 1e-3, "batch_size": 4,
                  "crop": 800, "holdout": 0.1, "num_workers": 16}
TOPAZ_PRETRAINED = "topaz/pretrained/denoise/unet_L2_v0.2.2.sav"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="training seconds for every trained method (default 60)")
    p.add_argument("--nets", nargs="+", type=parse_net,
                   default=[parse_net("unet:48,48,48,48,48,48"), parse_net("1,16,16,1")],
                   metavar="NET", help=f"cryokern networks: {SPEC_HELP} (default: train's "
                                       "default U-Net and the chain 1,16,16,1)")
    p.add_argument("--optimizer", choices=("sgd", "adam"),
                   help="cryokern's optimizer, with train's default learning rate for it "
                        "(default: train's for each network: Adam for U-Nets, SGD for chains)")
    p.add_argument("--compile-first", action="store_true",
                   help="on a GPU, compile cryokern's kernels before any method trains (else "
                        "while the baselines and Topaz run, sharing the CPU with Topaz's "
                        "loader)")
    p.add_argument("--train", type=int, default=40, help="training micrographs (default 40)")
    p.add_argument("--test", type=int, default=4, help="test micrographs (default 4)")
    p.add_argument("--size", type=int, default=1024, help="micrograph side in pixels")
    p.add_argument("--pixel-size", type=float, default=1.0, help="Å per pixel (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=0,
                   help="cryokern training crop (default 0: whole micrographs, as train)")
    p.add_argument("--topaz-crop", type=int, default=TOPAZ_DEFAULTS["crop"])
    p.add_argument("--no-topaz", action="store_true", help="skip Topaz even when it imports")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="cryokern's backend (" + DEVICE_HELP + ")")
    p.add_argument("--panel-crop", type=int, default=384, help="panel crop side in pixels")
    p.add_argument("--out", default="quality-out", help="output directory")
    return p


def train_options(opts, net, out):
    """cryokern.train's options for a network (a nets.NetSpec): its defaults, except the
    architecture, crop, seed and --optimizer."""
    argv = list(net.train_args) + ["--crop", str(opts.crop), "--seed", str(opts.seed),
                                   "--out", str(out)]
    if opts.optimizer:
        argv += ["--optimizer", opts.optimizer]
    return T.resolve_defaults(T.build_parser().parse_args(argv))


def simulate_one(seed, shape, pixel_size, index):
    return Simulator(seed, shape, pixel_size).micrograph(index)


def simulate(opts):
    shape = (opts.size, opts.size)
    count = opts.train + opts.test
    with ProcessPoolExecutor(min(count, os.cpu_count() or 1)) as pool:
        return list(pool.map(simulate_one, [opts.seed] * count, [shape] * count,
                             [opts.pixel_size] * count, range(count)))


def write_mrc(path, image, pixel_size):
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(image, np.float32))
        mrc.voxel_size = pixel_size


def write_halves(micrographs, directory, pixel_size):
    """even/NNN.mrc and odd/NNN.mrc: the layout topaz's make_paired_images_datasets reads."""
    dirs = {half: Path(directory) / half for half in ("even", "odd")}
    for d in dirs.values():
        d.mkdir(parents=True)
    names = []
    for i, m in enumerate(micrographs):
        names.append(f"{i:04d}.mrc")
        write_mrc(dirs["even"] / names[-1], m.even, pixel_size)
        write_mrc(dirs["odd"] / names[-1], m.odd, pixel_size)
    return dirs, names


def warm_up(net, opts_dict, image_shape, size):
    """Compile (and cache) every kernel a network's training and inference use: its step's
    kernels in parallel worker processes (cryokern.precompile), then one epoch of a throwaway
    run on random images of the training shape and one forward pass of a test micrograph's
    size. Run in a subprocess per network, so networks compile in parallel."""
    from cryokern import precompile
    quiet_numba()
    opts = argparse.Namespace(**opts_dict)
    precompile.start(net.network, T.optimizer_config(opts)).wait()
    backend = get_backend("gpu")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        images = rng.standard_normal((opts.batch_size,) + tuple(image_shape)).astype(np.float32)
        paths = [str(Path(d) / f"{k}.mrcs") for k in "ab"]
        for path in paths:
            with mrcfile.new(path) as mrc:
                mrc.set_data(images)
                mrc.set_image_stack()
        run = new_run(opts, net, backend, [tuple(paths)], crop=0)
        run.train_epoch(0)
        model = Model("warm-up", run.network, run.step.host_params(), opts.normalize)
        TiledDenoiser(model, backend).denoise(
            rng.standard_normal((size, size)).astype(np.float32))


def new_run(opts, net, backend, pairs, crop):
    images = PairedImages(pairs)
    subset = Subset(images, np.arange(len(images)), crop)
    return T.Run(opts, net.network, backend, subset, None, {"train": images.describe()})


def train_cryokern(opts, net, backend, pairs, budget):
    """(Model, record): whole epochs of train.Run's loop until `budget` seconds are spent,
    after one throwaway epoch (kernels loaded, buffers allocated) outside the budget."""
    options = train_options(opts, net, Path(opts.out) / "unused")
    start = time.perf_counter()
    new_run(options, net, backend, pairs, opts.crop).train_epoch(0)
    warm = time.perf_counter() - start
    run = new_run(options, net, backend, pairs, opts.crop)
    start = time.perf_counter()
    epoch, last_mse = 0, None
    while time.perf_counter() - start < budget:
        run.train_epoch(epoch)           # ends when its last step's loss is back
        last_mse = run.meter.mse
        epoch += 1
        run.position, run.meter = {"epoch": epoch, "batch": 0}, T.LossMeter()
    seconds = time.perf_counter() - start
    model = Model(net.name, run.network, run.step.host_params(), options.normalize)
    return model, {"train_s": seconds, "warm_up_s": warm, "steps": run.step.step,
                   "epochs": epoch, "images": epoch * len(run.train),
                   "images_per_s": epoch * len(run.train) / seconds,
                   "last_epoch_train_mse": last_mse,
                   "network": run.network.describe(), "parameters": run.network.param_count(),
                   "optimizer": {"kind": options.optimizer, "lr": options.lr,
                                 "momentum": options.momentum},
                   "batch_size": options.batch_size, "crop": opts.crop or "whole micrographs",
                   "normalize": options.normalize, "pairs": "even->odd and odd->even"}


def import_topaz():
    """(torch, topaz's models and datasets modules, the pretrained weights' path) or a reason."""
    try:
        import torch
        from topaz.denoising import datasets, models
    except ImportError as e:
        return None, f"not importable ({e})"
    if not torch.cuda.is_available():
        return None, "torch finds no GPU"
    root = Path(models.__file__).resolve().parents[2]
    return (torch, models, datasets, root / TOPAZ_PRETRAINED), None


class BudgetSpent(Exception):
    pass


def train_topaz(topaz, dirs, budget, seed, crop):
    """(model, record): topaz's train_model on the even/odd directories from scratch, stopped
    by a forward pre-hook once `budget` seconds have passed since it was called."""
    torch, models, datasets, _ = topaz
    torch.manual_seed(seed)
    np.random.seed(seed)
    throwaway = models.UDenoiseNet(base_width=11, top_width=5).cuda()
    x = torch.randn(TOPAZ_DEFAULTS["batch_size"], 1, crop, crop, device="cuda")
    t = time.perf_counter()
    ((throwaway(x) - x) ** 2).mean().backward()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    del throwaway, x
    torch.cuda.empty_cache()
    train, val = datasets.make_paired_images_datasets(
        str(dirs["even"]), str(dirs["odd"]), crop=crop, random=np.random,
        holdout=TOPAZ_DEFAULTS["holdout"])
    model = models.UDenoiseNet(base_width=11, top_width=5).cuda()
    steps = [0]
    start = time.perf_counter()

    def check(module, inputs):
        if module.training:
            if time.perf_counter() - start >= budget:
                raise BudgetSpent
            steps[0] += 1
    hook = model.register_forward_pre_hook(check)
    try:
        models.train_model(model, train, val, loss_fn=TOPAZ_DEFAULTS["loss_fn"],
                           optim=TOPAZ_DEFAULTS["optim"], lr=TOPAZ_DEFAULTS["lr"],
                           batch_size=TOPAZ_DEFAULTS["batch_size"], num_epochs=10 ** 6,
                           shuffle=True, use_cuda=True,
                           num_workers=TOPAZ_DEFAULTS["num_workers"], verbose=False)
    except BudgetSpent:
        pass
    finally:
        hook.remove()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return model, {"train_s": seconds, "warm_up_s": warm, "steps": steps[0],
                   "train_pairs": len(train), "val_pairs": len(val),
                   "settings": dict(TOPAZ_DEFAULTS, crop=crop, init="PyTorch default",
                                    arch="UDenoiseNet(base_width=11, top_width=5)")}


def topaz_pretrained(topaz):
    torch, models, _, path = topaz
    model = models.UDenoiseNet(base_width=11, top_width=5)
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    model.load_state_dict(state.state_dict() if isinstance(state, torch.nn.Module) else state)
    return model.cuda(), {"weights": path.name}


def topaz_denoiser(torch, model):
    """A micrograph through a topaz model as topaz.denoise.Denoise._denoise does it (whole
    image: topaz's default patch of 1024 + padding 500 covers it): standardized by its mean
    and std, the network, mapped back."""
    @torch.no_grad()
    def denoise(image):
        model.eval()
        x = torch.from_numpy(np.ascontiguousarray(image, np.float32)).cuda()
        mu, std = x.mean(), x.std()
        y = model(((x - mu) / std)[None, None]).squeeze()
        return (y * std + mu).cpu().numpy()
    return denoise


def score(outputs, test):
    """Per-image fitted_metrics and their means."""
    images = [fitted_metrics(out, m.truth) for out, m in zip(outputs, test)]
    return {"mean": mean_metrics(images, FIT_NAMES), "images": images}


def best_gaussian(test):
    """The sigma (from GAUSSIAN_SIGMAS) whose blur of the noisy halves has the best mean r."""
    def mean_r(sigma):
        return np.mean([pearson(gaussian_blur(m.even, sigma), m.truth.astype(np.float64))
                        for m in test])
    rs = {sigma: float(mean_r(sigma)) for sigma in GAUSSIAN_SIGMAS}
    best = max(rs, key=rs.get)
    return best, rs


def device_name(backend_name):
    if backend_name != "gpu":
        import platform
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    from numba import cuda
    name = getattr(cuda.get_current_device(), "name", "numba's CUDA simulator")
    return name.decode() if isinstance(name, bytes) else name


def write_panel(path, test, outputs, crop):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = test[0]
    h, w = m.truth.shape
    c = min(crop, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    window = (slice(y0, y0 + c), slice(x0, x0 + c))
    panels = [("noisy (even half; own range)", m.even)]
    panels += [(name, affine_fit(images[0], m.truth)) for name, images in outputs.items()
               if name != "noisy"]
    panels.append(("ground truth", m.truth))
    truth_range = np.percentile(m.truth[window], [0.5, 99.5])
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for k, (ax, (name, image)) in enumerate(zip(np.atleast_1d(axes), panels)):
        lo, hi = np.percentile(m.even[window], [0.5, 99.5]) if k == 0 else truth_range
        ax.imshow(image[window], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=128)
    plt.close(fig)


def print_table(report, file=None):
    print(f"{report['device']}, {report['date']}: {report['settings']['train']} training and "
          f"{report['settings']['test']} test micrographs of {report['settings']['size']}² px; "
          f"training budget {report['settings']['budget_s']:g} s per trained method "
          "(compile/warm-up excluded)", file=file)
    print(f"{'method':<40}{'train s':>9}{'steps':>8}{'r':>8}{'PSNR dB':>9}{'SSIM':>8}"
          f"{'r hp':>8}", file=file)
    for name, m in report["methods"].items():
        if "error" in m:
            print(f"{name:<40}  failed: {m['error'].splitlines()[-1]}", file=file)
            continue
        s, t = m["scores"]["mean"], m.get("training", {})
        train_s = f"{t['train_s']:.1f}" if "train_s" in t else "-"
        steps = str(t["steps"]) if "steps" in t else "-"
        print(f"{name:<40}{train_s:>9}{steps:>8}{s['pearson']:>8.3f}{s['psnr_fit']:>9.2f}"
              f"{s['ssim_fit']:>8.3f}{s['pearson_highpass']:>8.3f}", file=file)
    for note in report["notes"]:
        print(f"note: {note}", file=file)


def quiet_numba():
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")


def main(argv=None):
    quiet_numba()
    opts = build_parser().parse_args(argv)
    nets = opts.nets
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = get_backend(opts.device)
    topaz, why_not = (None, "--no-topaz") if opts.no_topaz else import_topaz()
    image_shape = (opts.crop, opts.crop) if opts.crop else (opts.size, opts.size)
    warmers = []
    if backend.name == "gpu":      # compile every network's kernels in parallel, meanwhile
        spawn = multiprocessing.get_context("spawn")
        for net in nets:
            options = vars(train_options(opts, net, out / "unused"))
            warmers.append(spawn.Process(target=warm_up, args=(net, options, image_shape,
                                                               opts.size)))
            warmers[-1].start()
    t = time.perf_counter()
    if opts.compile_first:
        for warmer in warmers:
            warmer.join()
    compile_first_s = time.perf_counter() - t
    t = time.perf_counter()
    micrographs = simulate(opts)
    simulate_s = time.perf_counter() - t
    train_set, test = micrographs[:opts.train], micrographs[opts.train:]
    report = {"device": device_name(backend.name),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "settings": {"train": opts.train, "test": opts.test, "size": opts.size,
                           "pixel_size_A": opts.pixel_size, "seed": opts.seed,
                           "budget_s": opts.budget_s, "nets": [n.spec for n in nets],
                           "cryokern_optimizer": opts.optimizer or "train's default",
                           "simulator": Simulator(
                               opts.seed, (opts.size, opts.size), opts.pixel_size).describe(),
                           "simulate_s": simulate_s, "input": "each test micrograph's even half",
                           "truth": "its expected counts",
                           "scores": "cryokern.metrics.fitted_metrics (affine fit to the truth)",
                           "highpass_sigma_px": HIGHPASS_SIGMA},
              "methods": {}, "notes": []}
    outputs = {"noisy": [m.even for m in test]}

    def record(name, images, extra):
        outputs[name] = images
        report["methods"][name] = dict(extra, scores=score(images, test))
        (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"  {name}: r {report['methods'][name]['scores']['mean']['pearson']:.3f}",
              flush=True)

    def attempt(name, work):
        try:
            work()
        except Exception:
            report["methods"][name] = {"error": traceback.format_exc()}
            print(f"  {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)

    record("noisy", outputs["noisy"], {})
    sigma, rs = best_gaussian(test)
    record(f"gaussian (sigma {sigma:g} px, best on test)",
           [gaussian_blur(m.even, sigma) for m in test],
           {"sigma_px": sigma, "mean_r_by_sigma": rs})
    with tempfile.TemporaryDirectory(prefix="cryokern-quality-") as work:
        dirs, names = write_halves(train_set, work, opts.pixel_size)
        if topaz is None:
            report["notes"].append(f"Topaz skipped: {why_not}")
        else:
            torch = topaz[0]

            def pretrained():
                model, extra = topaz_pretrained(topaz)
                denoise = topaz_denoiser(torch, model)
                record("topaz pretrained (unet_L2_v0.2.2)", [denoise(m.even) for m in test],
                       extra)

            def scratch():
                model, extra = train_topaz(topaz, dirs, opts.budget_s, opts.seed,
                                           opts.topaz_crop)
                denoise = topaz_denoiser(torch, model)
                record("topaz U-Net, scratch", [denoise(m.even) for m in test],
                       {"training": extra})
            report["notes"].append(f"Topaz: torch {torch.__version__} with its defaults "
                                   f"(cuDNN TF32 convolutions allowed: "
                                   f"{torch.backends.cudnn.allow_tf32})")
            attempt("topaz pretrained (unet_L2_v0.2.2)", pretrained)
            attempt("topaz U-Net, scratch", scratch)
        t = time.perf_counter()
        for warmer in warmers:
            warmer.join()
        if warmers:
            when = (f"before any method trained, {compile_first_s:.0f} s" if opts.compile_first
                    else f"while the steps above ran; waited {time.perf_counter() - t:.0f} s "
                         "more for them")
            report["notes"].append(f"cryokern kernels compiled in {len(warmers)} background "
                                   f"processes ({when}; exit codes "
                                   f"{[w.exitcode for w in warmers]})")
        pairs = [(str(dirs["even"] / n), str(dirs["odd"] / n)) for n in names] + \
                [(str(dirs["odd"] / n), str(dirs["even"] / n)) for n in names]
        for net in nets:
            name = net.name

            def cryokern_net():
                model, extra = train_cryokern(opts, net, backend, pairs, opts.budget_s)
                denoiser = TiledDenoiser(model, backend)
                record(name, [denoiser.denoise(m.even) for m in test], {"training": extra})
            attempt(name, cryokern_net)
    report["notes"].append(
        "every trained method had the same wall-clock budget on one device; compile and "
        "warm-up outside it; the Gaussian's sigma was chosen on the test set")
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    write_panel(out / "quality.png", test, outputs, opts.panel_crop)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
