"""Data-parallel training beside one process: the same checkpoint bits, and images/s.

Writes a noisy/clean MRC pair of random blobs, trains on it in one process and on N ranks
started by a launcher (mpiexec, mpirun, srun), compares every array of the two last.npz byte
for byte, and prints each run's training images/s (metrics.jsonl of the last epoch: the first
holds the warm-up). The default sizes give a ragged last batch in which the last rank holds no
image, and a validation batch split unevenly.

    python bench/data_parallel.py --ranks 2 --launcher "mpirun --allow-run-as-root" \\
        --device gpu --out /tmp/dp
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import mrcfile
import numpy as np


def write_pair(directory, images, size, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    clean = np.empty((images, size, size), np.float32)
    for k in range(images):
        y, x = rng.uniform(0, size, 2)
        clean[k] = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 16) ** 2))
    noisy = clean + rng.standard_normal(clean.shape, np.float32)
    paths = []
    for name, data in (("noisy", noisy), ("clean", clean)):
        path = os.path.join(directory, f"{name}.mrcs")
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
        paths.append(path)
    return paths


def train(launch, args, out):
    started = time.perf_counter()
    done = subprocess.run(launch + [sys.executable, "-m", "cryokern.train"] + args +
                          ["--out", out, "--force"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(launch) or 'one process'} failed ({done.returncode}):\n"
                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"wall_s": round(seconds, 1), "ranks": records[-1]["ranks"],
            "images_per_s": round(records[-1]["images_per_s"], 1)}


def arrays(out):
    with np.load(os.path.join(out, "last.npz")) as z:
        found = {k: z[k] for k in z.files}
    meta = json.loads(str(found.pop("meta")))
    meta.pop("options")
    meta["partial"].pop("seconds")
    return found, meta


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--launcher", default="mpiexec", help="command that takes -n N")
    p.add_argument("--device", default="gpu")
    p.add_argument("--size", type=int, default=512, help="image side (pixels)")
    p.add_argument("--images", type=int, default=67,
                   help="images (default 67: 7 held out, 60 in batches of 8: 7 x 8 + 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", required=True)
    opts = p.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    noisy, clean = write_pair(opts.out, opts.images, opts.size)
    args = ["--noisy", noisy, "--clean", clean, "--device", opts.device, "--batch-size",
            str(opts.batch_size), "--epochs", str(opts.epochs)]
    one = os.path.join(opts.out, "ranks1")
    many = os.path.join(opts.out, f"ranks{opts.ranks}")
    results = [train([], args, one),
               train(shlex.split(opts.launcher) + ["-n", str(opts.ranks)], args, many)]
    (a, meta_a), (b, meta_b) = arrays(one), arrays(many)
    same = sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    report = {"device": opts.device, "size": opts.size, "images": opts.images,
              "batch_size": opts.batch_size, "epochs": opts.epochs, "runs": results,
              "arrays": len(a), "identical_arrays": same, "identical_meta": meta_a == meta_b,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(opts.out, "data_parallel.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"{'ranks':>5} {'images/s (last epoch)':>22} {'wall s':>7}")
    for r in results:
        print(f"{r['ranks']:>5} {r['images_per_s']:>22} {r['wall_s']:>7}")
    print(f"last.npz: {len(a)} arrays {'identical' if same else 'DIFFERENT'}; meta "
          f"{'identical' if meta_a == meta_b else 'DIFFERENT'}")
    return 0 if same and meta_a == meta_b else 1


if __name__ == "__main__":
    sys.exit(main())
