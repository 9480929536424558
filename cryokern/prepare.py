"""python -m cryokern.prepare: training pairs cut from micrographs, as MRC stacks and a manifest.

Sources (every image of every input file is one micrograph):
  --clean FILE...               clean micrographs; the noisy side gets synthetic noise (--noise)
  --noisy FILE... --clean FILE...  recorded pairs, cut alike
  --even FILE... --odd FILE...  even/odd frame sums of the same exposures: Noise2Noise pairs
A seeded --test-fraction of the micrographs (not of the patches) is held out, so no test patch
shares a pixel with a training patch. Outputs in OUTDIR: train_noisy.mrcs, train_clean.mrcs,
test_noisy.mrcs, test_clean.mrcs (if any micrograph is held out) and manifest.json. The patch
stacks keep the sources' voxel size and axis order; a source's extended header (per-image
records of whole micrographs) describes no patch, so they have none: the manifest says so and
lists each source's header. One
micrograph is in memory at a time. Exit status: 0 done, 2 bad input (nothing written), 130
interrupted.
"""
import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import PairedImages
from .mrcstack import DataError, MrcStack
from .mrcwrite import StackWriter, check_target, output_directory
from .options import add_files, finite, refuse

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
NOISE_MODELS = ("poisson-gaussian", "gaussian")
# stream ids for np.random.default_rng([seed, STREAM, ...]): independent, documented draws
_SPLIT, _NOISE = 1, 2
FORMAT, VERSION = "cryokern-prepare", 1


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cryokern.prepare", allow_abbrev=False,
        description="Cut micrographs into training pairs: noisy/clean MRC patch stacks split "
                    "into train and test by micrograph, with a manifest.")
    s = p.add_argument_group("sources (one of)")
    add_files(s, "--clean", help="clean micrographs; alone, the noisy side is made with --noise "
                                 "(several files after one flag and repeated flags both add)")
    add_files(s, "--noisy", help="noisy micrographs paired in order with --clean (no noise is "
                                 "added)")
    add_files(s, "--even", help="even-frame sums, paired in order with --odd: Noise2Noise pairs")
    add_files(s, "--odd", help="odd-frame sums of the same exposures, in --even's order")
    c = p.add_argument_group("patches and split")
    c.add_argument("-o", "--out", required=True, metavar="OUTDIR")
    c.add_argument("--patch", type=int, default=1024, metavar="SIZE",
                   help="patch side in pixels (default 1024)")
    c.add_argument("--stride", type=int, default=None, metavar="STEP",
                   help="step between patches (default half the patch); a last patch is "
                        "added flush with the far edge when the steps leave a strip uncovered")
    c.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="hold out this fraction of the micrographs, chosen from the seed "
                        "(default 0.1; at least one when F > 0 and there are two or more)")
    c.add_argument("--seed", type=int, default=0)
    n = p.add_argument_group("synthetic noise (--clean alone)")
    n.add_argument("--noise", choices=NOISE_MODELS, default=None,
                   help="poisson-gaussian: Poisson(dose * clean) / dose + Normal(0, sigma^2); "
                        "gaussian: clean + Normal(0, sigma^2) (default poisson-gaussian)")
    n.add_argument("--dose", type=float, default=None,
                   help="expected counts per unit of clean intensity (default 1)")
    n.add_argument("--sigma", type=float, default=None,
                   help="Gaussian noise standard deviation, in clean units (default 0.05)")
    p.add_argument("--both-directions", action="store_true",
                   help="even/odd: also write each pair swapped (odd -> even)")
    p.add_argument("--force", action="store_true",
                   help="replace earlier outputs in OUTDIR (an input is never replaced)")
    return p


def patch_starts(length, patch, stride):
    """Patch corners along one axis: every `stride` pixels, plus one flush with the far edge
    if the steps leave pixels uncovered."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def add_noise(clean, model, dose, sigma, rng):
    """One noisy observation of a clean micrograph (float64 arithmetic, float32 result)."""
    if model == "poisson-gaussian":
        signal = rng.poisson(dose * clean.astype(np.float64)) / dose
    else:
        signal = clean.astype(np.float64)
    return (signal + rng.normal(0.0, sigma, clean.shape)).astype(np.float32)


def split_micrographs(count, fraction, seed):
    """A boolean mask of the held-out micrographs: a seeded random `fraction` of them."""
    n_test = int(round(fraction * count))
    if fraction > 0 and n_test == 0 and count > 1:
        n_test = 1
    n_test = min(n_test, count - 1)
    test = np.zeros(count, bool)
    test[np.random.default_rng([seed, _SPLIT]).permutation(count)[:n_test]] = True
    return test


class Sources:
    """The micrographs of the inputs, as (noisy, clean) float32 pairs read one at a time."""

    def __init__(self, opts):
        if opts.even or opts.odd:
            if opts.noisy or opts.clean:
                raise DataError("give --even/--odd or --noisy/--clean, not both")
            self.kind, pairs = "even/odd", self._pairs(opts.even, opts.odd, "--even", "--odd")
        elif opts.noisy:
            self.kind, pairs = "noisy/clean", self._pairs(opts.noisy, opts.clean, "--noisy",
                                                          "--clean")
        elif opts.clean:
            self.kind, pairs = "clean+noise", [(None, MrcStack(c)) for c in opts.clean]
        else:
            raise DataError("no micrographs given: use --clean, --noisy/--clean or --even/--odd")
        if opts.both_directions and self.kind != "even/odd":
            raise DataError("--both-directions is for --even/--odd pairs")
        noise_options = [f"--{k}" for k in ("noise", "dose", "sigma") if getattr(opts, k) is not None]
        if noise_options and self.kind != "clean+noise":
            raise DataError(f"{', '.join(noise_options)}: synthetic noise is added to --clean "
                            "micrographs given alone, not to recorded pairs")
        opts.noise = opts.noise or "poisson-gaussian"
        opts.dose = 1.0 if opts.dose is None else opts.dose
        opts.sigma = 0.05 if opts.sigma is None else opts.sigma
        self.opts, self.pairs = opts, pairs
        self.micrographs = [(p, i) for p, (_, clean) in enumerate(pairs) for i in range(len(clean))]
        first = pairs[0][1]
        for noisy, clean in pairs:
            for stack in (noisy, clean):
                if stack is not None and stack.axis_order != first.axis_order:
                    raise DataError(f"{stack.path}: axis order (mapc, mapr, maps) "
                                    f"{stack.axis_order} differs from {first.axis_order} of "
                                    f"{first.path}; the patch stacks have one header")
            if min(clean.shape) < opts.patch:
                raise DataError(f"{clean.path}: images are {clean.shape[0]}x{clean.shape[1]}, "
                                f"smaller than --patch {opts.patch}")

    @staticmethod
    def _pairs(first, second, first_flag, second_flag):
        if len(first) != len(second):
            raise DataError(f"{first_flag} names {len(first)} files but {second_flag} "
                            f"{len(second)}: they pair in order")
        return PairedImages(list(zip(first, second))).pairs

    def paths(self):
        return [s.path for pair in self.pairs for s in pair if s is not None]

    def read(self, number):
        """(noisy, clean) of micrograph `number`; synthetic noise is seeded by the number, so
        a micrograph's noise does not depend on the others."""
        p, i = self.micrographs[number]
        noisy_stack, clean_stack = self.pairs[p]
        clean = clean_stack.read(i, np.empty(clean_stack.shape, np.float32))
        if noisy_stack is not None:
            return noisy_stack.read(i, np.empty(noisy_stack.shape, np.float32)), clean
        o = self.opts
        if o.noise == "poisson-gaussian" and clean.min() < 0:
            raise DataError(f"{clean_stack.path}: image {i} has negative pixels (min "
                            f"{clean.min():.4g}); Poisson noise needs non-negative intensities: "
                            "rescale the micrographs or use --noise gaussian")
        rng = np.random.default_rng([o.seed, _NOISE, number])
        return add_noise(clean, o.noise, o.dose, o.sigma, rng), clean

    def describe(self, number, split, patches):
        p, i = self.micrographs[number]
        noisy, clean = self.pairs[p]
        first, second = ("even", "odd") if self.kind == "even/odd" else ("noisy", "clean")
        return {"id": number, first: noisy.path if noisy else None, second: clean.path,
                "image": i, "shape": list(clean.shape), "split": split, "patches": patches,
                "source_header": source_header(clean)}


def source_header(stack):
    """A source's header as far as its patches are concerned, for the manifest: the patch
    stacks keep only the first source's voxel size and axis order."""
    h = stack.header
    return {"voxel_size": stack.voxel_size, "axis_order": stack.axis_order,
            "space_group": int(h.ispg), "origin": stack.origin[0],
            "exttyp": bytes(h.exttyp).decode("ascii", "replace"),
            "extended_header_bytes": int(h.nsymbt)}


def check_options(opts):
    if opts.stride is None:
        opts.stride = max(1, opts.patch // 2)
    refuse([(opts.patch < 3, f"--patch {opts.patch}: must be at least 3"),
            (opts.stride < 1, f"--stride {opts.stride}: must be at least 1"),
            (not 0 <= opts.test_fraction < 1, "--test-fraction must be in [0, 1)"),
            (opts.dose is not None and not (finite(opts.dose) and opts.dose > 0),
             f"--dose {opts.dose}: must be positive and finite"),
            (opts.sigma is not None and not (finite(opts.sigma) and opts.sigma >= 0),
             f"--sigma {opts.sigma}: must be finite and not negative")])


def prepare(opts, argv):
    check_options(opts)
    sources = Sources(opts)
    out = output_directory(opts.out)
    count = len(sources.micrographs)
    test = split_micrographs(count, opts.test_fraction, opts.seed)
    splits = ["train", "test"] if test.any() else ["train"]
    copies = 2 if opts.both_directions else 1
    grids = []
    for number in range(count):
        h, w = sources.pairs[sources.micrographs[number][0]][1].shape
        grids.append((patch_starts(h, opts.patch, opts.stride),
                      patch_starts(w, opts.patch, opts.stride)))
    totals = {s: sum(len(ys) * len(xs) * copies for (ys, xs), t in zip(grids, test)
                     if ("test" if t else "train") == s) for s in splits}
    targets = {s: {side: out / f"{s}_{side}.mrcs" for side in ("noisy", "clean")} for s in splits}
    stale = [out / f"test_{side}.mrcs" for side in ("noisy", "clean")] if "test" not in splits \
        else []
    for name in [t for s in splits for t in targets[s].values()] + [out / "manifest.json"] + stale:
        check_target(name, sources.paths(), opts.force)
    out.mkdir(parents=True, exist_ok=True)
    for name in stale:      # an earlier run's held-out stacks, which this run has none of
        name.unlink(missing_ok=True)

    first = sources.pairs[0][1]
    manifest = {"format": FORMAT, "version": VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": ["python", "-m", "cryokern.prepare"] + list(argv),
                "source": sources.kind, "patch": opts.patch, "stride": opts.stride,
                "seed": opts.seed, "test_fraction": opts.test_fraction,
                "both_directions": opts.both_directions, "voxel_size": first.voxel_size,
                "header": {"kept": {"voxel_size": first.voxel_size,
                                    "axis_order": first.axis_order},
                           "extended_header": None,
                           "note": "patch stacks have no extended header (a source's describes "
                                   "whole micrographs, not patches), space group 0 and origin "
                                   "0; each micrograph's source_header lists its own"},
                "noise": None, "micrographs": [],
                "splits": {s: {"noisy": targets[s]["noisy"].name,
                               "clean": targets[s]["clean"].name,
                               "patches": totals[s], "micrographs": int((test == (s == "test")).sum())}
                           for s in splits},
                "patch_columns": ["micrograph", "y", "x", "swapped"],
                "patches": {s: [] for s in splits}}
    if sources.kind == "clean+noise":
        manifest["noise"] = {
            "model": opts.noise, "dose": opts.dose if opts.noise == "poisson-gaussian" else None,
            "sigma": opts.sigma,
            "formula": ("noisy = Poisson(dose * clean) / dose + Normal(0, sigma^2)"
                        if opts.noise == "poisson-gaussian" else "noisy = clean + Normal(0, sigma^2)"),
            "seeding": "per micrograph: numpy.random.default_rng([seed, 2, micrograph id])"}

    with ExitStack() as files:
        writers = {s: {side: files.enter_context(StackWriter(
            path, totals[s], (opts.patch, opts.patch), np.float32, "stack", first.voxel_size,
            label=f"cryokern prepare {s} {side}", axis_order=first.axis_order))
            for side, path in targets[s].items()}
            for s in splits}
        for number in tqdm(range(count), unit="micrograph", disable=None):
            split = "test" if test[number] else "train"
            noisy, clean = sources.read(number)
            ys, xs = grids[number]
            pairs = [(noisy, clean, False)] + ([(clean, noisy, True)] if copies == 2 else [])
            for y in ys:
                for x in xs:
                    for a, b, swapped in pairs:
                        writers[split]["noisy"].write(a[y:y + opts.patch, x:x + opts.patch])
                        writers[split]["clean"].write(b[y:y + opts.patch, x:x + opts.patch])
                        manifest["patches"][split].append([number, y, x, swapped])
            manifest["micrographs"].append(
                sources.describe(number, split, len(ys) * len(xs) * copies))
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    try:
        manifest = prepare(opts, argv)
    except DataError as e:
        print(f"cryokern.prepare: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cryokern.prepare: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    out, splits = Path(opts.out), manifest["splits"]
    for name, s in splits.items():
        print(f"{name}: {s['patches']} patches of {opts.patch}x{opts.patch} from "
              f"{s['micrographs']} micrographs -> {out / s['noisy']}, {out / s['clean']}")
    val = (f" --val-noisy {out / splits['test']['noisy']} --val-clean "
           f"{out / splits['test']['clean']}") if "test" in splits else ""
    print(f"train with: python -m cryokern.train --noisy {out / splits['train']['noisy']} "
          f"--clean {out / splits['train']['clean']}{val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
