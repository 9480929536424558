"""Wall time of the README's demo, `python -m cryokern.train` on the built-in simulated set, as a
new user meets it (cold) and afterwards (warm).

cold  a fresh copy of the tree (so numba's on-disk cache beside its sources is empty; the
      variable NUMBA_CACHE_DIR is removed) and an empty $CRYOKERN_CACHE (the simulated set is
      generated): everything compiled, nothing reused
warm  the same copy and cache again (--warm times)
Each run prints its wall time, the CPU time of the command and its children (the compile
workers), when the compile line and the first epoch's line came, and the machine's load
average before it (the CPU machine is shared: a wall time above its CPU time means waiting).
--functions: each function the CPU backend compiles for the network, compiled one after another
in one fresh process with an empty cache (what a cold run did before the compile workers): where
the compile time goes.

Usage: python bench/demo_time.py [--tree DIR] [--net SPEC] [--optimizer sgd|adam] [--epochs N]
                                 [--warm N] [--functions] [--json FILE]
  without --net, --optimizer, --epochs: train's defaults (the no-argument demo itself);
  SPEC as bench/nets.py: 1,16,16,1 (a chain) or unet:16,16,16 (a U-Net's widths).
  --tree: the cryokern tree to copy and run (default this one), e.g. an older commit's
  (`git archive COMMIT | tar x -C DIR`) for before/after.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nets  # noqa: E402  (bench/nets.py: the networks a benchmark names)

COPY_IGNORED = shutil.ignore_patterns(".git", "__pycache__", "runs", "*.egg-info", ".*cache",
                                      ".xfer", ".whl", ".topaz", "*.nbi", "*.nbc")


def environment(tree, cache):
    env = dict(os.environ, PYTHONPATH=tree, CRYOKERN_CACHE=cache)
    env.pop("NUMBA_CACHE_DIR", None)        # numba's cache beside the copied sources
    return env


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_demo(tree, cache, out, train_args):
    """{wall, cpu, load, compiled_at, first_epoch_at, pearson} of one demo command."""
    load = os.getloadavg()[0]
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cryokern.train", *train_args, "--out", out,
                             "--force"], cwd=tree, env=environment(tree, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait() != 0:
        raise SystemExit("the demo failed:\n" + "\n".join(line for _, line in lines))
    wall = time.perf_counter() - start

    def first(prefix):
        return next((round(t, 2) for t, line in lines if line.startswith(prefix)), None)
    after = next(line for _, line in lines if line.strip().startswith("after training"))
    return {"wall_s": round(wall, 2), "cpu_s": round(children_cpu() - cpu, 2),
            "load_before": round(load, 2), "compiled_at_s": first("cryokern: compiled"),
            "first_epoch_at_s": first("epoch 1/"), "after_training": " ".join(after.split())}


def compile_each_function(tree, net, optimizer):
    """[(label, wall seconds, CPU seconds)] of the CPU backend's compile jobs for the network,
    compiled in order in one fresh process with an empty numba cache (numba's own helpers are
    compiled once per process, inside the first job that needs them)."""
    script = (
        "import json, sys, time\n"
        "from cryokern.cpu import precompile as P\n"
        "from cryokern.train import DEFAULT_LR, build_parser, check_options, optimizer_config\n"
        "opts = build_parser().parse_args(sys.argv[1:])\n"
        "opts.lr = opts.lr or DEFAULT_LR[opts.optimizer]\n"
        "jobs = P.jobs(check_options(opts), optimizer_config(opts))\n"
        "def timed(job):\n"
        "    cpu = time.process_time()\n"
        "    return P.label(job), P.run_job(job), time.process_time() - cpu\n"
        "print(json.dumps([timed(j) for j in jobs]))\n")
    with tempfile.TemporaryDirectory(prefix="cryokern-numba-") as numba_cache:
        env = dict(environment(tree, os.path.join(numba_cache, "cryokern")),
                   NUMBA_CACHE_DIR=numba_cache)
        args = [*(net.train_args if net else ()), *(["--optimizer", optimizer] if optimizer
                                                    else [])]
        out = subprocess.run([sys.executable, "-c", script, *args], cwd=tree, env=env,
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=ROOT)
    ap.add_argument("--net", type=nets.parse_net, help=nets.SPEC_HELP + " (default: train's)")
    ap.add_argument("--optimizer", choices=("sgd", "adam"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--warm", type=int, default=2, help="warm runs after the cold one")
    ap.add_argument("--functions", action="store_true",
                    help="also compile each function alone, in order, and time it")
    ap.add_argument("--json")
    args = ap.parse_args()
    train_args = [*(args.net.train_args if args.net else ()),
                  *(["--optimizer", args.optimizer] if args.optimizer else []),
                  *(["--epochs", str(args.epochs)] if args.epochs else [])]
    command = " ".join(["python -m cryokern.train", *train_args])
    print(f"{command}: {platform.node()}, {os.cpu_count()} CPUs, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"tree {os.path.abspath(args.tree)}", flush=True)
    results = {"command": command, "tree": os.path.abspath(args.tree), "cpus": os.cpu_count(),
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="cryokern-demo-") as tmp:
        tree = os.path.join(tmp, "tree")
        shutil.copytree(args.tree, tree, ignore=COPY_IGNORED)
        cache = os.path.join(tmp, "cache")
        for k in range(1 + args.warm):
            kind = "cold" if k == 0 else "warm"
            run = dict(kind=kind, **timed_demo(tree, cache, os.path.join(tmp, "run"),
                                               train_args))
            results["runs"].append(run)
            print(f"{kind}: {run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU (load "
                  f"{run['load_before']:.1f} before); compile line at {run['compiled_at_s']} s, "
                  f"epoch 1 at {run['first_epoch_at_s']} s; {run['after_training']}",
                  flush=True)
        if args.functions:
            results["functions"] = compile_each_function(tree, args.net, args.optimizer)
            wall, cpu = (sum(f[k] for f in results["functions"]) for k in (1, 2))
            print(f"each function compiled alone, in order (one process, {wall:.1f} s wall, "
                  f"{cpu:.1f} s CPU):")
            for name, wall, cpu in results["functions"]:
                print(f"  {name:24s} {wall:6.2f} s wall {cpu:6.2f} s CPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
