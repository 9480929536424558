"""Data-parallel training beside one process: the same checkpoint bits, and images/s.

Writes a noisy/clean MRC pair of random blobs, trains on it in one process and on N ranks
started by each launcher given (train's own --gpus N: 'gpus'; or a command that takes -n N:
mpiexec, mpirun, srun), compares every array of each last.npz with the one process's byte for
byte, and prints each run's training images/s (metrics.jsonl of the last epoch: the first holds
the warm-up). The default sizes give a ragged last batch in which the last rank holds no image,
and a validation batch split unevenly.

    python bench/data_parallel.py --ranks 2 --launcher gpus \\
        --launcher "mpirun --allow-run-as-root" --device gpu --out /tmp/dp
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


def train(launcher, ranks, args, out):
    """One run (launcher None: one process); its figures, or None if it failed."""
    command = [sys.executable, "-m", "cryokern.train"] + args + ["--out", out, "--force"]
    if launcher == "gpus":
        command += ["--gpus", str(ranks)]
    elif launcher:
        command = shlex.split(launcher) + ["-n", str(ranks)] + command
    started = time.perf_counter()
    name = launcher or "one process"
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        print(f"{name} failed: {e}", file=sys.stderr)
        return None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
              f"{done.stderr[-3000:]}", file=sys.stderr)
        return None
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"launcher": name, "wall_s": round(seconds, 1), "ranks": records[-1]["ranks"],
            "images_per_s": round(records[-1]["images_per_s"], 1)}


def arrays(out):
    with np.load(os.path.join(out, "last.npz")) as z:
        found = {k: z[k] for k in z.files}
    meta = json.loads(str(found.pop("meta")))
    meta.pop("options")
    meta["partial"].pop("seconds")
    return found, meta


def same_checkpoint(out, want_out):
    """(arrays byte for byte, meta) of out's last.npz equal to want_out's: two booleans."""
    (got, got_meta), (want, want_meta) = arrays(out), arrays(want_out)
    return (sorted(got) == sorted(want) and
            all(got[a].tobytes() == want[a].tobytes() for a in want)), got_meta == want_meta


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--launcher", action="append",
                   help="'gpus' (train --gpus N) or a command that takes -n N; repeatable "
                        "(default: gpus)")
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
    args = ["--noisy", noisy, "--clean", clean, "--device", opts.device, "--channels",
            "1,16,16,1", "--batch-size", str(opts.batch_size), "--epochs", str(opts.epochs)]
    one = os.path.join(opts.out, "ranks1")
    results = [train(None, 1, args, one)]
    if results[0] is None:
        return 1
    want, _ = arrays(one)
    for k, launcher in enumerate(opts.launcher or ["gpus"]):
        out = os.path.join(opts.out, f"launcher{k}")
        result = train(launcher, opts.ranks, args, out)
        if result is None:
            results.append({"launcher": launcher, "failed": True})
            continue
        result["identical_arrays"], result["identical_meta"] = same_checkpoint(out, one)
        results.append(result)
    report = {"device": opts.device, "size": opts.size, "images": opts.images,
              "batch_size": opts.batch_size, "epochs": opts.epochs, "arrays": len(want),
              "runs": results, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(opts.out, "data_parallel.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"{opts.size}^2 images, batch {opts.batch_size}, {opts.device}; last.npz has "
          f"{len(want)} arrays")
    print(f"{'launcher':<40} {'ranks':>5} {'images/s':>9} {'wall s':>7}  last.npz vs 1 rank")
    for r in results:
        same = "-" if r is results[0] else "FAILED" if r.get("failed") else \
            "identical" if r["identical_arrays"] and r["identical_meta"] else "DIFFERENT"
        print(f"{r['launcher']:<40} {r.get('ranks', '-'):>5} {r.get('images_per_s', '-'):>9} "
              f"{r.get('wall_s', '-'):>7}  {same}")
    ok = all(r.get("identical_arrays") and r.get("identical_meta") for r in results[1:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
