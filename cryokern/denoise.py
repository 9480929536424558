"""python -m cryokern.denoise MODEL INPUT... -o OUTDIR: apply a trained checkpoint to micrographs.

Each input (2-D image, stack or volume) gives OUTDIR/<its name>: the input's header (space group,
axis order, voxel size, origin, labels, extended header; see mrcwrite.KEPT_FIELDS) with a label
added, float32 (or float16), every image denoised as `TiledDenoiser.denoise` does it, and with
--preview an 8-bit PNG or JPEG of each image beside it (see preview.py). Images
are streamed: the next few are read and normalized, and the previous few written, while the
current one is on the GPU. Exit status: 0 done, 2 bad input (nothing written), 130 interrupted.

On several ranks (mpiexec, srun, or --gpus N; distributed.py) the inputs are shared out as
`shard` says, every output is the bytes one process writes, rank 0 shows one progress bar for
the whole job, and an error any rank meets stops all of them at the same image (`run`).
"""
import argparse
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import distributed
from .backends import DEVICE_HELP, DEVICES, get_backend, gpu_available
from .data import denormalize, normalization, normalize
from .inference import DEFAULT_TILE, TiledDenoiser, load_model
from .mrcstack import DataError, MrcStack
from .mrcwrite import SharedStackWriter, StackWriter, check_target, output_directory
from .options import refuse
from .preview import FORMATS, PreviewSet, jpeg_library, preview_paths

EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
READ_AHEAD = 3


class Failed(Exception):
    """An unexpected error one rank met while denoising, raised on every rank alike."""


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
                   help="process tiles of about SIZE x SIZE pixels (strips of whole rows) plus "
                        "a halo of the network's receptive radius (0: whole images). The output "
                        "does not depend on it; device memory and time do (halo rows are "
                        "computed twice). Default: whole images where the network's arrays for "
                        "one fit half the device's free memory, else the tallest strips that do")
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
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="denoise on N GPUs of this node, one process each, the outputs those of "
                        "one (see README 'Many GPUs and nodes'; with --device cpu, N processes)")
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


def shard(plan, ranks):
    """Each rank's share of the work: a list of (plan index, first image, stop) per rank.

    A file of more pixels than a rank's fair share (all the inputs' pixels / ranks) is split:
    every rank takes a contiguous range of its images (distributed.block), all written into
    the one output. The other files go whole, round-robin over the ranks by size (pixels),
    largest first, files of equal size in command-line order. Each rank works through its
    share in command-line order; one rank takes every file whole, as one process does.
    """
    pixels = [len(s) * s.shape[0] * s.shape[1] for s, _, _ in plan]
    shares = [[] for _ in range(ranks)]
    whole = []
    for k, n in enumerate(pixels):
        if ranks > 1 and n * ranks > sum(pixels) and len(plan[k][0]) > 1:
            for rank, share in enumerate(shares):
                first, stop = distributed.block(len(plan[k][0]), ranks, rank)
                if stop > first:
                    share.append((k, first, stop))
        else:
            whole.append(k)
    for turn, k in enumerate(sorted(whole, key=lambda k: -pixels[k])):
        shares[turn % ranks].append((k, 0, len(plan[k][0])))
    return [sorted(share) for share in shares], sorted(set(range(len(plan))) - set(whole))


def denoise_images(stack, writer, images, denoiser, previews=None, ahead=READ_AHEAD):
    """Denoise the images `images` (a range) of `stack` into `writer` (a StackWriter or
    SharedStackWriter), and a preview of each into `previews` (a PreviewSet) if given; a
    generator that yields as each image leaves the device, and ends when every write is done.

    Reading and normalizing, and un-normalizing and writing, cost the host several times what
    the device spends on an image, so they run on a thread pool: `ahead` images are read ahead
    and up to `ahead` written behind, in parallel, while the main thread keeps the device busy.
    Each image in flight has a slot of two page-locked buffers, reused image after image
    (no allocation, no page faults): read into `a`, normalized into `b`, the network's output
    from `b` into `a`, un-normalized into `b` and written. Host memory is 2 * ahead slots,
    whatever the stack's length.
    """
    mode = denoiser.model.normalize
    n = len(images)
    slots = [tuple(denoiser.backend.host_empty(stack.shape) for _ in "ab")
             for _ in range(min(n, 2 * ahead))]

    def read(k):
        a, b = slots[k % len(slots)]
        stack.read(images[k], a)
        affine = normalization(a, mode)
        normalize(a, affine, out=b)
        return affine

    def write(k, affine):
        a, b = slots[k % len(slots)]
        writer.write(denormalize(a, affine, out=b), images[k])
        if previews is not None:
            previews.add(images[k], b)

    reading, writing = {}, {}
    with ThreadPoolExecutor(2 * ahead) as pool:
        try:
            for k in range(min(ahead, n)):
                reading[k] = pool.submit(read, k)
            for k in range(n):
                affine = reading.pop(k).result()
                a, b = slots[k % len(slots)]
                denoiser(b, out=a)
                writing[k] = pool.submit(write, k, affine)
                following = k + ahead      # its slot was image following - len(slots)'s
                if following - len(slots) in writing:
                    writing.pop(following - len(slots)).result()
                if following < n:
                    reading[following] = pool.submit(read, following)
                for done in [j for j, job in writing.items() if job.done()]:
                    writing.pop(done).result()
                yield
            for job in writing.values():
                job.result()
        finally:   # on an error, let the jobs in flight end before the file is discarded
            for job in list(reading.values()) + list(writing.values()):
                if not job.cancel():
                    job.exception()


def label(denoiser):
    return f"cryokern denoise {Path(denoiser.model.path).name}"


def denoise_file(stack, target, denoiser, dtype=np.float32, progress=None, ahead=READ_AHEAD,
                 previews=None):
    """Denoise every image of `stack` into the MRC file `target` (written atomically, with the
    input's header), and a preview of each image if `previews` (a PreviewSet) is given."""
    with previews or nullcontext(), StackWriter(target, len(stack), stack.shape, dtype,
                                                label=label(denoiser), like=stack) as writer:
        for _ in denoise_images(stack, writer, range(len(stack)), denoiser, previews, ahead):
            if progress is not None:
                progress.update(1)


def denoise_share(plan, share, shared, denoiser, dtype, preview):
    """This rank's share (see `shard`) as a generator that yields once per image: whole files
    written and renamed into place as they end, images of split files into their
    SharedStackWriter (`shared`, by plan index), which the caller closes."""
    for k, first, stop in share:
        stack, target, previews = plan[k]
        if k in shared:
            yield from denoise_images(stack, shared[k][0], range(first, stop), denoiser,
                                      shared[k][1])
            continue
        with (PreviewSet(previews, preview) if previews else nullcontext()) as preview_set, \
                StackWriter(target, len(stack), stack.shape, dtype, label=label(denoiser),
                            like=stack) as writer:
            yield from denoise_images(stack, writer, range(first, stop), denoiser, preview_set)


def run(comm, plan, denoiser, dtype, preview, bar):
    """Every rank's share of `plan` denoised (see `shard`), the ranks in step: after each
    image they exchange how many they did (rank 0's `bar` counts the whole job's) and any
    error. An error on any rank (bad input, float16 overflow: DataError; anything else)
    stops every rank at that image, files in progress discarded (the finished ones stay), and
    is raised on every rank alike (DataError, or Failed naming the exception), with the
    rank that met it named where there are several."""
    shares, split = shard(plan, comm.size)
    share = shares[comm.rank]
    shared, work = {}, None
    try:
        for k in split:      # created together, in plan order, on every rank
            stack, target, previews = plan[k]
            own = next((range(f, t) for j, f, t in share if j == k), range(0))
            shared[k] = (SharedStackWriter(comm, target, len(stack), stack.shape, dtype,
                                           label=label(denoiser), like=stack),
                         PreviewSet(previews, preview, own) if previews else None)
        work = denoise_share(plan, share, shared, denoiser, dtype, preview)
        mine = sum(stop - first for _, first, stop in share)
        ticks = max(sum(stop - first for _, first, stop in s) for s in shares)
        for tick in range(ticks + 1):   # the last: writes in flight finished
            done, error = 0, None
            try:
                if tick < mine:
                    next(work)
                    done = 1
                elif tick == ticks:
                    for _ in work:
                        raise AssertionError("an image beyond this rank's share")
            except (DataError, ValueError) as e:    # float16 overflow: named by the writer
                error = (DataError, str(e))
            except Exception as e:
                error = (Failed, f"{type(e).__name__}: {e}")
            report = comm.allgather((done, error))
            if bar is not None:
                bar.update(sum(d for d, _ in report))
            failed = [(rank, e) for rank, (_, e) in enumerate(report) if e is not None]
            if failed:
                rank, (kind, message) = failed[0]
                raise kind(message + (f" [rank {rank} of {comm.size}]" if comm.size > 1 else ""))
        for k in split:
            writer, previews = shared.pop(k)
            writer.close()
            if previews is not None:
                previews.commit()
    finally:
        if work is not None:
            work.close()    # a whole file in progress discarded
        for writer, previews in shared.values():
            writer.discard()
            if previews is not None:
                previews.discard()


def setup(opts, comm):
    """(model, plan, denoiser) once every rank has checked the inputs and outputs: a problem
    any rank finds stops all alike (DataError) before anything is written."""
    try:
        refuse([(opts.tile is not None and opts.tile < 0,
                 f"--tile {opts.tile}: must be at least 1 (or 0: whole images)")])
        if opts.preview == "jpg":
            jpeg_library()
        model = load_model(opts.model)
        plan = plan_outputs(opts.inputs, opts.out, opts.force, opts.preview)
        error = None
    except DataError as e:
        error = str(e)
    failed = [e for e in comm.agree(error) if e is not None]
    if failed:
        raise DataError(failed[0])
    name = opts.device
    if comm.size > 1 and (name == "gpu" or name == "auto" and gpu_available()):
        from numba import cuda
        cuda.select_device(comm.gpu())      # the GPU of this rank's local rank
    denoiser = TiledDenoiser(model, get_backend(name), opts.tile)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    return model, plan, denoiser


def tiling(tile, denoiser, plan):
    """How the first input's images are cut, for the opening line."""
    if tile is None:
        shape = tuple(plan[0][0].shape)
        rows = denoiser.core_rows(shape)
        if rows >= shape[0]:
            return "whole images (they fit half the device's free memory)"
        return (f"strips of {rows} rows + halo {denoiser.halo} (what half the device's free "
                "memory holds)")
    if tile == 0:
        return "whole images"
    return f"tiles of ~{tile}^2 px + halo {denoiser.halo}"


def terminated(signum, frame):
    """SIGTERM as an exit that unwinds: `run` discards the files in progress on its way out."""
    raise SystemExit(128 + signum)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")
    opts = build_parser().parse_intermixed_args(argv)
    if opts.gpus != 1:
        return distributed.relaunch("cryokern.denoise", argv, opts.gpus)
    comm = distributed.world()
    if comm.size > 1:       # ended by the launcher (another rank failed): files in progress go
        signal.signal(signal.SIGTERM, terminated)
    dtype = np.float16 if opts.float16 else np.float32
    try:
        model, plan, denoiser = setup(opts, comm)
        total = sum(len(s) for s, _, _ in plan)
        if comm.rank == 0:
            print(f"cryokern: denoising {total} images from {len(plan)} files with "
                  f"{Path(model.path).name} ({model.network.label()}, normalization "
                  f"{model.normalize}); backend {denoiser.backend.name}"
                  f"{f' on {comm.size} ranks' if comm.size > 1 else ''}, "
                  f"{tiling(opts.tile, denoiser, plan)}", flush=True)
        start = time.perf_counter()
        with tqdm(total=total, unit="img", disable=None if comm.rank == 0 else True) as bar:
            run(comm, plan, denoiser, dtype, opts.preview, bar if comm.rank == 0 else None)
        seconds = time.perf_counter() - start
    except DataError as e:
        return comm.stop(EXIT_BAD_INPUT, f"cryokern.denoise: error: {e}", agreed=True)
    except KeyboardInterrupt:
        return comm.stop(EXIT_INTERRUPTED, "cryokern.denoise: interrupted; the files being "
                                           "written were discarded", agreed=comm.size == 1)
    except Failed as e:             # met by one rank in `run`, raised on every rank
        return comm.stop(1, f"cryokern.denoise: failed: {e}", agreed=True)
    except Exception as e:
        if comm.size == 1:
            raise
        return comm.stop(1, f"cryokern.denoise: failed: {type(e).__name__}: {e}", agreed=False)
    if comm.rank == 0:
        print(f"done: {total} images in {seconds:.1f} s ({total / seconds:.2f} images/s); "
              f"outputs in {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
