"""Scaling over GPUs: training images/s and denoising micrographs/s on 1 rank and on each N of
--gpus, in one run, for one network (--net, bench/nets.py's specs; default train's default,
the 48-wide U-Net).

Training (cryokern.train, ranks started by --gpus N or a launcher that takes -n N), each row
the last epoch's images/s from metrics.jsonl (the first epoch holds the warm-up): 1 rank, batch
P (P = --per-gpu images per GPU, default 4); 1 rank, batch P, --loader-workers 0 (the
in-process threads, against the default worker processes); for each N, N ranks at batch N*P
(P per GPU), and N ranks at the global batch P (the first row's batches: its last.npz must be,
and is checked, byte for byte the 1-rank one's).
Denoising (cryokern.denoise): --micrographs files of --denoise-size^2 on 1 rank and on each N,
the rate the command prints (start-up excluded), the N-rank outputs compared with 1 rank's
bytes. The all-gather of training's per-image float64 sums: its bytes per step for 1..8 ranks
computed from the network's parameter count (see `gather_bytes`), and its time measured on
each N (`--gather`: the ranks run `gather_rows` on buffers of those sizes).

    python bench/scaling.py --gpus 2 4 8 --out /tmp/scaling                 # 8 x H200
    python bench/scaling.py --gpus 2 --net chain:1,16,16,1 --out /tmp/scaling-chain
    python bench/scaling.py --gpus 2 3 --device cpu --size 32 --denoise-size 64 \\
        --images 13 --micrographs 4 --net unet:2,3 --out /tmp/scaling      # CPU, toy sizes
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

from data_parallel import same_checkpoint, write_pair  # noqa: E402
from nets import SPEC_HELP, parse_net  # noqa: E402

from cryokern.model import DEFAULT_UNET_WIDTHS  # noqa: E402


def command(module, ranks, launcher, args):
    """`python -m module args` on `ranks` ranks: --gpus N, or `launcher -n N`."""
    base = [sys.executable, "-m", module] + args
    if ranks == 1:
        return base
    if launcher == "gpus":
        return base + ["--gpus", str(ranks)]
    return shlex.split(launcher) + ["-n", str(ranks)] + base


def execute(cmd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, BENCH, os.environ.get("PYTHONPATH")) if p))
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done, time.perf_counter() - started


def train(opts, pair, name, ranks, batch, extra=()):
    out = os.path.join(opts.out, name)
    args = ["--noisy", pair[0], "--clean", pair[1], "--device", opts.device,
            *opts.net.train_args, "--batch-size", str(batch), "--epochs", str(opts.epochs),
            "--val-fraction", "0", "--out", out, "--force", *extra]
    _, seconds = execute(command("cryokern.train", ranks, opts.launcher, args))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"run": name, "ranks": ranks, "batch": batch, "wall_s": round(seconds, 1),
            "images_per_s": round(records[-1]["images_per_s"], 2)}, out


def write_micrographs(directory, count, size):
    import mrcfile
    rng = np.random.default_rng(1)
    paths = []
    for k in range(count):
        path = os.path.join(directory, f"micrograph{k:03d}.mrc")
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(rng.standard_normal((size, size), np.float32))
        paths.append(path)
    return paths


def denoise(opts, model, inputs, ranks):
    out = os.path.join(opts.out, f"denoised{ranks}")
    args = [model, *inputs, "-o", out, "--force", "--device", opts.device]
    done, seconds = execute(command("cryokern.denoise", ranks, opts.launcher, args))
    rate = float(re.search(r"\(([0-9.]+) images/s\)", done.stdout).group(1))
    return {"ranks": ranks, "micrographs_per_s": rate, "wall_s": round(seconds, 1)}, out


def same_files(a, b):
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read()
        for n in names)


def gather_bytes(network, images, ranks):
    """(bytes each rank sends, bytes each rank receives) in one training step's all-gather:
    every image has one float64 row of (parameters + 1: the loss) sums; the buffer holds
    ranks * ceil(images / ranks) rows; each rank sends its block once and receives the
    others' (ranks - 1) blocks (what any all-gather must move, ring or tree)."""
    row = 8 * (network.param_count() + 1)
    block = -(-images // ranks) * row
    return block, (ranks - 1) * block


def time_gather(opts):
    """As a rank (--gather): seconds per gather_rows of a step's sums, median of 50."""
    from cryokern import distributed
    from cryokern.backends import get_backend
    comm = distributed.world()
    backend = get_backend(opts.device)
    comm = comm.for_backend(backend)
    net = opts.net.network
    images = opts.per_gpu * comm.size
    rows = comm.rows(images)
    arrays_ = [backend.empty64((rows,) + shape) for shape in net.param_shapes().values()]
    arrays_.append(backend.empty64((rows,)))
    times = []
    for _ in range(60):
        comm.barrier()
        started = time.perf_counter()
        comm.gather_rows(arrays_, images)
        backend.synchronize()
        times.append(time.perf_counter() - started)
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "images": images,
                          "gather_ms": 1e3 * float(np.median(times[10:]))}))


def measure_gather(opts, n):
    cmd = command("scaling", n, opts.launcher, [
        "--gather", "--device", opts.device, "--per-gpu", str(opts.per_gpu), "--net",
        opts.net.spec, "--out", opts.out])
    if opts.launcher == "gpus":     # this script takes no --gpus as a rank: launch it directly
        cmd = [sys.executable, "-c", "import sys; from cryokern import distributed; "
               "sys.exit(distributed.launch('scaling', sys.argv[2:], int(sys.argv[1])))",
               str(n)] + cmd[3:-2]
    return json.loads(execute(cmd)[0].stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[2],
                   help="the rank counts N beside 1 rank (default 2; e.g. 2 4 8)")
    p.add_argument("--launcher", default="gpus",
                   help="'gpus' (the commands' --gpus N, default) or a command taking -n N "
                        "(mpirun --allow-run-as-root, srun)")
    p.add_argument("--device", default="gpu")
    p.add_argument("--size", type=int, default=1024, help="training image side (default 1024)")
    p.add_argument("--per-gpu", type=int, default=4, help="images per GPU in a batch (4)")
    p.add_argument("--images", type=int,
                   help="training images (default: 12 batches of the largest N's batch, 12 N "
                        "P: at 8 GPUs 384, 96 steps an epoch on 1 rank)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--denoise-size", type=int, default=4096)
    p.add_argument("--micrographs", type=int,
                   help="micrographs denoised (default 8 N for the largest N: 8 a rank, so "
                        "that a rank's first file does not stand for its rate)")
    p.add_argument("--net", type=parse_net,
                   default=parse_net("unet:" + ",".join(map(str, DEFAULT_UNET_WIDTHS))),
                   help=f"the network trained and denoised with: {SPEC_HELP} (default: "
                        "train's default, the 48-wide U-Net)")
    p.add_argument("--gather", action="store_true", help=argparse.SUPPRESS)   # as a rank
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    if opts.gather:
        return time_gather(opts)
    if min(opts.gpus) < 2:
        p.error(f"--gpus {' '.join(map(str, opts.gpus))}: rank counts beside 1 start at 2")
    os.makedirs(opts.out, exist_ok=True)
    ranks, per = sorted(set(opts.gpus)), opts.per_gpu
    opts.images = opts.images or 12 * ranks[-1] * per
    opts.micrographs = opts.micrographs or 8 * ranks[-1]
    pair = write_pair(opts.out, opts.images, opts.size)
    one, one_out = train(opts, pair, "1 rank, batch P", 1, per)
    rows = [one, train(opts, pair, "1 rank, batch P, threads", 1, per,
                       ["--loader-workers", "0"])[0]]
    for n in ranks:
        rows.append(train(opts, pair, f"{n} ranks, batch {n}P", n, n * per)[0])
        strong, strong_out = train(opts, pair, f"{n} ranks, batch P", n, per)
        strong["last.npz vs 1 rank"] = "identical" if all(same_checkpoint(strong_out, one_out)) \
            else "DIFFERENT"
        rows.append(strong)
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / one["images_per_s"], 2)

    inputs = write_micrographs(opts.out, opts.micrographs, opts.denoise_size)
    model = os.path.join(one_out, "last.npz")
    single, single_out = denoise(opts, model, inputs, 1)
    denoised = [single]
    for n in ranks:
        multi, multi_out = denoise(opts, model, inputs, n)
        multi["outputs vs 1 rank"] = "identical" if same_files(multi_out, single_out) \
            else "DIFFERENT"
        denoised.append(multi)
    for r in denoised:
        r["speedup"] = round(r["micrographs_per_s"] / single["micrographs_per_s"], 2)

    measured = [measure_gather(opts, n) for n in ranks]
    projection = [{"ranks": r, "images": per * r,
                   **dict(zip(("sent_bytes", "received_bytes"),
                              gather_bytes(opts.net.network, per * r, r)))}
                  for r in (1, 2, 4, 8)]

    report = {"device": opts.device, "size": opts.size, "denoise_size": opts.denoise_size,
              "network": opts.net.spec, "training": rows, "denoise": denoised,
              "gather_measured": measured, "gather_projection": projection,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(opts.out, "scaling.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"training {opts.size}^2, {per} images per GPU (P), {opts.images} images, "
          f"{opts.device}, {opts.net.spec}, {report['date']}")
    print(f"{'run':<28} {'images/s':>9} {'x 1 rank':>8}  last.npz")
    for r in rows:
        print(f"{r['run']:<28} {r['images_per_s']:>9} {r['speedup']:>8}  "
              f"{r.get('last.npz vs 1 rank', '')}")
    print(f"denoise {opts.micrographs} x {opts.denoise_size}^2")
    print(f"{'ranks':<28} {'mics/s':>9} {'x 1 rank':>8}  outputs")
    for r in denoised:
        print(f"{r['ranks']:<28} {r['micrographs_per_s']:>9} {r['speedup']:>8}  "
              f"{r.get('outputs vs 1 rank', '')}")
    params = opts.net.network.param_count()
    print(f"all-gather of per-image float64 sums ({params} parameters + loss = "
          f"{8 * (params + 1)} bytes per image), {per} images per rank:")
    for r in projection:
        print(f"  {r['ranks']} ranks: sends {r['sent_bytes']} B, receives "
              f"{r['received_bytes']} B per step")
    for m in measured:
        print(f"  measured on {m['ranks']} ranks: {m['gather_ms']:.3f} ms per step")
    ok = all(r.get("last.npz vs 1 rank", "identical") == "identical" for r in rows) and \
        all(r.get("outputs vs 1 rank", "identical") == "identical" for r in denoised)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
