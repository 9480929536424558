"""Time from the command to the first training step, on a cold kernel cache.

Runs `python -m cryokern.train --epochs 1` on the built-in synthetic set with $CRYOKERN_CACHE
and $NUMBA_CACHE_DIR in a fresh directory (nothing compiled, the synthetic set not yet made,
as for a new user), timing each line of its output from the command's start:
  cold          the first network (--cold, default train's default U-Net 48,48,48,48,48,48),
                empty caches
  new network   each further network (--channels: channel lists or U-Net widths), with the
                caches the first one left
  warm          the first network again (everything cached)
`to epoch 1` is when the first epoch's line is printed: an upper bound on the first step (the
epoch is 48 images of 64^2, validation and checkpoints included); `epoch 1 s` is that epoch's
training time as metrics.jsonl records it (with any kernel compiled inside the epoch).
Usage: python bench/first_step.py [--tree DIR] [--cold SPEC] [--channels SPEC ...] [--cache DIR]
                                  [--json FILE]
  SPEC: a chain's channels (1,8,24,1) or a U-Net's widths (unet:48,48,48,48,48,48), bench/nets.py.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nets  # noqa: E402  (bench/nets.py: the networks a benchmark names)


def timed_run(tree, cache, net, out):
    """(seconds to epoch 1's line, the lines with their seconds, epoch 1's training seconds)."""
    path = [tree] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               CRYOKERN_CACHE=os.path.join(cache, "cryokern"),
               NUMBA_CACHE_DIR=os.path.join(cache, "numba"))
    cmd = [sys.executable, "-m", "cryokern.train", "--epochs", "1", *net.train_args,
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
    ap.add_argument("--cold", type=nets.parse_net, default="unet:48,48,48,48,48,48",
                    help="the network run first, on empty caches, and last, warm")
    ap.add_argument("--channels", nargs="*", type=nets.parse_net,
                    help="networks run after it (default 1,8,24,1): " + nets.SPEC_HELP)
    ap.add_argument("--cache", help="the caches' directory: new or empty (default: a new "
                                    "temporary one); later runs may reuse what it holds")
    ap.add_argument("--json")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="cryokern-first-step-")
    os.makedirs(cache, exist_ok=True)
    if os.listdir(cache):
        raise SystemExit(f"{cache}: not empty; a cold start needs empty caches")
    later = [nets.parse_net("1,8,24,1")] if args.channels is None else args.channels
    cases = [("cold", args.cold)] + [("new network", n) for n in later] + \
        [("warm", args.cold)]
    rows = []
    for kind, net in cases:
        seconds, lines, epoch = timed_run(args.tree, cache, net,
                                          os.path.join(cache, f"run-{len(rows)}"))
        for t, line in lines:
            if line.startswith("cryokern:"):
                print(f"  [{t:6.1f} s] {line}", flush=True)
        rows.append({"case": kind, "network": net.spec, "to_epoch_1_s": round(seconds, 2),
                     "epoch_1_s": round(epoch, 2)})
        print(f"{kind:13s} {net.spec:24s} to epoch 1 {seconds:6.1f} s  (epoch 1 {epoch:.2f} s)",
              flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}  tree {args.tree}  {os.cpu_count()} cores")
    print(f"{'case':13s} {'network':24s} {'to epoch 1 s':>12s} {'epoch 1 s':>10s}")
    for r in rows:
        print(f"{r['case']:13s} {r['network']:24s} {r['to_epoch_1_s']:12.1f} "
              f"{r['epoch_1_s']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "tree": args.tree,
                       "cores": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
