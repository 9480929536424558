"""Time from the command to the first training step, on a cold kernel cache.

Runs `python -m cryokern.train --epochs 1` on the built-in synthetic set with $CRYOKERN_CACHE
and $NUMBA_CACHE_DIR in a fresh directory (nothing compiled, the synthetic set not yet made,
as for a new user), timing each line of its output from the command's start:
  cold          the default network, empty caches
  new channels  each further --channels list, with the caches the default network left
  warm          the default network again (everything cached)
`to epoch 1` is when the first epoch's line is printed: an upper bound on the first step (the
epoch is 48 images of 64^2, validation and checkpoints included); `epoch 1 s` is that epoch's
training time as metrics.jsonl records it (with any kernel compiled inside the epoch).
Usage: python bench/first_step.py [--tree DIR] [--channels 1,8,24,1 ...] [--cache DIR] [--json FILE]
  --tree: the cryokern checkout to run (default this one), e.g. an older commit's for before/after.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(tree, cache, channels, out):
    """(seconds to epoch 1's line, the lines with their seconds, epoch 1's training seconds)."""
    path = [tree] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               CRYOKERN_CACHE=os.path.join(cache, "cryokern"),
               NUMBA_CACHE_DIR=os.path.join(cache, "numba"))
    cmd = [sys.executable, "-m", "cryokern.train", "--epochs", "1", "--channels", channels,
           "--out", out, "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait() != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n" + "\n".join(l for _, l in lines))
    record = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    train_images = 48                       # synthetic set: 48 training images
    epoch_line = next(t for t, line in lines if line.startswith("epoch 1/1"))
    return epoch_line, lines, train_images / record["images_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=ROOT)
    ap.add_argument("--channels", nargs="*", default=["1,8,24,1"])
    ap.add_argument("--cache", help="the caches' directory: new or empty (default: a new "
                                    "temporary one); later runs may reuse what it holds")
    ap.add_argument("--json")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="cryokern-first-step-")
    os.makedirs(cache, exist_ok=True)
    if os.listdir(cache):
        raise SystemExit(f"{cache}: not empty; a cold start needs empty caches")
    cases = [("cold", "1,16,16,1")] + [("new channels", c) for c in args.channels] + \
        [("warm", "1,16,16,1")]
    rows = []
    for kind, channels in cases:
        seconds, lines, epoch = timed_run(args.tree, cache, channels,
                                          os.path.join(cache, f"run-{len(rows)}"))
        for t, line in lines:
            if line.startswith("cryokern:"):
                print(f"  [{t:6.1f} s] {line}", flush=True)
        rows.append({"case": kind, "channels": channels, "to_epoch_1_s": round(seconds, 2),
                     "epoch_1_s": round(epoch, 2)})
        print(f"{kind:13s} {channels:12s} to epoch 1 {seconds:6.1f} s  (epoch 1 {epoch:.2f} s)",
              flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}  tree {args.tree}  {os.cpu_count()} cores")
    print(f"{'case':13s} {'channels':12s} {'to epoch 1 s':>12s} {'epoch 1 s':>10s}")
    for r in rows:
        print(f"{r['case']:13s} {r['channels']:12s} {r['to_epoch_1_s']:12.1f} "
              f"{r['epoch_1_s']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "tree": args.tree,
                       "cores": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
