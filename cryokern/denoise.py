"""python -m cryokern.denoise MODEL INPUT... -o OUTDIR: apply a trained checkpoint to micrographs.

Each input (2-D image, stack or volume) gives OUTDIR/<its name>: the input's header (space group,
axis order, voxel size, origin, labels, extended header; see mrcwrite.KEPT_FIELDS) with a label
added, float32 (or float16), every image denoised as `TiledDenoiser.denoise` does it, and with
--preview an 8-bit PNG or JPEG of each image beside it (see preview.py). Images
are streamed: the next few are read and normalized, and the previous few written, while the
current one is on the GPU. Exit status: 0 done, 2 bad input (nothing written), 130 interrupted.
"""
import argparse
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import DEVICE_HELP, DEVICES, get_backend
from .data import denormalize, normalization, normalize
from .inference import DEFAULT_TILE, TiledDenoiser, load_model
from .mrcstack import DataError, MrcStack
from .mrcwrite import StackWriter, check_target, output_directory
from .options import refuse
from .preview import FORMATS, PreviewSet, jpeg_library, preview_paths

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
READ_AHEAD = 3


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cryokern.denoise", allow_abbrev=False,
        description="Denoise MRC micrographs (2-D images, stacks or volumes) with a trained "
                    "cryokern checkpoint.")
    p.add_argument("model", metavar="MODEL", help="checkpoint (.npz) written by cryokern.train")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="MRC files to denoise (they may also follow the options)")
    p.add_argument("-o", "--out", required=True, metavar="OUTDIR",
                   help="directory for the outputs, one per input under the input's file name")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, metavar="SIZE",
                   help=f"process tiles of about SIZE x SIZE pixels (strips of whole rows) plus "
                        f"a halo of the network's receptive radius (default {DEFAULT_TILE}; 0: "
                        "whole images). The output does not depend on it; device memory does "
                        "(about 132 bytes per pixel of a tile for the default network)")
    p.add_argument("--float16", action="store_true",
                   help="write float16 (MRC mode 12) instead of float32 (mode 2)")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--preview", choices=FORMATS,
                   help="also write an 8-bit png or jpg of each image beside its MRC file "
                        "(<name>.png; stacks <name>_0000.png, ...): binned to 1024 pixels or "
                        "fewer on the long side, clipped at the 0.5 and 99.5 percentiles; "
                        "jpg needs Pillow")
    p.add_argument("--force", action="store_true",
                   help="replace existing outputs in OUTDIR (an input is never replaced)")
    return p


def plan_outputs(inputs, out, force, preview=None):
    """(MrcStack, output path, preview paths) per input, after checking every input and every
    output: bad input or an output that would replace an input (or, without force, any file),
    or two outputs of one name, are refused before anything is written."""
    out = output_directory(out)
    stacks = [MrcStack(path) for path in inputs]
    plan, owners = [], {}
    for s in stacks:
        target = out / Path(s.path).name
        previews = preview_paths(target, len(s), preview) if preview else []
        for name in [target] + previews:
            if name in owners:
                raise DataError(f"{s.path}: its output {name.name} would collide with that "
                                f"of {owners[name]} in {out}")
            owners[name] = s.path
        plan.append((s, target, previews))
    for name in owners:
        check_target(name, inputs, force)
    return plan


def denoise_file(stack, target, denoiser, dtype=np.float32, progress=None, ahead=READ_AHEAD,
                 previews=None):
    """Denoise every image of `stack` into the MRC file `target` (written atomically, with the
    input's header), and a preview of each image if `previews` (a PreviewSet) is given.

    Reading and normalizing, and un-normalizing and writing, cost the host several times what
    the device spends on an image, so they run on a thread pool: `ahead` images are read ahead
    and up to `ahead` written behind, in parallel, while the main thread keeps the device busy.
    Each image in flight has a slot of two page-locked buffers, reused image after image
    (no allocation, no page faults): read into `a`, normalized into `b`, the network's output
    from `b` into `a`, un-normalized into `b` and written. Host memory is 2 * ahead slots,
    whatever the stack's length.
    """
    mode = denoiser.model.normalize
    n = len(stack)
    slots = [tuple(denoiser.backend.host_empty(stack.shape) for _ in "ab")
             for _ in range(min(n, 2 * ahead))]

    def read(i):
        a, b = slots[i % len(slots)]
        stack.read(i, a)
        affine = normalization(a, mode)
        normalize(a, affine, out=b)
        return affine

    def write(i, affine):
        a, b = slots[i % len(slots)]
        writer.write(denormalize(a, affine, out=b), i)
        if previews is not None:
            previews.add(i, b)

    label = f"cryokern denoise {Path(denoiser.model.path).name}"
    reading, writing = {}, {}
    with ThreadPoolExecutor(2 * ahead) as pool, previews or nullcontext(), \
            StackWriter(target, n, stack.shape, dtype, label=label, like=stack) as writer:
        try:
            for i in range(min(ahead, n)):
                reading[i] = pool.submit(read, i)
            for i in range(n):
                affine = reading.pop(i).result()
                a, b = slots[i % len(slots)]
                denoiser(b, out=a)
                writing[i] = pool.submit(write, i, affine)
                following = i + ahead      # its slot was image following - len(slots)'s
                if following - len(slots) in writing:
                    writing.pop(following - len(slots)).result()
                if following < n:
                    reading[following] = pool.submit(read, following)
                for done in [j for j, job in writing.items() if job.done()]:
                    writing.pop(done).result()
                if progress is not None:
                    progress.update(1)
            for job in writing.values():
                job.result()
        finally:   # on an error, let the jobs in flight end before the file is discarded
            for job in list(reading.values()) + list(writing.values()):
                if not job.cancel():
                    job.exception()


def main(argv=None):
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")
    opts = build_parser().parse_intermixed_args(argv)
    dtype = np.float16 if opts.float16 else np.float32
    try:
        refuse([(opts.tile < 0, f"--tile {opts.tile}: must be at least 1 (or 0: whole images)")])
        if opts.preview == "jpg":
            jpeg_library()
        model = load_model(opts.model)
        plan = plan_outputs(opts.inputs, opts.out, opts.force, opts.preview)
        backend = get_backend(opts.device)
        denoiser = TiledDenoiser(model, backend, opts.tile)
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        total = sum(len(s) for s, _, _ in plan)
        print(f"cryokern: denoising {total} images from {len(plan)} files with "
              f"{Path(model.path).name} (channels {','.join(map(str, model.network.channels))}, "
              f"normalization {model.normalize}); backend {backend.name}, tiles of "
              f"{f'~{opts.tile}^2 px' if opts.tile else 'whole images'} + halo {denoiser.halo}",
              flush=True)
        start = time.perf_counter()
        with tqdm(total=total, unit="img", disable=None) as bar:
            for stack, target, previews in plan:
                try:
                    denoise_file(stack, target, denoiser, dtype, bar,
                                 previews=PreviewSet(previews, opts.preview) if previews else None)
                except ValueError as e:      # float16 overflow: named by the writer
                    raise DataError(str(e)) from None
        seconds = time.perf_counter() - start
    except DataError as e:
        print(f"cryokern.denoise: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cryokern.denoise: interrupted; the file being written was discarded",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: {total} images in {seconds:.1f} s ({total / seconds:.2f} images/s); "
          f"outputs in {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
