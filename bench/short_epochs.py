"""Short epochs: `train` end to end beside the training step alone, on a small set.

A small Noise2Noise-sized set (default 32 training pairs of 1024^2 float32 and 3 validation
pairs, written once) is trained for --epochs epochs by `python -m cryokern.train` from each
--tree (e.g. an older commit's checkout beside this one), with validation, checkpoints and
loss.png every epoch as the command does them. End to end: training images per second between
the first and the last epoch's printed lines (start-up and compiling excluded, everything an
epoch does included). In epoch: metrics.jsonl's images_per_s (the training loop alone), median.
Step only: this tree's training step on a device-resident batch, pipelined as train runs it.
--net (bench/nets.py's specs; default the chain 1,16,16,1, whose short step makes an epoch's
end weigh most) picks the network of both.
Usage: python bench/short_epochs.py [--tree DIR ...] [--epochs N ...] [--net SPEC] [--cache DIR]
                                    [--json FILE]
  --cache: the kernels' caches, laid out as bench/first_step.py leaves them (CACHE/cryokern,
  CACHE/numba), so that no run compiles inside the timing.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nets  # noqa: E402  (bench/nets.py: the networks a benchmark names)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_stack(path, n, size, seed):
    import mrcfile
    if os.path.exists(path):
        return path
    data = np.random.default_rng(seed).standard_normal((n, size, size)).astype(np.float32)
    with mrcfile.new(path + ".tmp", overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
    os.replace(path + ".tmp", path)
    return path


def train_run(tree, data, epochs, out, env, net):
    """(end-to-end images/s, median in-epoch images/s, seconds of the whole command)."""
    cmd = [sys.executable, "-m", "cryokern.train", "--noisy", data["noisy"], "--clean",
           data["clean"], "--val-noisy", data["val_noisy"], "--val-clean", data["val_clean"],
           "--epochs", str(epochs), "--out", out, "--force", *net.train_args]
    env = dict(env, PYTHONPATH=os.pathsep.join(
        [tree] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    epoch_lines = []
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("epoch "):
            epoch_lines.append(time.perf_counter())
    if proc.wait() != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n{''.join(output)}")
    total = time.perf_counter() - start
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    end_to_end = data["train_images"] * (len(epoch_lines) - 1) / (epoch_lines[-1] - epoch_lines[0])
    in_epoch = statistics.median(r["images_per_s"] for r in records[1:])
    return end_to_end, in_epoch, total


def step_only(batch, size, net):
    """Images/s of this tree's step on a device-resident batch (bench/step.py's pipelining),
    with train's optimizer for the network."""
    from numba import cuda
    from step import pipelined_ms

    from cryokern.backends import get_backend
    from cryokern.model import init_params
    from cryokern.step import TrainStep
    rng = np.random.default_rng(0)
    x = cuda.to_device(rng.standard_normal((batch, 1, size, size)).astype(np.float32))
    y = cuda.to_device(rng.standard_normal((batch, 1, size, size)).astype(np.float32))
    step = TrainStep(get_backend("gpu"), net.network, init_params(net.network, 0),
                     net.optimizer())
    return batch / pipelined_ms(lambda: step.launch(x, y)[0], 50) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", nargs="*", default=[ROOT])
    ap.add_argument("--dir", default="/tmp/cryokern-short-epochs")
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--val", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, nargs="*", default=[60],
                    help="epochs per run: one for all trees, or one per --tree")
    ap.add_argument("--net", type=nets.parse_net, default=nets.parse_net("chain:1,16,16,1"),
                    help=f"the network ({nets.SPEC_HELP}; default chain:1,16,16,1)")
    ap.add_argument("--cache")
    ap.add_argument("--json")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.cache:
        env.update(CRYOKERN_CACHE=os.path.join(args.cache, "cryokern"),
                   NUMBA_CACHE_DIR=os.path.join(args.cache, "numba"))
        os.environ.update(env)            # before numba is imported, for the step below
    os.makedirs(args.dir, exist_ok=True)
    def stack(kind, n, seed):
        return make_stack(os.path.join(args.dir, f"{kind}{n}x{args.size}.mrcs"), n, args.size, seed)
    data = {"train_images": args.train,
            "noisy": stack("noisy", args.train, 1), "clean": stack("clean", args.train, 2),
            "val_noisy": stack("val_noisy", args.val, 3),
            "val_clean": stack("val_clean", args.val, 4)}
    try:
        import matplotlib  # noqa: F401
        plots = "loss.png drawn (matplotlib installed)"
    except ImportError:
        plots = "no loss.png (matplotlib not installed)"
    from cryokern.backends import gpu_available
    step = step_only(4, args.size, args.net) if gpu_available() else float("nan")
    rows = []
    epochs = args.epochs * len(args.tree) if len(args.epochs) == 1 else args.epochs
    for i, (tree, n) in enumerate(zip(args.tree, epochs)):
        e2e, in_epoch, total = train_run(tree, data, n, os.path.join(args.dir, f"run{i}"), env,
                                           args.net)
        rows.append({"tree": tree, "epochs": n, "end_to_end": round(e2e, 1),
                     "in_epoch": round(in_epoch, 1), "step_only": round(step, 1),
                     "ratio": round(e2e / step, 3), "command_s": round(total, 1)})
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}  {args.train} + {args.val} images of "
          f"{args.size}^2, batch 4, {args.net.spec}; {plots}")
    print(f"{'tree':40s} {'epochs':>6s} {'end-to-end':>10s} {'in epoch':>9s} "
          f"{'step only':>9s} {'ratio':>6s} {'command s':>9s}")
    for r in rows:
        print(f"{r['tree'][-40:]:40s} {r['epochs']:6d} {r['end_to_end']:10.1f} "
              f"{r['in_epoch']:9.1f} {r['step_only']:9.1f} {r['ratio']:6.3f} "
              f"{r['command_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "plots": plots, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
