"""python -m cryokern.train: train the denoiser on MRC stacks (or the built-in simulated data,
whose ground truth it then scores the network against).

Exit status: 0 done, 2 bad input (one line naming the file and the problem; nothing written
over), 3 the loss became NaN or Inf (the last good checkpoint is kept), 130 interrupted.
"""
import argparse
import itertools
import json
import math
import os
import resource
import sys
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint, distributed, loader_workers, precompile, synthetic
from .backends import DEVICE_HELP, DEVICES, get_backend, gpu_available
from .contract import DEFAULT_LEAKY_SLOPE
from .data import NORMALIZATIONS, BatchLoader, BatchSpec, PairedImages, Subset, epoch_batches, split
from .inference import Model
from .model import (DEFAULT_UNET_WIDTHS, N2NUNet, Network, UNet, init_params,
                    network_from_description)
from .mrcstack import DataError
from .options import add_files, finite, refuse
from .step import DEFAULT_PASS_BYTES, LOSS_GRAPHS, OptimizerConfig, TrainStep

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130
RUN_FILES = ("config.json", "metrics.jsonl", "last.npz", "best.npz", "loss.png")
# options a resumed run may change; any other option given with --resume must match the run's
RESUME_MAY_CHANGE = {"epochs", "device", "out", "resume", "force", "save_every", "pass_pixels",
                     "loader_threads", "loader_workers", "keep_epochs", "gpus"}
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
# Each architecture's optimizer is the one it was benchmarked with: the chain the Fortran
# original's SGD, the U-Net Adam (bench/quality.py's winner, bench/RESULTS.md 2026-12-01).
DEFAULT_OPTIMIZER = {"chain": "sgd", "unet": "adam", "n2n": "adam"}
DEFAULT_CHANNELS = "1,16,16,1"
DEFAULT_EPOCHS = 5
# The built-in simulated set (no data options): a U-Net small enough for a 2-core CPU, trained
# long enough to beat the chain's score against the ground truth (README).
DEMO_UNET_WIDTHS = (16, 16, 16)
DEMO_EPOCHS = 20
PLOT_EVERY_S = 5.0              # loss.png is drawn at most this often, and after the last epoch
VAL_KEPT_BYTES = 256 << 20      # a validation set up to this size stays on the device
WRITES_IN_FLIGHT = 2            # checkpoints queued on the writer thread at most
UNET_OPTIONS = ("unet_widths", "residual", "leaky_slope")


class Diverged(Exception):
    pass


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cryokern.train", allow_abbrev=False,
        description="Train the cryokern denoiser. With no data options it trains on a built-in "
                    "synthetic dataset.")
    d = p.add_argument_group("data")
    add_files(d, "--noisy", help="noisy MRC stacks; several after one flag and repeated flags "
                                 "both add (the k-th noisy file pairs with the k-th --clean "
                                 "file, in command-line order)")
    add_files(d, "--clean", help="clean (or second noisy, Noise2Noise) MRC stacks, paired in "
                                 "order with --noisy: same lengths and shapes")
    add_files(d, "--pairs", metavar="LIST",
              help="text files, one 'NOISY CLEAN' pair of paths per line (# comments; relative "
                   "paths are relative to the list); their pairs follow --noisy/--clean's")
    add_files(d, "--val-noisy", help="validation noisy stacks, paired in order with --val-clean")
    add_files(d, "--val-clean")
    d.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="hold out this fraction of the training images, chosen from the seed, "
                        "when no --val-noisy/--val-clean are given (default 0.1)")
    d.add_argument("--crop", type=int, default=0, metavar="SIZE",
                   help="train on random SIZE x SIZE crops (validation: centred crops)")
    d.add_argument("--loader-workers", type=int, default=None, metavar="N",
                   help="worker processes reading and normalizing images into shared "
                        "(page-locked) buffers, out of the training process's GIL (default: "
                        "one per core but two, at most 12, with the GPU backend (the cores "
                        "shared by the node's ranks); 0, the "
                        "reference's default, or --loader-threads given alone: threads of "
                        "the training process). The bits do not depend on it")
    d.add_argument("--loader-threads", type=int, default=0, metavar="N",
                   help="threads reading and normalizing images in the training process, "
                        "instead of worker processes (default 0: one per core but two, at most "
                        "12, where --loader-workers is 0)")
    d.add_argument("--normalize", choices=NORMALIZATIONS, default="per-image",
                   help="per-image: standardize each noisy image by its own mean and std and "
                        "apply the same affine map to its target (default)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training images (default {DEFAULT_EPOCHS}; "
                        f"{DEMO_EPOCHS} on the built-in simulated set)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                   help="default: adam for the U-Net, sgd (momentum 0.9) for the chain")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.01 for SGD, 0.001 for Adam)")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    t.add_argument("--nesterov", action="store_true")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                   help="Adam's moment decay rates (default 0.9 0.999)")
    t.add_argument("--eps", type=float, default=1e-8, help="Adam's epsilon (default 1e-8)")
    t.add_argument("--arch", choices=("chain", "unet", "n2n"), default=None,
                   help="unet: the U-Net of docs/numerics.md section 14, shaped by "
                        "--unet-widths, --residual, --leaky-slope (default; the chain where "
                        "--channels is given); chain: 3x3 convolutions with ReLU, shaped by "
                        "--channels (the CUDA Fortran original's network); n2n: the "
                        "Noise2Noise paper's U-Net (section 15: five poolings, 48 channels "
                        "down, 96 up), with --residual, --leaky-slope")
    t.add_argument("--channels", default=None,
                   help=f"the chain's channel counts, input to output (default "
                        f"{DEFAULT_CHANNELS}); implies --arch chain")
    t.add_argument("--unet-widths", default=None, metavar="W0,...,WL",
                   help="the U-Net's channels per level, full resolution first, the bottom "
                        "last: L = count - 1 poolings, image sides padded to multiples of 2^L "
                        f"(default {','.join(map(str, DEFAULT_UNET_WIDTHS))}: five poolings "
                        f"with 48 channels at every level; {','.join(map(str, DEMO_UNET_WIDTHS))} "
                        "on the built-in simulated set)")
    t.add_argument("--residual", action="store_true",
                   help="the U-Net predicts the difference to its input")
    t.add_argument("--leaky-slope", type=float, default=DEFAULT_LEAKY_SLOPE, metavar="S",
                   help="the U-Net's LeakyReLU slope for negative inputs (default 0.1)")
    t.add_argument("--init", choices=("pytorch", "he-normal"), default="pytorch")
    t.add_argument("--pass-pixels", type=int, metavar="N",
                   help="run each batch in passes of at most N pixels (whole images): less "
                        "device memory, a little slower, the same bits (default: as many as "
                        f"{DEFAULT_PASS_BYTES >> 30} GiB of activations hold, 8.1M pixels for "
                        "the chain 1,16,16,1, 0.67M for the 48-wide U-Net; at least one image)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    t.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this node, one process each, with the bits of one "
                        "(see README 'Many GPUs and nodes'; with --device cpu, N processes)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/YYYYmmdd-HHMMSS)")
    o.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also write DIR/last.npz every N steps")
    o.add_argument("--keep-epochs", type=int, default=0, metavar="K",
                   help="keep only the newest K epoch_NNNN.npz files (default 0: keep all)")
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
        raise DataError(f"--noisy names {len(opts.noisy)} files but --clean {len(opts.clean)}: "
                        "they pair in order")
    if len(opts.val_noisy) != len(opts.val_clean):
        raise DataError(f"--val-noisy names {len(opts.val_noisy)} files but --val-clean "
                        f"{len(opts.val_clean)}: they pair in order")
    train = list(zip(opts.noisy, opts.clean))
    # a run saved before --pairs took several lists holds one path, or None
    lists = [opts.pairs] if isinstance(opts.pairs, str) else opts.pairs or []
    for path in lists:
        train += read_pairs_list(path)
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


def uses_builtin_data(opts):
    return not (opts.noisy or opts.clean or opts.pairs or opts.val_noisy or opts.val_clean)


def resolve_defaults(opts):
    """Fill in the defaults that depend on other options (left None by the parser): the
    architecture (the chain where --channels is given, else the U-Net), its optimizer, and the
    built-in simulated set's smaller U-Net and longer training; the optimizer's learning rate."""
    demo = uses_builtin_data(opts)
    if opts.arch is None:
        opts.arch = "chain" if opts.channels is not None else "unet"
    if opts.channels is None:
        opts.channels = DEFAULT_CHANNELS
    if opts.unet_widths is None:
        opts.unet_widths = ",".join(map(str, DEMO_UNET_WIDTHS if demo else DEFAULT_UNET_WIDTHS))
    if opts.optimizer is None:
        opts.optimizer = DEFAULT_OPTIMIZER[opts.arch]
    if opts.lr is None:
        opts.lr = DEFAULT_LR[opts.optimizer]
    if opts.epochs is None:
        opts.epochs = DEMO_EPOCHS if demo else DEFAULT_EPOCHS
    return opts


def check_options(opts):
    """The options' problems as DataError; returns the network they describe."""
    resolve_defaults(opts)
    refuse([(opts.epochs < 1, f"--epochs {opts.epochs}: must be at least 1"),
            (opts.batch_size < 1, f"--batch-size {opts.batch_size}: must be at least 1"),
            (opts.crop != 0 and opts.crop < 3,
             f"--crop {opts.crop}: must be at least 3 (or 0: whole images)"),
            (not 0 <= opts.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (opts.lr is not None and not (finite(opts.lr) and opts.lr > 0),
             f"--lr {opts.lr}: must be positive and finite"),
            (not 0 <= opts.momentum < 1, f"--momentum {opts.momentum}: must be in [0, 1)"),
            (not all(0 <= b < 1 for b in opts.betas),
             f"--betas {' '.join(map(str, opts.betas))}: each must be in [0, 1)"),
            (not (finite(opts.eps) and opts.eps > 0), f"--eps {opts.eps}: must be positive "
                                                       "and finite"),
            (not (finite(opts.weight_decay) and opts.weight_decay >= 0),
             f"--weight-decay {opts.weight_decay}: must be finite and not negative"),
            (opts.nesterov and (opts.optimizer != "sgd" or opts.momentum == 0),
             "--nesterov needs --optimizer sgd and a --momentum above 0"),
            (opts.save_every < 0, "--save-every must be positive"),
            (opts.keep_epochs < 0, "--keep-epochs must be positive (0: keep all)"),
            (opts.pass_pixels is not None and opts.pass_pixels < 1,
             "--pass-pixels must be at least 1"),
            (opts.loader_threads < 0, "--loader-threads must be positive (0: automatic)"),
            (opts.loader_workers is not None and opts.loader_workers < 0,
             "--loader-workers must not be negative"),
            (opts.resume and opts.force, "--resume and --force exclude each other"),
            (opts.resume and not opts.out, "--resume needs --out DIR, the run to continue")])
    if opts.arch in ("unet", "n2n") and \
            not (finite(opts.leaky_slope) and opts.leaky_slope >= 0):
        raise DataError(f"--leaky-slope {opts.leaky_slope}: must be finite and not negative")
    if opts.arch == "n2n":
        return N2NUNet(residual=opts.residual, leaky_slope=opts.leaky_slope)
    if opts.arch == "unet":
        try:
            widths = tuple(int(c) for c in opts.unet_widths.split(","))
        except ValueError:
            widths = ()
        if len(widths) < 2 or min(widths) < 1:
            raise DataError(f"--unet-widths {opts.unet_widths!r}: give at least two positive "
                            "counts like 16,24,32 (full resolution first)")
        return UNet(widths, residual=opts.residual, leaky_slope=opts.leaky_slope)
    try:
        channels = tuple(int(c) for c in opts.channels.split(","))
        Network(channels)
    except ValueError:
        raise DataError(f"--channels {opts.channels!r}: give counts like 1,16,16,1") from None
    if channels[0] != 1 or channels[-1] != 1:
        raise DataError(f"--channels {opts.channels}: images have one channel in and out")
    return Network(channels)


def check_architecture_options(opts, explicit):
    """Options of one architecture given with --arch of the other: refused, not ignored."""
    if opts.arch == "unet" and "channels" in explicit:
        raise DataError("--channels shapes the chain; the U-Net takes --unet-widths")
    if opts.arch == "n2n":
        for given in ("channels", "unet_widths"):
            if given in explicit:
                raise DataError(f"--{given.replace('_', '-')} shapes another network; the "
                                "Noise2Noise U-Net (--arch n2n) is the paper's")
    given = [o for o in UNET_OPTIONS if o in explicit]
    if opts.arch == "chain" and given:
        flag = f"--{given[0].replace('_', '-')}"
        if "arch" in explicit:
            raise DataError(f"{flag} shapes the U-Net; give --arch unet")
        raise DataError(f"{flag} shapes the U-Net and --channels the chain: give one network's "
                        "options")


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


def optimizer_config(opts):
    return OptimizerConfig(opts.optimizer, opts.lr, momentum=opts.momentum
                           if opts.optimizer == "sgd" else 0.0,
                           weight_decay=opts.weight_decay, nesterov=opts.nesterov,
                           beta1=opts.betas[0], beta2=opts.betas[1], eps=opts.eps)


class Run:
    """One training run: the step, the data, the run directory and its checkpoints."""

    def __init__(self, opts, network, backend, train, val, description, resume_from=None,
                 comm=None):
        self.opts, self.backend, self.train, self.val = opts, backend, train, val
        # ranks (distributed.py): each reads and steps on its block of every batch, all hold
        # the same state; rank 0 alone writes files and prints
        self.comm = comm or distributed.Single()
        self.lead = self.comm.rank == 0
        self.out = Path(opts.out)
        self.description = description
        self.network = network
        optimizer = optimizer_config(opts)
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
                              pass_pixels=opts.pass_pixels, comm=self.comm)
        self.uploads = backend.uploads()
        self._host_buffers = {}
        workers = opts.loader_workers
        if workers is None:     # --loader-threads alone still means threads
            workers = loader_workers.default_workers(self.comm.local_size) \
                if backend.name == "gpu" and not opts.loader_threads else 0
        self.workers = loader_workers.WorkerPool(workers, pin=backend.name == "gpu") \
            if workers else None
        # per-epoch work kept small beside a short epoch (a few dozen images): epochs overlap
        # (an epoch's end is queued on the device behind its last step, and written while the
        # next epoch's first step runs: close_epoch, finish_epoch), one loader reads every
        # epoch in turn, checkpoints are encoded and written by a thread, loss.png is redrawn
        # at most every PLOT_EVERY_S, a small validation set is kept on the device
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._writing = deque()
        self._plotted_at, self._plotted_epoch = time.monotonic(), None   # first after PLOT_EVERY_S
        self._val_batches = None
        self._loader = self._batches = None
        self._loader_at = None          # (epoch, batch) the training loader gives next
        self._loader_end = None         # the epoch it stops before
        self._ending = None             # an epoch's end queued, not yet written

    def meta(self, step, position, partial):
        """A checkpoint's meta: the state after `step` steps, `position` the next batch."""
        return {"network": self.network.describe(),
                "optimizer": asdict(self.step.optimizer), "step": step,
                "epoch": position["epoch"], "position": position, "partial": partial,
                "best_mse": self.best, "seed": self.opts.seed, "normalize": self.opts.normalize,
                "crop": self.opts.crop, "options": vars(self.opts), "data": self.description}

    def save(self, *names):
        """The state now under every name (--save-every's last.npz). Every rank comes here (the
        meter's range is agreed); rank 0 writes."""
        self.agree_range(self.meter)
        self.save_snapshot(self.step.snapshot(), names,
                           self.meta(self.step.step, self.position, self.meter.to_json()))

    def save_snapshot(self, snapshot, names, meta, epoch=None):
        """A state (TrainStep.snapshot) under every name (one file, hard-linked:
        checkpoint.write), encoded and written on the writer thread while training goes on.
        Files appear in order (one thread); the writes beyond WRITES_IN_FLIGHT - 1 are
        finished first (a slow disk's fsync may take longer than an epoch), and their error (a
        full disk) is raised here. With `epoch` (its number, from 1), epoch files beyond
        --keep-epochs are deleted after the write."""
        params, state = snapshot.result()
        if not all(np.isfinite(a).all() for a in params.values()):
            raise Diverged(f"the weights became NaN or Inf at step {meta['step']}")
        if not self.lead:
            return
        self.finish_writing(keep=WRITES_IN_FLIGHT - 1)
        self._writing.append(self._writer.submit(self._write, [self.out / n for n in names],
                                                 params, state, meta, epoch))

    def _write(self, paths, params, state, meta, epoch):
        checkpoint.write(paths, checkpoint.encode(params, state, meta))
        keep = self.opts.keep_epochs
        if keep and epoch is not None:
            for path in self.out.glob("epoch_*.npz"):
                number = path.stem[len("epoch_"):]
                if number.isdigit() and int(number) <= epoch - keep:
                    path.unlink(missing_ok=True)

    def finish_writing(self, keep=0):
        """Wait for the checkpoints being written, oldest first, until `keep` are left; raise
        their error."""
        while len(self._writing) > keep:
            self._writing.popleft().result()

    def agree_range(self, meter):
        """The meter's target range over every rank's images (each rank saw its own)."""
        meter.lo, meter.hi = self.comm.minmax(meter.lo, meter.hi)

    def batch_images(self, subset, batch):
        """The number of images of batch `batch` of an epoch, over all ranks."""
        return min(self.opts.batch_size, len(subset) - batch * self.opts.batch_size)

    def my_block(self, spec):
        """This rank's images of a batch."""
        a, b = self.comm.block(len(spec.indices))
        return BatchSpec(spec.indices[a:b], spec.corners[a:b])

    def on_device(self, noisy, clean):
        """A batch block's device arrays (uploaded; an empty block stays as it is)."""
        return self.uploads.put(noisy, clean) if len(noisy) else (noisy, clean)

    def uploaded(self, noisy, *calls):
        """The uploads' bookkeeping calls, for a block that was uploaded."""
        if len(noisy):
            for call in calls:
                call()

    def loader(self, subset, specs, role, depth):
        """A loader over this rank's blocks of `specs` (batches), `depth` batches ahead, into
        host buffers of its own `role` (the training loader reads on while a validation
        pass streams)."""
        a, b = self.comm.block(self.opts.batch_size)
        shape = (max(1, b - a), 1) + subset.image_shape
        if (role, shape) not in self._host_buffers:
            empty = self.workers.empty if self.workers else self.backend.host_empty
            self._host_buffers[role, shape] = [tuple(empty(shape) for _ in "xy")
                                               for _ in range(depth + 1)]
        return BatchLoader(subset, (self.my_block(s) for s in specs), self.opts.normalize,
                           self._host_buffers[role, shape], self.opts.loader_threads or None,
                           self.workers)

    def training_specs(self, epoch, first, epochs):
        """The training batches of epochs epoch..epochs-1, from batch `first` of the first:
        drawn epoch by epoch as the loader's thread reaches them."""
        for e in range(epoch, epochs):
            yield from epoch_batches(self.train, self.opts.batch_size, self.opts.seed, e,
                                     shuffle=True)[first if e == epoch else 0:]

    def training_batches(self, epoch, first):
        """Epoch `epoch`'s batches from batch `first` on, from one loader that reads every
        epoch left in turn (made anew where a caller skips about, as bench/quality.py does)."""
        if self._loader_at != (epoch, first):
            self.close_loader()
            self._loader_end = max(self.opts.epochs, epoch + 1)
            specs = self.training_specs(epoch, first, self._loader_end)
            self._loader = self.loader(self.train, specs, "train", depth=3)
            self._batches = iter(self._loader)
        self._loader_at = (epoch + 1, 0) if epoch + 1 < self._loader_end else None
        batches = -(-len(self.train) // self.opts.batch_size)
        return itertools.islice(self._batches, batches - first)

    def close_loader(self):
        if self._loader is not None:
            self._loader.close()
            self._loader = self._batches = self._loader_at = None

    def train_epoch(self, epoch):
        """One epoch's steps, ended when its last step's loss is back (the epoch alone, as
        bench/quality.py runs it; run() overlaps epochs)."""
        last = self.queue_epoch(epoch)
        if last is not None:
            last()

    def queue_epoch(self, epoch):
        """Each batch's upload and step are queued before the previous step's loss is read,
        so the device always has the next step queued while the host waits or reads. The
        previous epoch's end (close_epoch) is written once this epoch's first step is queued.
        Returns a call that reads the last step's loss, or None if no step ran."""
        opts = self.opts
        first = self.position["batch"]
        bar = tqdm(total=len(self.train), initial=min(first * opts.batch_size, len(self.train)),
                   unit="img", desc=f"epoch {epoch + 1}/{opts.epochs}",
                   disable=None if self.lead else True, leave=False)
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
            for batch, (noisy, clean, lo, hi) in enumerate(self.training_batches(epoch, first),
                                                           first):
                images = self.batch_images(self.train, batch)
                pending, count = self.step.launch(*self.on_device(noisy, clean), images)
                self.uploaded(noisy, self.uploads.used)
                self.finish_epoch()         # the previous epoch's end, while this step runs
                if queued is not None:
                    account(*queued)
                queued = (pending, count, lo, hi, self.step.step, images)
                self.uploaded(noisy, self.uploads.copied)   # the loader may refill the block now
                if opts.save_every and self.step.step % opts.save_every == 0:
                    account(*queued)
                    queued = None
                    self.save("last.npz")
            self.finish_epoch()             # none ran (resumed at the epoch's end)
        finally:
            bar.close()                     # (the last step's update, after it, is dropped)
        return None if queued is None else lambda: account(*queued)

    def queue_validation(self):
        """The validation pass queued: [(pending sse, count, lo, hi)] per batch. Its first
        pass streams from the files (and keeps a set of up to VAL_KEPT_BYTES on the device);
        later passes read the kept batches, replayed from recordings where there are few."""
        if self._val_batches is not None:
            record = len(self._val_batches) <= LOSS_GRAPHS
            return [self.step.queue_loss(noisy, clean, images, record=record) + (lo, hi)
                    for noisy, clean, lo, hi, images in self._val_batches]
        keep = len(self.val) * 2 * 4 * math.prod(self.val.image_shape) <= VAL_KEPT_BYTES
        kept, queued = [], []
        loader = self.loader(self.val, epoch_batches(self.val, self.opts.batch_size,
                                                     self.opts.seed, 0, shuffle=False),
                             "val", depth=1)
        try:
            for batch, (noisy, clean, lo, hi) in enumerate(loader):
                images = self.batch_images(self.val, batch)
                pending, count = self.step.queue_loss(*self.on_device(noisy, clean), images)
                self.uploaded(noisy, self.uploads.used, self.uploads.copied)
                queued.append((pending, count, lo, hi))
                if keep:
                    kept.append(self.on_device_kept(noisy, clean) + (lo, hi, images))
        finally:
            loader.close()
        if keep:
            self._val_batches = kept
        return queued

    def on_device_kept(self, noisy, clean):
        if not len(noisy):
            return noisy.copy(), clean.copy()
        return self.backend.to_device(noisy), self.backend.to_device(clean)

    def close_epoch(self, epoch, last):
        """The epoch's last step's loss read (`last`, queue_epoch's: the epoch's time ends
        there, as the synchronous backends see it too), then its end queued behind it: the
        validation pass and the state's copy to the host. The run moves on to the next epoch;
        finish_epoch writes this one's end once the next epoch's first step is queued, while
        the device runs the validation and that step."""
        if last is not None:
            last()
        validation = self.queue_validation() if self.val is not None else None
        self._ending = EpochEnd(epoch, self.meter, self.step.step, self.step.snapshot(),
                                validation)
        self.position, self.meter = {"epoch": epoch + 1, "batch": 0}, LossMeter()

    def finish_epoch(self):
        """The queued epoch's end, if any: its losses read, its metrics line, its checkpoint
        (the epoch file, best.npz when it improved, last.npz), the plot when due, its line."""
        end, self._ending = self._ending, None
        if end is None:
            return
        record = {"epoch": end.epoch + 1, "step": end.step}
        self.agree_range(end.meter)
        record.update(end.meter.summary("train"))
        record["ranks"] = self.comm.size
        record["images_per_s"] = len(self.train) / end.meter.seconds
        if end.validation is not None:
            meter = LossMeter()
            for pending, count, lo, hi in end.validation:
                meter.add(pending.result(), count, lo, hi)
            self.agree_range(meter)
            record.update(meter.summary("val"))
        if not math.isfinite(record.get("val_mse", 0.0)):
            raise Diverged(f"the validation loss became {record['val_mse']} after epoch "
                           f"{end.epoch + 1}")
        record["peak_rss_mib"] = peak_rss_mib()
        score = record["val_mse"] if self.val is not None else record["train_mse"]
        if self.lead:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        improved = self.best is None or score < self.best
        if improved:
            self.best = score
        meta = self.meta(end.step, {"epoch": end.epoch + 1, "batch": 0}, LossMeter().to_json())
        self.save_snapshot(end.snapshot, [f"epoch_{end.epoch + 1:04d}.npz",
                                          *(["best.npz"] if improved else []), "last.npz"],
                           meta, epoch=end.epoch + 1)
        if time.monotonic() - self._plotted_at >= PLOT_EVERY_S:
            self.plot(end.epoch)
        if self.lead:
            val = f"  val mse {record['val_mse']:.6g} ({record['val_psnr']:.2f} dB)" \
                if "val_mse" in record else ""
            print(f"epoch {end.epoch + 1}/{self.opts.epochs}  train mse "
                  f"{record['train_mse']:.6g} ({record['train_psnr']:.2f} dB){val}  "
                  f"{record['images_per_s']:.1f} images/s", flush=True)
        return record

    def plot(self, epoch):
        if self.lead:
            plot_losses(self.out)
        self._plotted_at, self._plotted_epoch = time.monotonic(), epoch

    def run(self):
        try:
            for epoch in range(self.position["epoch"], self.opts.epochs):
                last = self.queue_epoch(epoch)
                self.close_epoch(epoch, last)
            self.finish_epoch()
            if self._plotted_epoch != self.opts.epochs - 1 and \
                    self.position["epoch"] == self.opts.epochs:
                self.plot(self.opts.epochs - 1)
        except (KeyboardInterrupt, DataError):
            if self.comm.size == 1:     # (ranks would wait in its collectives for the others)
                self.finish_epoch()     # a queued epoch's end is written before stopping
            raise
        finally:
            self.close_loader()
            self.finish_writing()
            self._writer.shutdown()
            if self.workers is not None:
                self._host_buffers.clear()
                self.workers.close()


@dataclass
class EpochEnd:
    """An epoch's end, queued on the device (Run.close_epoch), not yet written: its meter,
    the step count, the state's snapshot, the validation pass's losses on their way."""
    epoch: int
    meter: LossMeter
    step: int
    snapshot: object
    validation: list


def print_demo_scores(run):
    """What the demo is for: how close its validation images come to their ground truth, as
    the noisy input, and denoised by the network before and after training."""
    net, opts = run.network, run.opts
    models = {f"{when} training": Model(f"weights {when} training", net, params, opts.normalize)
              for when, params in (("before", init_params(net, opts.seed, opts.init)),
                                   ("after", run.step.host_params()))}
    scores = synthetic.truth_scores(models, run.backend)
    print(f"validation images against their ground truth (simulated; mean of {synthetic.VAL}; "
          "PSNR after a least-squares affine fit):")
    for name, (r, psnr) in scores.items():
        print(f"  {name:<16} Pearson r {r:.3f}   PSNR {psnr:.2f} dB")


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
    """The resumed run's options: the checkpoint's, with those a resume may change. `opts` as
    parsed: options newer than the run take their defaults before resolve_defaults (a run from
    before --arch, with its --channels, stays a chain)."""
    saved = argparse.Namespace(**meta["options"])
    for name, value in vars(opts).items():
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


def saved_network(out, meta):
    """The network a run's checkpoint meta describes."""
    try:
        return network_from_description(meta["network"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{Path(out) / 'last.npz'}: no usable network description "
                        f"({e})") from None


def start(opts, explicit, comm=None):
    """Every rank checks the options and reads the inputs; a problem any rank finds stops all
    (the same DataError on every rank) before rank 0 writes anything into the run directory."""
    comm = comm or distributed.Single()
    parsed = argparse.Namespace(**vars(opts))
    try:
        network = check_options(opts)
        resume_from = prepare_out(opts)
        if resume_from is not None:
            opts = resumed_options(parsed, explicit, resume_from[2])
            network = check_options(opts)
            if network != saved_network(opts.out, resume_from[2]):
                raise DataError(f"{opts.out}: the run's network is not the one the options "
                                "describe; leave the architecture options out")
        check_architecture_options(opts, explicit)      # a resumed run's own --arch
        compiling = start_compiling(opts, network)
        train, val, description = open_data(opts)
        if resume_from is not None and description != resume_from[2]["data"]:
            raise DataError(f"{opts.out}: the data differ from those the run was trained on")
        error = None
    except DataError as e:
        error = str(e)
    failed = [(rank, e) for rank, e in enumerate(comm.agree(error)) if e is not None]
    if failed:
        rank, message = failed[0]
        raise DataError(message if len(failed) == comm.size else f"(rank {rank}) {message}")
    backend = get_backend(opts.device)
    comm = comm.for_backend(backend)
    if comm.rank == 0:
        write_run_directory(opts, network, backend, description, resume_from)
        print(f"cryokern: training on {len(train)} images "
              f"({'x'.join(map(str, train.image_shape))})"
              f"{f', validating on {len(val)}' if val is not None else ''}; backend "
              f"{backend.name}{f' on {comm.size} ranks' if comm.size > 1 else ''}; "
              f"run directory {opts.out}", flush=True)
    compiling.wait()
    comm.barrier()
    return Run(opts, network, backend, train, val, description, resume_from, comm)


def write_run_directory(opts, network, backend, description, resume_from):
    """The run directory made (or cleared with --force, or its metrics cut back to the
    checkpoint resumed from) and config.json written."""
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
    config = dict(vars(opts), backend=backend.name, network=network.describe(),
                  data=description)
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")


def start_compiling(opts, network):
    """The network's GPU kernels (precompile.py) or the CPU backend's functions
    (cpu/precompile.py), compiling in worker processes while the data are opened; nothing to
    do for the reference."""
    if opts.device == "cpu" or (opts.device == "auto" and not gpu_available()):
        from .cpu import precompile as cpu_precompile
        return cpu_precompile.start(network, optimizer_config(opts))
    if opts.device == "reference" or not gpu_available():
        return precompile.Ready()
    return precompile.start(network, optimizer_config(opts))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.gpus != 1:
        return distributed.relaunch("cryokern.train", argv, opts.gpus)
    comm = distributed.world()
    if opts.out is None and not opts.resume:
        opts.out = comm.agree(time.strftime("runs/%Y%m%d-%H%M%S"))[0]
    agreed = True       # until training starts, every rank meets the same errors
    try:
        run = start(opts, explicit_options(parser, argv), comm)
        agreed = False  # from here a rank may fail alone (its own images): it stops them all
        run.run()
        if comm.rank == 0 and not (run.opts.noisy or run.opts.pairs):
            print_demo_scores(run)
    except DataError as e:
        return comm.stop(EXIT_BAD_INPUT, f"cryokern.train: error: {e}", agreed)
    except Diverged as e:   # the same bits on every rank: they all stop here
        return comm.stop(EXIT_DIVERGED, f"cryokern.train: stopped: {e}; the last good "
                                        f"checkpoint is kept in {opts.out}", agreed=True)
    except KeyboardInterrupt:
        return comm.stop(EXIT_INTERRUPTED, f"cryokern.train: interrupted; continue with "
                                           f"--resume --out {opts.out}", agreed)
    except Exception as e:
        if comm.size == 1:
            raise
        return comm.stop(1, f"cryokern.train: failed: {type(e).__name__}: {e}", agreed=False)
    if comm.rank == 0:
        print(f"done: checkpoints in {opts.out} (best.npz, last.npz); peak resident memory "
              f"{peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
