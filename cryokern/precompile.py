"""The GPU kernels a training run needs, compiled at once in worker processes before its first step.

Why: numba compiles a kernel at its first launch, one after another in the training process:
89 s for the default network on a cold cache (H200 host, 16 cores), 47-72 s for each new
channel list. Each kernel is a compilation of its own, so workers compile them side by side
while the training process opens and checks its data. They fill the caches the training process
then loads from: codegen.py's generated sources under the cache root (written once, never
replaced: numba's index keys on the file's mtime and size) and numba's `cache=True` index and
data files beside them (or under $NUMBA_CACHE_DIR).

Which kernels: a TrainStep is run once (a step and a validation loss), and the network's forward
pass as denoising runs it (without the up.l copies that training keeps for its backward pass;
recorded too, so that denoising never compiles at a first launch), on a backend that records
the operations it is asked for instead of computing them. Each distinct operation is a job that
a worker replays through the same `cryokern.kernels` function on small zero device arrays, so it
compiles the very kernels and argument types that the step launches: the kernels are chosen by
channel counts and flags alone, never by image or batch size. The few small kernels outside the
generated modules (image folds, optimizer updates) are one job, so no two workers write entries
of different signatures into one numba index at once (numba's index update is not safe for
that; entries of the same signature are). The weight gradients' tile folds (generated, ~4-7 s
each) are jobs of their own, which the weights jobs leave to them. One more job compiles the
data loader's image math.

A marker file per network and kernel sources says that all jobs once succeeded with this cache:
later runs start no workers.
"""
import atexit
import base64
import hashlib
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .backends import Backend
from .cachedir import cache_root
from .model import Network, PooledNetwork, UNet, forward, init_params
from .step import TrainStep

# operations whose kernels are generated per channel count: a job each, the rest share one
HEAVY = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights",
         "mse_loss_and_grad")
HOST_JOB = ("imagemath",)
RECORD_SHAPE = (1, 1, 8, 8)     # a batch for the recording: its size selects no kernel


def _describe(value):
    """A picklable, comparable stand-in for an operation's argument."""
    if isinstance(value, np.ndarray):
        return ("array", value.shape, value.dtype.str)
    if isinstance(value, tuple):
        return ("tuple", tuple(_describe(v) for v in value))
    if isinstance(value, np.generic):
        return ("scalar", value.dtype.str, value.item())
    return ("value", value)


class _RecordingOps:
    """The kernel functions' names; each call is recorded as (name, args, kwargs) described,
    and returns its `out` (the next layer's input)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, tuple(_describe(a) for a in args),
                               tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))))
            return kwargs.get("out")
        return record


def as_network(network):
    """A model network; a chain's channel list (what the chain's callers pass) as its Network."""
    return network if isinstance(network, (Network, PooledNetwork)) else Network(tuple(network))


def record_shape(network):
    """RECORD_SHAPE, or for a U-Net a batch whose sides need padding to its pooling grid (so
    that pad_zeros and crop are recorded too)."""
    if isinstance(network, PooledNetwork):
        side = (1 << network.levels) + 1
        return (1, network.in_channels, side, side)
    return RECORD_SHAPE


def step_operations(network, optimizer):
    """The distinct kernel operations (name, args, kwargs) of one training step, one
    validation loss and one denoising forward pass of `network` (a model.Network, UNet or
    N2NUNet, or a chain's channel list) with `optimizer` (an OptimizerConfig)."""
    ops = _RecordingOps()
    backend = Backend("record", ops, to_device=lambda a: np.array(a, np.float32),
                      to_host=lambda a: a, empty=lambda shape: np.zeros(shape, np.float32))
    network = as_network(network)
    params = init_params(network, 0)
    step = TrainStep(backend, network, params, optimizer)
    x = np.zeros(record_shape(network), np.float32)
    step.launch(x, x)
    step.loss(x, x)
    if isinstance(network, PooledNetwork):   # (a chain's forward launches its training kernels)
        forward(backend, network, params, x)
    return list(dict.fromkeys(ops.calls))


def _weights_fold(operation):
    """The tile fold that conv2d_backward_weights launches after its kernel, as an operation
    of its own: `reduce.fold_tiles` of float32 partials and float64 sums for the weights and
    the biases, with as many outputs as one block's chains (the generated fold depends on
    those alone). Why: compiled inside the weights job, it added 4-7 s to the longest jobs of
    the default network (bench/compile_time.py, NOTES v28). The weights jobs skip it
    (run_job), so that the two compile side by side; the training process loads both."""
    from .kernels import reduce
    gy, x = (a[1] for a in operation[1][:2])
    chains = [reduce._chains(k) for k in (gy[1] * x[1] * 9, gy[1])]
    return ("reduce.fold_tiles", tuple(
        ("tuple", (("array", (1, 1, kc), "<f4"), ("array", (1, kc), "<f8"))) for kc in chains),
        ())


def jobs(network, optimizer):
    """The operations grouped into jobs, longest first (a job is a tuple of operations, or
    HOST_JOB): one per generated-kernel operation and per distinct weight-gradient fold, one
    for the rest, and the image math."""
    operations = step_operations(network, optimizer)
    distinct = {}
    for op in operations:
        if op[0] in HEAVY:
            distinct.setdefault(_kernel_key(op), op)
    heavy = [(op,) for op in distinct.values()]
    heavy.sort(key=lambda job: -_size(job[0]))
    heavy += [(fold,) for fold in dict.fromkeys(_weights_fold(op) for op in operations
                                                if op[0] == "conv2d_backward_weights")]
    light = tuple(op for op in operations if op[0] not in HEAVY)
    return heavy + ([light] if light else []) + [HOST_JOB]


def _kernel_key(operation):
    """What selects an operation's generated kernel: the operation without its images' sizes.
    Why: a U-Net runs the same convolution at several levels, recorded with different image
    sides; as jobs of their own, the 48-wide U-Net's 48 jobs compiled 14 distinct kernels,
    the same kernel in up to 11 workers at once (and a worker's later jobs waited behind
    them)."""
    def key(description):
        if description[0] == "array" and len(description[1]) == 4:
            return ("array", description[1][:2], description[2])
        if description[0] == "tuple":
            return ("tuple", tuple(key(d) for d in description[1]))
        return description
    name, args, kwargs = operation
    return name, tuple(key(a) for a in args), tuple((k, key(v)) for k, v in kwargs)


def _size(operation):
    """Elements of an operation's array arguments: grows with its channel counts, as the
    generated kernel's length does (a proxy for its compile time)."""
    return sum(int(np.prod(a[1])) for a in operation[1] if a[0] == "array")


def label(job):
    """'conv2d_forward 16->16', 'image math', ... for the progress line."""
    if job == HOST_JOB:
        return "image math"
    if len(job) > 1:
        return "+".join(sorted({op[0] for op in job}))
    name, args, _ = job[0]
    if name == "reduce.fold_tiles":      # (partials, sums) pairs; the sums are (1, chains)
        return f"fold_tiles {tuple(sums[1][1] for _, (_, sums) in args)}"
    shapes = [a[1] for a in args if a[0] == "array"]
    x2 = dict(job[0][2]).get("x2", ("value", None))     # a concatenation's second input
    second = f"+{x2[1][1]}" if x2[0] == "array" else ""
    if name == "conv2d_forward":
        upsampled = " upsampled" if dict(job[0][2]).get("upsampled", ("value", False))[1] else ""
        return f"{name} {shapes[0][1]}{second}->{shapes[1][0]}{upsampled}"
    if name == "conv2d_backward_data":
        masked = " masked" if dict(job[0][2]).get("relu_output", ("value",))[0] == "array" \
            else ""
        return f"{name} {shapes[0][1]}->{shapes[1][1]}{masked}"
    if name == "conv2d_backward_weights":
        return f"{name} {shapes[1][1]}{second}->{shapes[0][1]}"
    return name


def _materialize(description, place=None):
    """Zero arrays on the device (or where `place` puts a NumPy array) and scalars for a
    described argument."""
    kind = description[0]
    if kind == "array":
        if place is None:
            from numba import cuda
            place = cuda.to_device
        return place(np.zeros(description[1], np.dtype(description[2])))
    if kind == "tuple":
        return tuple(_materialize(d, place) for d in description[1])
    if kind == "scalar":
        return np.dtype(description[1]).type(description[2])
    return description[1]


def run_job(job):
    """Compile one job's kernels in this process (by running them); returns its seconds."""
    start = time.perf_counter()
    if job == HOST_JOB:
        from . import imagemath
        image = np.ones((8, 8), np.float32)
        out = np.empty_like(image)
        imagemath.statistics(image)
        imagemath.sum_and_range(image)
        imagemath.standardize(image, 0.0, 1.0, out)
        imagemath.standardize_with_range(image, 0.0, 1.0, out)
        imagemath.destandardize(image, 0.0, 1.0, out)
    else:
        from numba import cuda

        from . import kernels
        from .kernels import codegen, conv
        codegen.mark_announced()        # the parent's line says what is compiled
        fold_tiles, conv.fold_tiles = conv.fold_tiles, lambda *folds: None   # jobs of their own
        try:
            for name, args, kwargs in job:
                module, _, function = name.rpartition(".")     # 'reduce.fold_tiles': a module's
                target = importlib.import_module(f"{kernels.__name__}.{module}") if module \
                    else kernels
                getattr(target, function)(*(_materialize(a) for a in args),
                                          **{k: _materialize(v) for k, v in kwargs})
        finally:
            conv.fold_tiles = fold_tiles
        cuda.synchronize()
    return time.perf_counter() - start


def _sources_digest():
    """What the generated kernels and their numba caches depend on: the kernel sources, the
    contract's constants, the image math, numba's versions and cache directory."""
    import numba
    import numba_cuda
    package = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(package.glob("kernels/*.py")) + [package / "contract.py",
                                                        package / "imagemath.py"]:
        h.update(path.name.encode() + path.read_bytes())
    h.update(f"{numba.__version__} {numba_cuda.__version__} {sys.version_info[:2]} "
             f"{os.environ.get('NUMBA_CACHE_DIR', '')} {os.path.realpath(package)}".encode())
    return h


class Compiling:
    """Worker processes compiling a network's kernels; wait() before the first step.

    Plain `python -m cryokern.precompile` processes, not multiprocessing's: those re-import
    the parent's main script, which (unguarded by `if __name__ == "__main__"`) would start a
    training run in every worker. Each gets the whole job list pickled on its command line and
    takes the next unclaimed job (longest first) whenever it is free, so that the jobs of a
    network with more jobs than workers (the U-Net 16,24,32,48,64: 50) go to whichever worker
    is free, not in fixed shares; it runs in a session of its own (Ctrl-C is the parent's to
    handle) and prints its jobs' seconds. Workers still running when the parent exits (bad
    data, Ctrl-C) are killed. `worker` is the module the workers run (its main() is this
    module's with its own run_job: cryokern.cpu.precompile's for the CPU backend) and `label`
    names a job of its list."""

    def __init__(self, job_list, marker, processes, worker="cryokern.precompile", label=label):
        self.marker = marker
        self.job_list = job_list
        self.label = label
        self.started = time.perf_counter()
        self.claims = tempfile.TemporaryDirectory(prefix="cryokern-jobs-")
        path = [p or os.getcwd() for p in sys.path]     # cryokern as the parent found it
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        encoded = base64.b64encode(pickle.dumps(job_list)).decode()
        self.errors = [tempfile.TemporaryFile() for _ in range(processes)]   # never a full pipe
        self.workers = [subprocess.Popen(
            [sys.executable, "-m", worker, encoded, self.claims.name],
            env=env, stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
            for errors in self.errors]
        atexit.register(self.stop)

    def stop(self):
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    def wait(self):
        """Block until every worker is done; print how long it took. A failed worker costs
        only time: the training process then compiles what is missing itself."""
        try:
            outputs = [worker.communicate()[0] for worker in self.workers]
        finally:
            self.stop()
            atexit.unregister(self.stop)
            self.claims.cleanup()
        failed = [(w, e) for w, e in zip(self.workers, self.errors) if w.returncode != 0]
        if failed:
            worker, errors = failed[0]
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            last = lines[-1] if lines else "no message"
            print(f"cryokern: compiling in worker processes failed (exit status "
                  f"{worker.returncode}: {last}); the kernels compile at their first launch "
                  "instead", flush=True)
            return
        seconds = time.perf_counter() - self.started
        timings = [(t, self.job_list[k]) for out in outputs
                   for k, t in json.loads(out.decode().splitlines()[-1])]
        slowest, slowest_job = max(timings, key=lambda tj: tj[0])
        print(f"cryokern: compiled in {seconds:.1f} s (longest: {self.label(slowest_job)}, "
              f"{slowest:.1f} s)", flush=True)
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps({"jobs": [self.label(job) for _, job in timings],
                                           "seconds": round(seconds, 1)}) + "\n")


class Ready:
    """Nothing being compiled."""

    def wait(self):
        pass


def start(network, optimizer, processes=None):
    """Start compiling the kernels of `network` (as step_operations takes it) with `optimizer`
    in worker processes and return the handle to wait() on; a no-op handle when an earlier run
    compiled them, or in numba's CUDA simulator (which compiles nothing)."""
    from numba import config
    if config.ENABLE_CUDASIM:
        return Ready()
    network = as_network(network)
    job_list = jobs(network, optimizer)
    h = _sources_digest()
    h.update(repr(job_list).encode())
    marker = cache_root() / "kernels" / f"ready-{h.hexdigest()[:16]}.json"
    if marker.exists():
        return Ready()
    processes = min(len(job_list), processes or os.cpu_count() or 1)
    print(f"cryokern: compiling the GPU kernels of the {network.label()} "
          f"({len(job_list)} jobs in {processes} processes, first run only; cached under "
          f"{cache_root()})", flush=True)
    return Compiling(job_list, marker, processes)


def claim(claims, index):
    """Whether this worker is the first to take job `index` (a file created exclusively in the
    directory `claims`, which the parent made for this run)."""
    try:
        os.close(os.open(os.path.join(claims, str(index)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main(encoded_jobs, claims, run=run_job):
    """A worker: run (by `run`) each job of the pickled list that no other worker has claimed,
    in order; print [job index, seconds] of those it ran (JSON) on stdout."""
    warnings.filterwarnings("ignore", message=".*GPU under-utilization")
    job_list = pickle.loads(base64.b64decode(encoded_jobs))
    print(json.dumps([(k, run(job)) for k, job in enumerate(job_list)
                      if claim(claims, k)]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
