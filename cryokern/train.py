"""python -m cryokern.train: train the denoiser on MRC stacks (or the built-in synthetic data).

Exit status: 0 done, 2 bad input (one line naming the file and the problem; nothing written
over), 3 the loss became NaN or Inf (the last good checkpoint is kept), 130 interrupted.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint, synthetic
from .backends import DEVICE_HELP, DEVICES, get_backend
from .data import NORMALIZATIONS, BatchLoader, PairedImages, Subset, epoch_batches, split
from .model import Network, init_params
from .mrcstack import DataError
from .step import DEFAULT_PASS_PIXELS, OptimizerConfig, TrainStep

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
RUN_FILES = ("config.json", "metrics.jsonl", "last.npz", "best.npz", "loss.png")
# options a resumed run may change; any other option given with --resume must match the run's
RESUME_MAY_CHANGE = {"epochs", "device", "out", "resume", "force", "save_every", "pass_pixels",
                     "loader_threads"}
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}


class Diverged(Exception):
    pass


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cryokern.train", allow_abbrev=False,
        description="Train the cryokern denoiser. With no data options it trains on a built-in "
                    "synthetic dataset.")
    d = p.add_argument_group("data")
    d.add_argument("--noisy", action="append", default=[], metavar="FILE",
                   help="noisy MRC stack (repeatable; paired in order with --clean)")
    d.add_argument("--clean", action="append", default=[], metavar="FILE",
                   help="clean (or second noisy, Noise2Noise) MRC stack, same length and shape")
    d.add_argument("--pairs", metavar="LIST",
                   help="text file, one 'NOISY CLEAN' pair of paths per line (# comments; "
                        "relative paths are relative to the list)")
    d.add_argument("--val-noisy", action="append", default=[], metavar="FILE")
    d.add_argument("--val-clean", action="append", default=[], metavar="FILE")
    d.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="hold out this fraction of the training images, chosen from the seed, "
                        "when no --val-noisy/--val-clean are given (default 0.1)")
    d.add_argument("--crop", type=int, default=0, metavar="SIZE",
                   help="train on random SIZE x SIZE crops (validation: centred crops)")
    d.add_argument("--loader-threads", type=int, default=0, metavar="N",
                   help="threads reading and normalizing images (default 0: one per core "
                        "but two, at most 12)")
    d.add_argument("--normalize", choices=NORMALIZATIONS, default="per-image",
                   help="per-image: standardize each noisy image by its own mean and std and "
                        "apply the same affine map to its target (default)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.01 for SGD, 0.001 for Adam)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--nesterov", action="store_true")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--channels", default="1,16,16,1",
                   help="channel counts, input to output (default 1,16,16,1)")
    t.add_argument("--init", choices=("pytorch", "he-normal"), default="pytorch")
    t.add_argument("--pass-pixels", type=int, default=DEFAULT_PASS_PIXELS, metavar="N",
                   help="run each batch in passes of at most N pixels (whole images): less "
                        "device memory, a little slower, the same bits (default 8388608)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/YYYYmmdd-HHMMSS)")
    o.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also write DIR/last.npz every N steps")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint")
    o.add_argument("--force", action="store_true",
                   help="start over in an --out that holds an earlier run")
    return p


def explicit_options(parser, argv):
    """The destinations of the options the command line names (not left to defaults)."""
    names = set()
    for token in argv:
        action = parser._option_string_actions.get(token.split("=", 1)[0])
        if action is not None:
            names.add(action.dest)
    return names


def read_pairs_list(path):
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read the pairs list ({e.strerror})") from None
    base = Path(path).parent
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{path}: line {number}: expected 'NOISY CLEAN', got {line!r}")
        pairs.append(tuple(str(base / f) for f in fields))
    if not pairs:
        raise DataError(f"{path}: the pairs list names no files")
    return pairs


def data_pairs(opts):
    """(training pairs, validation pairs) of paths from the options; the synthetic set if none."""
    if len(opts.noisy) != len(opts.clean):
        raise DataError(f"--noisy given {len(opts.noisy)} times but --clean {len(opts.clean)} "
                        "times: they pair in order")
    if len(opts.val_noisy) != len(opts.val_clean):
        raise DataError("--val-noisy and --val-clean must be given the same number of times")
    train = list(zip(opts.noisy, opts.clean)) + (read_pairs_list(opts.pairs) if opts.pairs else [])
    val = list(zip(opts.val_noisy, opts.val_clean))
    if not train:
        if val:
            raise DataError("validation stacks given without training stacks (--noisy/--clean)")
        files = synthetic.dataset()
        train, val = [tuple(map(str, files["train"]))], [tuple(map(str, files["val"]))]
    return train, val


def open_data(opts):
    """(train Subset, validation Subset or None, description for the checkpoint)."""
    train_pairs, val_pairs = data_pairs(opts)
    images = PairedImages(train_pairs)
    description = {"train": images.describe()}
    if val_pairs:
        val_images = PairedImages(val_pairs)
        description["val"] = val_images.describe()
        train = Subset(images, np.arange(len(images)), opts.crop)
        val = Subset(val_images, np.arange(len(val_images)), opts.crop)
        return train, val, description
    train_idx, val_idx = split(images, opts.val_fraction, opts.seed)
    description["val_indices"] = val_idx.tolist()
    train = Subset(images, train_idx, opts.crop)
    val = Subset(images, val_idx, opts.crop) if len(val_idx) else None
    return train, val, description


def check_options(opts):
    problems = [(opts.epochs < 1, "--epochs must be at least 1"),
                (opts.batch_size < 1, "--batch-size must be at least 1"),
                (opts.crop < 0, "--crop must be positive"),
                (not 0 <= opts.val_fraction < 1, "--val-fraction must be in [0, 1)"),
                (opts.save_every < 0, "--save-every must be positive"),
                (opts.pass_pixels < 1, "--pass-pixels must be at least 1"),
                (opts.loader_threads < 0, "--loader-threads must be positive (0: automatic)"),
                (opts.resume and opts.force, "--resume and --force exclude each other"),
                (opts.resume and not opts.out, "--resume needs --out DIR, the run to continue")]
    for bad, message in problems:
        if bad:
            raise DataError(message)
    try:
        channels = tuple(int(c) for c in opts.channels.split(","))
        Network(channels)
    except ValueError:
        raise DataError(f"--channels {opts.channels!r}: give counts like 1,16,16,1") from None
    if channels[0] != 1 or channels[-1] != 1:
        raise DataError(f"--channels {opts.channels}: images have one channel in and out")
    return channels


@dataclass
class LossMeter:
    """Exact loss accounting: float64 sum of squared errors and pixel count over a pass, and
    the clean targets' range (for PSNR). The MSE is sse / count whatever the batch sizes."""
    sse: float = 0.0
    count: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    seconds: float = 0.0

    def add(self, sse, count, lo, hi):
        self.sse += sse
        self.count += count
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    @property
    def mse(self):
        return self.sse / self.count if self.count else math.nan

    def summary(self, prefix):
        mse = self.mse
        peak = self.hi - self.lo
        psnr = 10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else math.nan
        return {f"{prefix}_mse": mse, f"{prefix}_rmse": math.sqrt(mse), f"{prefix}_psnr": psnr}

    def to_json(self):
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d):
        return cls(d["sse"], d["count"], math.inf if d["lo"] is None else d["lo"],
                   -math.inf if d["hi"] is None else d["hi"], d["seconds"])


class Run:
    """One training run: the step, the data, the run directory and its checkpoints."""

    def __init__(self, opts, channels, backend, train, val, description, resume_from=None):
        self.opts, self.backend, self.train, self.val = opts, backend, train, val
        self.out = Path(opts.out)
        self.description = description
        self.network = Network(channels)
        optimizer = OptimizerConfig(opts.optimizer, opts.lr, momentum=opts.momentum
                                    if opts.optimizer == "sgd" else 0.0,
                                    weight_decay=opts.weight_decay, nesterov=opts.nesterov)
        self.position = {"epoch": 0, "batch": 0}
        self.meter = LossMeter()
        self.best = None
        if resume_from is None:
            params, state, step = init_params(self.network, opts.seed, opts.init), None, 0
        else:
            params, state, meta = resume_from
            step, self.position, self.best = meta["step"], meta["position"], meta["best_mse"]
            self.meter = LossMeter.from_json(meta["partial"])
        self.step = TrainStep(backend, self.network, params, optimizer, state, step,
                              pass_pixels=opts.pass_pixels)
        self.uploads = backend.uploads()
        self._host_buffers = {}

    def save(self, name):
        meta = {"network": {"channels": list(self.network.channels)},
                "optimizer": asdict(self.step.optimizer), "step": self.step.step,
                "epoch": self.position["epoch"], "position": self.position,
                "partial": self.meter.to_json(), "best_mse": self.best, "seed": self.opts.seed,
                "normalize": self.opts.normalize, "crop": self.opts.crop,
                "options": vars(self.opts), "data": self.description}
        params = self.step.host_params()
        if not all(np.isfinite(a).all() for a in params.values()):
            raise Diverged(f"the weights became NaN or Inf at step {self.step.step}")
        checkpoint.save(self.out / name, params, self.step.host_state(), meta)

    def batches(self, subset, epoch, first, shuffle, depth=3):
        """A loader over the epoch's batches from batch `first` on, `depth` batches ahead."""
        shape = (self.opts.batch_size, 1) + subset.image_shape
        if shape not in self._host_buffers:
            self._host_buffers[shape] = [tuple(self.backend.host_empty(shape) for _ in "xy")
                                         for _ in range(depth + 1)]
        specs = epoch_batches(subset, self.opts.batch_size, self.opts.seed, epoch, shuffle)
        return BatchLoader(subset, specs[first:], self.opts.normalize, self._host_buffers[shape],
                           self.opts.loader_threads or None)

    def train_epoch(self, epoch):
        """Each batch's upload and step are queued before the previous step's loss is read,
        so the device always has the next step queued while the host waits or reads."""
        opts = self.opts
        done = self.position["batch"] * opts.batch_size
        bar = tqdm(total=len(self.train), initial=min(done, len(self.train)), unit="img",
                   desc=f"epoch {epoch + 1}/{opts.epochs}", disable=None, leave=False)
        loader = self.batches(self.train, epoch, self.position["batch"], shuffle=True)
        start = time.perf_counter() - self.meter.seconds
        queued = None

        def account(pending, count, lo, hi, step, images):
            sse = pending.result()
            if not math.isfinite(sse):
                raise Diverged(f"the loss became {sse} at epoch {epoch + 1}, step {step}")
            self.meter.add(sse, count, lo, hi)
            self.meter.seconds = time.perf_counter() - start
            self.position = {"epoch": epoch, "batch": self.position["batch"] + 1}
            bar.update(images)
            bar.set_postfix(mse=f"{self.meter.mse:.4g}")

        try:
            for noisy, clean, lo, hi in loader:
                pending, count = self.step.launch(*self.uploads.put(noisy, clean))
                self.uploads.used()
                if queued is not None:
                    account(*queued)
                queued = (pending, count, lo, hi, self.step.step, len(noisy))
                self.uploads.copied()            # the loader may refill noisy and clean now
                if opts.save_every and self.step.step % opts.save_every == 0:
                    account(*queued)
                    queued = None
                    self.save("last.npz")
            if queued is not None:
                account(*queued)
        finally:
            loader.close()
            bar.close()

    def validate(self):
        meter = LossMeter()
        loader = self.batches(self.val, 0, 0, shuffle=False)
        try:
            for noisy, clean, lo, hi in loader:
                sse, count = self.step.loss(*self.uploads.put(noisy, clean))
                self.uploads.used()
                self.uploads.copied()
                meter.add(sse, count, lo, hi)
        finally:
            loader.close()
        return meter

    def end_epoch(self, epoch):
        record = {"epoch": epoch + 1, "step": self.step.step}
        record.update(self.meter.summary("train"))
        record["images_per_s"] = len(self.train) / self.meter.seconds
        if self.val is not None:
            record.update(self.validate().summary("val"))
        if not math.isfinite(record.get("val_mse", 0.0)):
            raise Diverged(f"the validation loss became {record['val_mse']} after epoch {epoch + 1}")
        record["peak_rss_mib"] = peak_rss_mib()
        score = record["val_mse"] if self.val is not None else record["train_mse"]
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.position, self.meter = {"epoch": epoch + 1, "batch": 0}, LossMeter()
        improved = self.best is None or score < self.best
        if improved:
            self.best = score
        self.save(f"epoch_{epoch + 1:04d}.npz")
        if improved:
            self.save("best.npz")
        self.save("last.npz")
        plot_losses(self.out)
        return record

    def run(self):
        for epoch in range(self.position["epoch"], self.opts.epochs):
            self.train_epoch(epoch)
            record = self.end_epoch(epoch)
            val = f"  val mse {record['val_mse']:.6g} ({record['val_psnr']:.2f} dB)" \
                if "val_mse" in record else ""
            print(f"epoch {epoch + 1}/{self.opts.epochs}  train mse {record['train_mse']:.6g} "
                  f"({record['train_psnr']:.2f} dB){val}  {record['images_per_s']:.1f} images/s",
                  flush=True)


def peak_rss_mib():
    """This process's peak resident memory. Linux's VmHWM, not getrusage's ru_maxrss: after
    fork and exec, ru_maxrss starts from the parent's peak, which says nothing about us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_losses(out):
    """loss.png from metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [r["epoch"] for r in records]
    ax.plot(epochs, [r["train_mse"] for r in records], "o-", label="train")
    if "val_mse" in records[0]:
        ax.plot(epochs, [r["val_mse"] for r in records], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel="MSE", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def prepare_out(opts):
    """The run directory: new, or resumed, or started over with --force; never clobbered."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out exists and is not a directory")
    earlier = out.is_dir() and any((out / f).exists() for f in ("config.json", "last.npz"))
    if opts.resume:
        if not (out / "last.npz").exists():
            raise DataError(f"{out}: no last.npz to resume from")
        try:
            return checkpoint.load(out / "last.npz")
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{out / 'last.npz'}: cannot read the checkpoint ({e})") from None
    if earlier and not opts.force:
        raise DataError(f"{out}: holds an earlier run; give --resume to continue it or --force "
                        "to start over")
    return None


def resumed_options(opts, explicit, meta):
    """The resumed run's options: the checkpoint's, with those a resume may change."""
    saved = argparse.Namespace(**meta["options"])
    for name, value in vars(opts).items():      # options newer than the run: their defaults
        if not hasattr(saved, name):
            setattr(saved, name, value)
    for name in explicit - RESUME_MAY_CHANGE:
        if getattr(opts, name) != getattr(saved, name):
            raise DataError(f"--{name.replace('_', '-')} {getattr(opts, name)} differs from the "
                            f"run being resumed ({getattr(saved, name)}); leave it out")
    for name in explicit & RESUME_MAY_CHANGE:
        setattr(saved, name, getattr(opts, name))
    saved.resume, saved.force = True, False
    return saved


def start(opts, explicit):
    channels = check_options(opts)
    resume_from = prepare_out(opts)
    if resume_from is not None:
        opts = resumed_options(opts, explicit, resume_from[2])
        channels = check_options(opts)
    if opts.lr is None:
        opts.lr = DEFAULT_LR[opts.optimizer]
    train, val, description = open_data(opts)
    if resume_from is not None and description != resume_from[2]["data"]:
        raise DataError(f"{opts.out}: the data differ from those the run was trained on")
    backend = get_backend(opts.device)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.force:
        for f in list(RUN_FILES) + [p.name for p in out.glob("epoch_*.npz")]:
            (out / f).unlink(missing_ok=True)
    if resume_from is not None:
        keep = resume_from[2]["position"]["epoch"]
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            lines = [l for l in metrics.read_text().splitlines() if json.loads(l)["epoch"] <= keep]
            metrics.write_text("".join(l + "\n" for l in lines))
    config = dict(vars(opts), backend=backend.name, channels_resolved=list(channels),
                  data=description)
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    print(f"cryokern: training on {len(train)} images ({'x'.join(map(str, train.image_shape))})"
          f"{f', validating on {len(val)}' if val is not None else ''}; backend {backend.name}; "
          f"run directory {out}", flush=True)
    return Run(opts, channels, backend, train, val, description, resume_from)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.out is None and not opts.resume:
        opts.out = time.strftime("runs/%Y%m%d-%H%M%S")
    try:
        run = start(opts, explicit_options(parser, argv))
        run.run()
    except DataError as e:
        print(f"cryokern.train: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        print(f"cryokern.train: stopped: {e}; the last good checkpoint is kept in {opts.out}",
              file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"cryokern.train: interrupted; continue with --resume --out {opts.out}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: checkpoints in {opts.out} (best.npz, last.npz); peak resident memory "
          f"{peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
