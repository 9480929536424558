"""Where a short epoch's host time goes: `train`'s main thread, call by call, per epoch.

bench/short_epochs.py says how far `train` end to end is from the step alone; this says which
part of the epoch (and of its end: validation, checkpoint, plot, the next loader) takes the
host's time. It runs `train` in this process on a small set (written once, like
short_epochs.py's), with a timer around each of the calls below (time inside a timed call
nested in another counts for the inner one only), from the first epoch's printed line to the
last's (start-up, compiling and the first epoch left out). Per epoch, in ms of the main thread:
the rows add up to the wall time; 'unattributed' is the run loop's own time (the printed line,
tqdm). The writer thread's calls are listed apart (they overlap the main thread).
On the GPU, a 'wait' row is the host waiting for the device: a drained pipeline shows there.
Calls missing from a tree (an older or newer layout of train.py) are skipped, so one script
measures both (run it with PYTHONPATH set to each tree).
Usage: python bench/epoch_end.py [--device cpu|gpu|reference] [--train 32] [--val 3]
       [--size 64] [--epochs 30] [--channels 1,16,16,1] [--json FILE]
"""
import argparse
import builtins
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from short_epochs import make_stack  # noqa: E402

# (module, class or None, attribute, label): the calls timed, where the tree has them
CALLS = [
    ("cryokern.step", "TrainStep", "launch", "step: queue (launch)"),
    ("cryokern.step", "TrainStep", "loss", "validation: forward+loss (incl. its wait)"),
    ("cryokern.step", "TrainStep", "queue_loss", "validation: forward+loss queued"),
    ("cryokern.step", "TrainStep", "host_params", "checkpoint: parameters to host"),
    ("cryokern.step", "TrainStep", "host_state", "checkpoint: optimizer state to host"),
    ("cryokern.step", "TrainStep", "snapshot", "checkpoint: snapshot queued"),
    ("cryokern.backends", "Ready", "result", "wait: a loss or snapshot (host backend)"),
    ("cryokern.kernels.transfer", "PendingScalar", "result", "wait: a loss value (GPU)"),
    ("cryokern.kernels.transfer", "PendingArrays", "result", "wait: the snapshot (GPU)"),
    ("cryokern.kernels.transfer", "Uploads", "copied", "wait: a batch's upload (GPU)"),
    ("cryokern.train", "Run", "on_device", "upload: queue"),
    ("cryokern.train", "Run", "batches", "loader: start"),
    ("cryokern.data", "BatchLoader", "close", "loader: close"),
    ("cryokern.train", "Run", "validate", "validation: other"),
    ("cryokern.train", "Run", "queue_validation", "validation: other"),
    ("cryokern.train", "Run", "save", "checkpoint: other (meta, checks)"),
    ("cryokern.train", "Run", "save_snapshot", "checkpoint: other (meta, checks)"),
    ("cryokern.checkpoint", None, "encode", "checkpoint: encode (np.savez)"),
    ("cryokern.checkpoint", None, "write", "checkpoint: write, fsync, links"),
    ("cryokern.train", "Run", "finish_writing", "checkpoint: wait for the previous write"),
    ("cryokern.train", "Run", "plot", "plot (loss.png)"),
    ("cryokern.train", None, "peak_rss_mib", "epoch end: peak RSS (/proc)"),
    ("cryokern.train", "Run", "end_epoch", "epoch end: other (record, metrics.jsonl, line)"),
    ("cryokern.train", "Run", "close_epoch", "epoch end: close (queued) other"),
    ("cryokern.train", "Run", "finish_epoch", "epoch end: other (record, metrics.jsonl, line)"),
    ("cryokern.train", "Run", "train_epoch", "epoch: other (accounting, tqdm)"),
    ("cryokern.train", "Run", "queue_epoch", "epoch: other (accounting, tqdm)"),
]
BATCH_WAIT = "loader: wait for a batch"


class Profile:
    """Exclusive time per label, per thread (main thread apart from the others)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.reset()

    def reset(self):
        with self.lock:
            self.main = defaultdict(float)
            self.other = defaultdict(float)
            self.calls = defaultdict(int)

    def _stack(self):
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def enter(self):
        self._stack().append(0.0)
        return time.perf_counter()

    def leave(self, label, start):
        elapsed = time.perf_counter() - start
        stack = self._stack()
        inner = stack.pop()
        if stack:
            stack[-1] += elapsed
        main = threading.current_thread() is threading.main_thread()
        with self.lock:
            (self.main if main else self.other)[label] += elapsed - inner
            self.calls[label] += 1

    def wrap(self, owner, attr, label):
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = self.enter()
            try:
                return original(*args, **kwargs)
            finally:
                self.leave(label, start)
        setattr(owner, attr, timed)

    def wrap_iterator(self, owner, attr, label):
        """Each next() of the iterators that owner.attr returns, timed."""
        original = owner.__dict__[attr]
        profile = self

        def timed(self_):
            it = original(self_)
            while True:
                start = profile.enter()
                try:
                    item = next(it)
                except StopIteration:
                    profile.leave(label, start)
                    return
                profile.leave(label, start)
                yield item
        setattr(owner, attr, timed)


def instrument(profile):
    import importlib
    found = []
    for module, cls, attr, label in CALLS:
        try:
            owner = importlib.import_module(module)
        except ImportError:         # the GPU package without a GPU: nothing of it runs
            continue
        if cls is not None:
            owner = getattr(owner, cls, None)
        if owner is None or (attr not in owner.__dict__ if isinstance(owner, type)
                             else not hasattr(owner, attr)):
            continue
        profile.wrap(owner, attr, label)
        found.append(f"{cls or module}.{attr}")
    from cryokern.data import BatchLoader
    profile.wrap_iterator(BatchLoader, "__iter__", BATCH_WAIT)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="/tmp/cryokern-epoch-end")
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--val", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--channels", default="1,16,16,1")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    def stack(kind, n, seed):
        return make_stack(os.path.join(args.dir, f"{kind}{n}x{args.size}.mrcs"), n, args.size,
                          seed)
    data = ["--noisy", stack("noisy", args.train, 1), "--clean", stack("clean", args.train, 2),
            "--val-noisy", stack("val_noisy", args.val, 3),
            "--val-clean", stack("val_clean", args.val, 4)]
    from cryokern import train as T
    profile = Profile()
    found = instrument(profile)
    lines = []          # (perf_counter, main-thread totals) at each epoch's printed line
    real_print = builtins.print

    def print_(*a, **k):
        text = " ".join(map(str, a))
        if text.startswith("epoch "):
            if not lines:
                profile.reset()
            with profile.lock:
                lines.append((time.perf_counter(), dict(profile.main), dict(profile.other),
                              dict(profile.calls)))
        real_print(*a, **k)
    builtins.print = print_
    out = tempfile.mkdtemp(prefix="run-", dir=args.dir)
    try:
        assert T.main(data + ["--device", args.device, "--channels", args.channels,
                              "--epochs", str(args.epochs), "--out", out, "--force"]) == 0
    finally:
        builtins.print = real_print
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    epochs = len(lines) - 1
    wall_ms = (lines[-1][0] - lines[0][0]) / epochs * 1e3
    main_ms = {k: v / epochs * 1e3 for k, v in lines[-1][1].items()}
    other_ms = {k: v / epochs * 1e3 for k, v in lines[-1][2].items()}
    calls = lines[-1][3]
    in_epoch = statistics.median(r["images_per_s"] for r in records[1:])
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}  {args.device}: {args.train} + {args.val} "
          f"images of {args.size}^2, batch 4, channels {args.channels}; epochs 2-{epochs + 1}")
    print(f"tree {os.path.dirname(os.path.dirname(T.__file__))}; timed: {len(found)} calls")
    print(f"wall {wall_ms:.2f} ms an epoch ({args.train / wall_ms * 1e3:.0f} images/s end to "
          f"end; in epoch, metrics.jsonl's median: {in_epoch:.0f} images/s)")
    print(f"{'main thread, ms an epoch':46s} {'ms':>7s} {'calls':>6s}")
    rows = sorted(main_ms.items(), key=lambda kv: -kv[1])
    for label, ms in rows:
        print(f"  {label:44s} {ms:7.3f} {calls[label] / epochs:6.1f}")
    unattributed = wall_ms - sum(main_ms.values())
    print(f"  {'unattributed (run loop: printed line, etc.)':44s} {unattributed:7.3f}")
    if other_ms:
        print("other threads (overlapping the main thread)")
        for label, ms in sorted(other_ms.items(), key=lambda kv: -kv[1]):
            print(f"  {label:44s} {ms:7.3f} {calls[label] / epochs:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                       "wall_ms": wall_ms, "in_epoch_images_per_s": in_epoch,
                       "main_ms": main_ms, "other_ms": other_ms,
                       "unattributed_ms": unattributed}, f, indent=1)


if __name__ == "__main__":
    main()
